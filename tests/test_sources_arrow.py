"""parquet: and hf: sources: the records of JSONL, per-host file shares, exact resume, one-line errors, a fine-tune."""

import json
import os

import datasets
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import config_file, sentiment_examples

from jaxlm import predict, tables, trainer
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import causal, classify, pretrain, sources
from jaxlm.errors import UsageError

NAMES = ['negative', 'positive']
FIELDS = sources.Fields(text='text', text_pair='pair', label='label')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """600 labelled text pairs as JSONL (all, train = the first 400, dev = the rest), as 3 Parquet files of 200 rows
  in row groups of 45, and as a saved DatasetDict (train in 2 Arrow files, validation in 1; record batches of
  45 rows; the label a ClassLabel) and a saved Dataset (the validation rows). Returns (directory, rows)."""
  d = tmp_path_factory.mktemp('arrow')
  rows = [
    {'text': f'{t} #{i}', 'pair': f'said reviewer {i % 13}', 'label': NAMES[y], 'label_id': y, 'score': i / 8}
    for i, (t, y) in enumerate(sentiment_examples(0, 600))
  ]  # fmt: skip
  for name, part in (('all', rows), ('train', rows[:400]), ('dev', rows[400:])):
    (d / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in part))
  table = pa.Table.from_pylist(rows)
  for k in range(3):
    pq.write_table(table.slice(200 * k, 200), d / f'part-{k}.parquet', row_group_size=45)
  features = datasets.Features(text=datasets.Value('string'), pair=datasets.Value('string'),
                               label=datasets.ClassLabel(names=NAMES), score=datasets.Value('float64'))  # fmt: skip
  split = lambda part: datasets.Dataset.from_dict(
    {k: [r['label_id' if k == 'label' else k] for r in part] for k in features}, features=features
  )
  saved_batch = datasets.config.DEFAULT_MAX_BATCH_SIZE
  datasets.config.DEFAULT_MAX_BATCH_SIZE = 45  # Several record batches per file, as a large dataset has.
  try:
    dd = datasets.DatasetDict(train=split(rows[:400]), validation=split(rows[400:]))
    dd.save_to_disk(str(d / 'hf'), num_shards={'train': 2, 'validation': 1})
    dd['validation'].save_to_disk(str(d / 'hf_one'))
  finally:
    datasets.config.DEFAULT_MAX_BATCH_SIZE = saved_batch
  return d, rows


def _records(spec, fields=FIELDS, **kw) -> list[tuple]:
  with sources.usage_errors():
    recs = sources.records(spec, 'data.train', fields, **kw).as_numpy_iterator()
    return [tuple(r[k].decode() for k in sorted(r)) for r in recs]


def test_parquet_and_saved_datasets_read_as_their_jsonl(data):
  d, rows = data
  jsonl = _records(f'jsonl:{d}/all.jsonl')
  assert len(jsonl) == 600 and jsonl[0] == (rows[0]['label'], rows[0]['text'], rows[0]['pair'])
  assert _records(f'parquet:{d}/part-*.parquet') == jsonl
  # A DatasetDict's split is the config's; its ClassLabel ids come out as the class names.
  assert _records(f'hf:{d}/hf') == jsonl[:400]
  assert _records(f'hf:{d}/hf', split='validation') == jsonl[400:]
  assert _records(f'hf:{d}/hf_one', split='anything') == jsonl[400:]  # A plain Dataset has no splits.
  ints = sources.Fields(text='text', label='label_id', label_role='class')
  assert _records(f'parquet:{d}/part-*.parquet', ints) == _records(f'jsonl:{d}/all.jsonl', ints)
  assert {r[0] for r in _records(f'parquet:{d}/part-*.parquet', ints)} == {'0', '1'}
  # jaxlm.predict reads them without TensorFlow, in the same order.
  want = [(r['text'], r['pair']) for r in rows]
  assert [x for _, x in predict.read_inputs(f'parquet:{d}/part-*.parquet', 'parquet', 'text', 'pair')] == want
  assert [x for _, x in predict.read_inputs(f'{d}/part-1.parquet', 'parquet')] == [t for t, _ in want[200:400]]
  assert list(predict.read_inputs(f'hf:{d}/hf', 'hf', split='validation'))[:2] == [(0, want[400][0]), (1, want[401][0])]
  assert predict.input_format(f'hf:{d}/hf', None) == predict.input_format(str(d / 'hf'), None) == 'hf'


@pytest.mark.parametrize('spec', ['parquet:{d}/part-*.parquet', 'hf:{d}/hf'])
def test_two_hosts_read_disjoint_files_that_hold_every_record(spec, data):
  d, _ = data
  spec = spec.format(d=d)
  assert sources.by_file(spec, 'data.train', 2) and not sources.by_file(spec, 'data.train', 4)
  whole = _records(spec)
  shares = [_records(spec, file_shard=(i, 2)) for i in range(2)]
  assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(whole)


@pytest.mark.parametrize('spec', ['parquet:{d}/part-*.parquet', 'hf:{d}/hf'])
def test_a_restored_iterator_continues_at_the_next_record(spec, data, tmp_path):
  d, _ = data
  recs = lambda: sources.records(spec.format(d=d), 'data.train', FIELDS).batch(7)
  want = list(pretrain.Iterator(recs()))
  it = pretrain.Iterator(recs())
  for _ in range(30):  # 210 records: into the second file, in the middle of a row group and of a slice.
    next(it)
  path = it.save(str(tmp_path / 'iter'))
  assert path and sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)) < 100_000
  tables._cursors.clear()  # As in a new process: nothing read yet.
  resumed = pretrain.Iterator(recs())
  resumed.restore(path)
  rest = list(resumed)
  assert len(rest) == len(want) - 30
  for got, expected in zip(rest, want[30:]):
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_pretraining_batches_equal_those_of_jsonl(data):
  d, rows = data
  mlm_tok = tokenizer_lib.train_wordpiece([r['text'] for r in rows], 300)
  bpe = tokenizer_lib.train_bpe([r['text'] for r in rows], 300)
  take = lambda ds, n: [next(it) for it in [pretrain.Iterator(ds)] for _ in range(n)]
  kw = dict(seq_len=32, global_batch_size=4, seed=0, shuffle_buffer=16)
  mlm = lambda spec: take(pretrain.pretrain_dataset(spec, mlm_tok, max_predictions=5, **kw), 3)
  gpt = lambda spec: take(causal.causal_dataset(spec, bpe, **kw), 3)
  for a, b in [(mlm(f'parquet:{d}/part-*.parquet'), mlm(f'jsonl:{d}/all.jsonl')),
               (gpt(f'hf:{d}/hf'), gpt(f'jsonl:{d}/train.jsonl'))]:  # fmt: skip
    for x, y in zip(a, b):
      assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_bad_parquet_and_saved_datasets_are_one_clear_error(data, tmp_path):
  d, _ = data
  pqs = f'parquet:{d}/part-*.parquet'
  cases = [
    (lambda: _records(f'parquet:{tmp_path}/none*.parquet'), 'the glob matches no file'),
    (lambda: _records(pqs, sources.Fields(text='body')),
     r"part-0.parquet \(data.train\): no column 'body'; it has \['text', 'pair', 'label', 'label_id', 'score'\]"),
    (lambda: _records(pqs, sources.Fields(text='label_id')), "column 'label_id' holds int64; expected strings"),
    # A label of floats to classify, a label of strings to regress on.
    (lambda: classify.label_set(pqs, {'label_field': 'score'}),
     r"column 'score' holds double; expected strings, integers or booleans \(a number to predict is task=regression\)"),
    (lambda: classify.classify_dataset(pqs, None, labels=None, seq_len=16, global_batch_size=4,
                                       data_cfg={'label_field': 'label'}),
     "part-0.parquet \\(data.train\\): column 'label' holds string; expected integers or floats"),
    (lambda: _records(f'hf:{tmp_path}'), "not a dataset saved by datasets' save_to_disk"),
    (lambda: classify.label_set(f'hf:{d}/hf', {'eval_split': 'test'}, key='data.eval'),
     r"hf: no split 'test' \(data.eval_split\); the saved DatasetDict has \['train', 'validation'\]"),
    (lambda: _records(f'hf:{d}/hf', sources.Fields(text='sentence')),
     r"data-00000-of-00002.arrow \(data.train\): no column 'sentence'"),
    (lambda: next(predict.read_inputs(f'hf:{d}/hf', 'hf')),
     r"the splits \['train', 'validation'\]; choose one with --split"),
  ]  # fmt: skip
  string = datasets.Features({'text': datasets.Value('string')})
  datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': ['a b']}, features=string),
                        'validation': datasets.Dataset.from_dict({'text': []}, features=string)}
                       ).save_to_disk(str(tmp_path / 'hf_empty'))  # fmt: skip
  cases.append((lambda: _records(f'hf:{tmp_path}/hf_empty', split='validation'),
                r'hf_empty/validation: no rows \(data.train_split: an empty split\)'))  # fmt: skip
  pq.write_table(pa.table({'text': pa.array([], pa.string())}), tmp_path / 'empty.parquet')
  cases.append((lambda: _records(f'parquet:{tmp_path}/empty.parquet', sources.Fields()), r'empty.parquet: no rows'))
  (tmp_path / 'junk.parquet').write_text('not parquet\n')
  cases.append(
    (lambda: _records(f'parquet:{tmp_path}/junk.parquet', sources.Fields()), 'junk.parquet: not a Parquet file')
  )
  texts = [f'row {i}' for i in range(300)]
  pq.write_table(pa.table({'text': texts[:150] + [None] + texts[151:]}), tmp_path / 'holes.parquet', row_group_size=40)
  # Found while reading, deep in the file: one UsageError, through tf.data, naming the row.
  cases.append((lambda: list(pretrain.iter_texts(f'parquet:{tmp_path}/holes.parquet')),
                r"holes.parquet: row 150: column 'text' is null"))  # fmt: skip
  for fn, message in cases:
    with pytest.raises(UsageError, match=message):
      fn()


def test_fine_tune_on_a_saved_dataset_then_predict_its_validation_split(data, hf_mlm_dir, tmp_path, capsys):
  d, _ = data
  config = config_file('finetune_files', {
    'model.init_from': hf_mlm_dir, 'data.train': f'hf:{d}/hf', 'num_train_steps': 2, 'global_batch_size': 8,
    'data.seq_len': 16, 'warmup_steps': 1, 'eval_every_steps': 0, 'log_every_steps': 1, 'checkpoint_every_steps': 2,
    'data.text_pair_field': 'pair',
  })  # fmt: skip
  workdir = tmp_path / 'run'
  last = trainer.train(config, str(workdir), devices=jax.devices()[:1])
  assert json.load(open(workdir / 'labels.json')) == NAMES and np.isfinite(last['loss'])
  out = tmp_path / 'preds.jsonl'
  argv = ['--checkpoint', workdir, '--input', f'hf:{d}/hf', '--split', 'validation', '--text_pair_field', 'pair',
          '--output', out, '--batch_size', 8]  # fmt: skip
  assert predict.main([str(a) for a in argv]) == 0
  preds = [json.loads(line) for line in open(out)]
  assert len(preds) == 200 and {p['label'] for p in preds} <= set(NAMES)
  assert '200 examples' in capsys.readouterr().err
