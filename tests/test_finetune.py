"""Fine-tuning: metrics against scikit-learn / scipy, the real MiniLM on a learnable task through
the CLI (pruned while it trains), GLUE through TFDS (mock data), head-only and LoRA runs, eval
padding, HF export parity. The MiniLM run is a process with 2 devices; the others trainer.train calls."""

import json
import os
import random

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from conftest import config_file
from scipy import stats
from sklearn import metrics as skm

import jaxlm
from jaxlm import export, hf, metrics, peft, predict, store, trainer
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import classify
from jaxlm.data.pretrain import Iterator
from jaxlm.errors import UsageError
from jaxlm.tasks import glue

POS = ['great', 'wonderful', 'excellent', 'delightful', 'superb', 'lovely', 'fantastic', 'brilliant']
NEG = ['terrible', 'awful', 'boring', 'dreadful', 'horrible', 'dull', 'disappointing', 'poor']
SUBJ = ['the movie', 'this book', 'the meal', 'our trip', 'the concert', 'that show', 'the hotel', 'the game']
FILL = ['honestly', 'really', 'overall', 'i think', 'for me', 'in the end', 'frankly', 'to be fair']


def _sentiment(n: int, seed: int) -> list[dict]:
  """A small learnable task: the sentence's adjective decides the label."""
  r = random.Random(seed)
  out = []
  for _ in range(n):
    pos = r.random() < 0.5
    text = f'{r.choice(FILL)} {r.choice(SUBJ)} was {r.choice(POS if pos else NEG)}'
    out.append({'text': text, 'label': 'positive' if pos else 'negative'})
  return out


def _write_jsonl(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


# ----------------------------------------------------------------------------- metrics


def test_metrics_agree_with_sklearn_and_scipy():
  rng = np.random.default_rng(0)
  y2, p2 = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
  y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
  p3[:150] = y3[:150]  # Correlated, so Matthews is far from 0.
  assert metrics.accuracy(p3, y3) == pytest.approx(skm.accuracy_score(y3, p3), abs=1e-12)
  assert metrics.f1(p2, y2) == pytest.approx(skm.f1_score(y2, p2), abs=1e-12)
  assert metrics.matthews(p2, y2) == pytest.approx(skm.matthews_corrcoef(y2, p2), abs=1e-12)
  assert metrics.matthews(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3), abs=1e-12)
  assert metrics.matthews(np.ones(5, int), np.ones(5, int)) == skm.matthews_corrcoef(np.ones(5), np.ones(5))
  x = rng.normal(size=200)
  y = x + rng.normal(size=200)
  ties = np.round(x * 2) / 2  # Many ties: Spearman's average ranks matter.
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert metrics.spearman(ties, y) == pytest.approx(stats.spearmanr(ties, y)[0], abs=1e-12)
  w = (rng.random(300) > 0.3).astype(np.float32)  # Weight-0 rows are left out.
  keep = w > 0
  assert metrics.accuracy(p3, y3, w) == pytest.approx(skm.accuracy_score(y3[keep], p3[keep]))
  assert metrics.f1(p2, y2, w) == pytest.approx(skm.f1_score(y2[keep], p2[keep]))


def test_integer_labels_sort_numerically_and_map_to_ids(tmp_path, minilm_dir):
  rows = [('a', 10), ('b', 2), ('c', 1), ('d', 2)]
  (tmp_path / 'train.csv').write_text('sentence,grade\n' + ''.join(f'{t},{y}\n' for t, y in rows))
  cfg = {'text_field': 'sentence', 'label_field': 'grade'}
  labels = classify.label_set(f'csv:{tmp_path}/train.csv', cfg)
  assert labels == ['1', '2', '10']  # Numeric order, not '1', '10', '2'.
  ds = classify.classify_dataset(f'csv:{tmp_path}/train.csv', tokenizer_lib.load(minilm_dir), labels=labels,
                                 seq_len=8, global_batch_size=4, data_cfg=cfg)  # fmt: skip
  assert next(Iterator(ds))['labels'].tolist() == [2, 1, 0, 1]


def test_eval_batches_pad_and_split_across_processes(tmp_path, minilm_dir):
  path = _write_jsonl(tmp_path / 'dev.jsonl', _sentiment(21, 3))
  tok = tokenizer_lib.load(minilm_dir)
  cfg = {'text_field': 'text', 'label_field': 'label'}
  labels = ['negative', 'positive']
  whole, n = classify.eval_batches(f'jsonl:{path}', tok, labels=labels, seq_len=16, global_batch_size=8,
                                   data_cfg=cfg, process_index=0, process_count=1)  # fmt: skip
  assert n == 21 and len(whole) == 3 and sum(b['weights'].sum() for b in whole) == 21
  assert whole[-1]['weights'].tolist() == [1.0] * 5 + [0.0] * 3
  halves = [
    classify.eval_batches(f'jsonl:{path}', tok, labels=labels, seq_len=16, global_batch_size=8, data_cfg=cfg,
                          process_index=i, process_count=2)[0]
    for i in range(2)
  ]  # fmt: skip
  assert len(halves[0]) == len(halves[1]) == 3  # Every process runs the same number of batches.
  for b, (h0, h1) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([h0['input_ids'], h1['input_ids']]), whole[b]['input_ids'])
    np.testing.assert_array_equal(np.concatenate([h0['weights'], h1['weights']]), whole[b]['weights'])


def test_batches_are_padded_to_length_buckets_grouped_by_length_and_split_across_processes(tmp_path, minilm_dir):
  rng = random.Random(3)
  words = 'the a film book was very good bad long short and it i think so'.split()
  rows = [
    {'text': ' '.join(rng.choice(words) for _ in range(rng.randint(1, 25))), 'label': str(i % 2)} for i in range(24)
  ]
  path = _write_jsonl(tmp_path / 'train.jsonl', rows)
  tok = tokenizer_lib.load(minilm_dir)
  cfg = {'text_field': 'text', 'label_field': 'label', 'length_window': 3}
  kw = dict(labels=['0', '1'], seq_len=32, global_batch_size=4, repeat=True, seed=5)
  assert classify.bucket_lengths({}, 32) == (16, 24, 32)
  assert classify.bucket_lengths({}, 100) == (16, 24, 32, 48, 64, 96, 100)
  assert classify.bucket_lengths({'bucket_lengths': '24,8'}, 32) == (8, 24, 32)
  assert classify.bucket_lengths({'bucket_lengths': 'none'}, 32) == (32,)
  with pytest.raises(UsageError, match=r"data.bucket_lengths='8,40': lengths must be between 1 and data.seq_len=32"):
    classify.bucket_lengths({'bucket_lengths': '8,40'}, 32)
  with pytest.raises(UsageError, match=r'data.length_window=0: must be a positive integer'):
    classify.check_config({'seq_len': 32, 'length_window': 0})
  full = [ids for ids, _ in tok.encode([r['text'] for r in rows], 32)]
  length = {tuple(ids): len(ids) for ids in full}

  it = Iterator(classify.classify_dataset(f'jsonl:{path}', tok, data_cfg=cfg, **kw))
  window = [next(it) for _ in range(3)]  # One window: the first 12 examples, sorted by length.
  seen = []
  for b in window:
    ids = [tuple(r[m > 0].tolist()) for r, m in zip(b['input_ids'], b['attention_mask'])]
    longest = max(length[i] for i in ids)
    assert b['input_ids'].shape[1] == min(n for n in (16, 24, 32) if n >= longest)  # The smallest that holds it.
    assert (b['attention_mask'].sum(1) == [length[i] for i in ids]).all()  # No real token cut.
    seen += ids
  assert sorted(seen) == sorted(tuple(ids) for ids in full[:12])
  spans = sorted((min(length[i] for i in seen[k : k + 4]), max(length[i] for i in seen[k : k + 4])) for k in (0, 4, 8))
  assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]  # Each batch holds a slice of the sorted window.
  state = it.save(str(tmp_path / 'it' / 'state'))  # The window in flight is part of the saved position.
  after = [next(it) for _ in range(4)]
  again = Iterator(classify.classify_dataset(f'jsonl:{path}', tok, data_cfg=cfg, **kw))
  again.restore(state)
  for a, b in zip(after, [next(again) for _ in range(4)]):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])

  halves = [
    Iterator(classify.classify_dataset(f'jsonl:{path}', tok, data_cfg=cfg, process_index=i, process_count=2, **kw))
    for i in range(2)
  ]
  for b in window:  # Both processes pad a step to the same length; their rows make the one-process batch.
    h0, h1 = next(halves[0]), next(halves[1])
    np.testing.assert_array_equal(np.concatenate([h0['input_ids'], h1['input_ids']]), b['input_ids'])
    np.testing.assert_array_equal(np.concatenate([h0['labels'], h1['labels']]), b['labels'])


# ----------------------------------------------------------------------------- the real MiniLM, CLI


@pytest.fixture(scope='module')
def minilm_run(minilm_finetune_run):
  """conftest's CLI fine-tune of the real MiniLM (configs/finetune_files.py, 30 steps)."""
  workdir, stdout, dev, _ = minilm_finetune_run
  return workdir, stdout, dev


def test_finetune_minilm_learns_the_task(minilm_run):
  workdir, stdout, _ = minilm_run
  assert 'new: classifier/kernel, classifier/bias' in stdout
  assert 'loaded 23 parameters' in stdout and 'layers/q_kernel' in stdout
  results = json.load(open(workdir / 'eval_results.json'))
  assert results['step'] == 30
  assert results['accuracy'] >= 0.9, results  # Chance is about 0.5.
  assert set(results) == {'accuracy', 'f1', 'loss', 'step'}
  assert json.load(open(workdir / 'labels.json')) == ['negative', 'positive']
  assert (workdir / 'checkpoints' / 'best' / '30').is_dir()  # Kept by eval_accuracy.


def test_finetuned_checkpoint_predicts_and_hf_export_matches(minilm_run, tmp_path):
  import torch  # lazy: the other tests of this module run without PyTorch loaded
  import transformers

  workdir, _, dev = minilm_run
  rows = [json.loads(line) for line in open(dev)][:24]
  texts = [r['text'] for r in rows]
  pred = jaxlm.load(str(workdir)).predict(texts)
  assert np.mean([p['label'] == r['label'] for p, r in zip(pred, rows)]) >= 0.9
  out = tmp_path / 'hf'
  assert export.main(['--checkpoint', str(workdir), '--out', str(out), '--format', 'hf']) == 0
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  with torch.no_grad():
    logits = model(**tok(texts, padding=True, return_tensors='pt')).logits
  probs = torch.softmax(logits, -1).numpy()
  assert [model.config.id2label[i] for i in probs.argmax(-1)] == [p['label'] for p in pred]
  ours = np.array([[p['probabilities'][name] for name in ('negative', 'positive')] for p in pred])
  np.testing.assert_allclose(ours, probs, atol=1e-4)


# ----------------------------------------------------------------------------- parameter-efficient


@pytest.fixture(scope='module')
def task_files(tmp_path_factory):
  """64 training and 20 dev examples. The runs on them shuffle 64 at a time: the default 10,000-example buffer would
  read the file 150 times before the first batch."""
  d = tmp_path_factory.mktemp('ft_files')
  return _write_jsonl(d / 'train.jsonl', _sentiment(64, 5)), _write_jsonl(d / 'dev.jsonl', _sentiment(20, 6))


def _nested(tree) -> dict:
  return {'/'.join(k): v for k, v in _flat(store.nested(tree))}


def _flat(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), np.asarray(v)


@pytest.mark.parametrize('mode', ['head', 'lora'])
def test_head_only_and_lora_leave_frozen_weights_bitwise_unchanged(mode, tmp_path, hf_mlm_dir, task_files, capsys):
  train_path, dev_path = task_files
  config = config_file('finetune_files', {
    'model.init_from': hf_mlm_dir, 'data.train': f'jsonl:{train_path}', 'data.eval': f'jsonl:{dev_path}',
    'num_train_steps': 6, 'global_batch_size': 8, 'data.seq_len': 16, 'learning_rate': 1e-2, 'warmup_steps': 1,
    'eval_every_steps': 6, 'log_every_steps': 3, 'checkpoint_every_steps': 6, 'finetune.mode': mode,
    'finetune.lora_targets': 'q,v,o,wi,wo', 'finetune.lora_rank': 4, 'data.shuffle_buffer': 64,
  })  # fmt: skip
  workdir = str(tmp_path / mode)
  trainer.train(config, workdir)
  log = capsys.readouterr().out
  _, original, _, _ = hf.load(hf_mlm_dir)
  before = _nested(original)
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '6', 'state'))
  after = dict(_flat(saved['params']))
  after = {'/'.join(k): v for k, v in after.items()}
  head = [k for k in after if k.startswith(('pooler/', 'classifier/'))]
  assert sorted(head) == ['classifier/bias', 'classifier/kernel', 'pooler/bias', 'pooler/kernel']
  frozen = [k for k in after if k not in head]
  for k in frozen:  # The word table is padded to a multiple of model.vocab_multiple rows (zeros).
    real = after[k][: before[k].shape[0]]
    assert np.array_equal(real, before[k]), k  # Bitwise: no update ever touched them.
    assert not after[k][before[k].shape[0] :].any(), k
  assert after['embeddings/word'].shape[0] % 128 == 0
  assert not np.array_equal(after['classifier/kernel'], np.zeros_like(after['classifier/kernel']))
  trainable = int(log.split(f'fine-tuning ({mode}): ')[1].split(' trainable')[0].replace(',', ''))
  opt_floats = sum(np.size(x) for x in jax.tree.leaves(saved['opt_state']))
  assert opt_floats < 2 * trainable + 16  # Adam moments for the trainable parameters only.
  if mode == 'head':
    assert trainable == sum(after[k].size for k in head)
    return
  adapters = saved['adapters']
  assert sorted(adapters) == ['o', 'q', 'v', 'wi', 'wo']
  assert all(np.abs(adapters[n]['b']).max() > 0 for n in adapters)  # The adapters trained.
  # What leaves the run has the adapters merged into the dense kernels.
  _, merged, _, _ = store.load_checkpoint(workdir)
  merged = _nested(merged)
  scale = config.finetune.lora_alpha / config.finetune.lora_rank
  for name in ('q', 'wi'):
    kernel = f'layers/{peft.LORA_TARGETS[name][0]}'
    a, b = np.asarray(adapters[name]['a']), np.asarray(adapters[name]['b'])
    want = before[kernel] + (np.einsum('lir,lro->lio', a, b) * scale).reshape(before[kernel].shape)
    np.testing.assert_allclose(merged[kernel], want, atol=1e-6)
    assert not np.allclose(merged[kernel], before[kernel])
  np.testing.assert_array_equal(merged['layers/k_kernel'], before['layers/k_kernel'])  # No adapter on k.


def test_adapters_train_on_a_frozen_encoder_resume_load_predict_and_export(tmp_path, hf_mlm_dir, task_files, capsys):
  train_path, dev_path = task_files
  keys = {
    'model.init_from': hf_mlm_dir, 'data.train': f'jsonl:{train_path}', 'data.eval': f'jsonl:{dev_path}',
    'num_train_steps': 4, 'global_batch_size': 8, 'data.seq_len': 16, 'learning_rate': 1e-2, 'warmup_steps': 1,
    'eval_every_steps': 4, 'log_every_steps': 2, 'checkpoint_every_steps': 4, 'finetune.mode': 'adapter',
    'finetune.adapter_size': 8, 'model.scan_layers': True, 'data.shuffle_buffer': 64,
  }  # fmt: skip
  workdir = tmp_path / 'run'
  trainer.train(config_file('finetune_files', keys), str(workdir))
  more = {'num_train_steps': 6, 'eval_every_steps': 6, 'checkpoint_every_steps': 6}
  trainer.train(config_file('finetune_files', {**keys, **more}), str(workdir))
  log = capsys.readouterr().out
  assert 'resumed from the checkpoint of step 4' in log
  new = log.split('; new: ')[1].splitlines()[0].split(', ')
  adapters = [
    f'layers/adapter_{s}_{n}' for s in ('attn', 'ffn') for n in ('down_kernel', 'down_bias', 'up_kernel', 'up_bias')
  ]
  assert sorted(new) == sorted(adapters + ['pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias'])

  _, original, _, _ = hf.load(hf_mlm_dir)
  before = _nested(original)
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '6', 'state'))
  after = {'/'.join(k): v for k, v in _flat(saved['params'])}
  trains = adapters + list(peft.LAYER_NORMS) + ['pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias']
  for k in set(after) - set(trains):  # The word table is padded to a multiple of model.vocab_multiple rows (zeros).
    assert np.array_equal(after[k][: before[k].shape[0]], before[k]), k  # Bitwise: no update ever touched them.
  for k in ('layers/adapter_attn_up_kernel', 'layers/adapter_ffn_up_kernel'):  # They started at zero.
    assert np.abs(after[k]).max() > 0, k
  assert not np.array_equal(after['layers/attn_ln_scale'], before['layers/attn_ln_scale'])  # LayerNorms train.
  line = log.split('fine-tuning (adapter): ')[-1].split('\n')[0]
  trainable, total = (int(x.replace(',', '')) for x in line.split(' parameters')[0].split(' trainable of '))
  assert trainable == sum(after[k].size for k in trains) and total == sum(v.size for v in after.values())
  opt_floats = sum(np.size(x) for x in jax.tree.leaves(saved['opt_state']))
  assert opt_floats < 2 * trainable + 16  # Adam moments for the trainable parameters only.

  # The run loads and predicts, in the library and through python -m jaxlm.predict; the adapters take part.
  texts = [json.loads(line)['text'] for line in open(dev_path)][:8]
  m = jaxlm.load(str(workdir))
  assert (m.config.adapter_size, m.config.adapter_placement) == (8, 'both')
  probs = lambda pred: np.array([[p['probabilities'][k] for k in ('negative', 'positive')] for p in pred])  # noqa: E731
  ours = probs(m.predict(texts))
  out = tmp_path / 'pred.jsonl'
  assert predict.main(['--checkpoint', str(workdir), '--input', dev_path, '--output', str(out)]) == 0
  np.testing.assert_allclose(probs(json.loads(line) for line in open(out).readlines()[:8]), ours, atol=1e-5)
  exported = tmp_path / 'jaxlm_export'  # A jaxlm export keeps them.
  assert export.main(['--checkpoint', str(workdir), '--out', str(exported)]) == 0
  np.testing.assert_allclose(probs(jaxlm.load(str(exported)).predict(texts)), ours, atol=1e-6)

  # Hugging Face has no adapter layers: refused, unless asked to drop them.
  capsys.readouterr()
  assert export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 2
  err = capsys.readouterr().err
  assert (
    err.startswith('error: ') and err.count('\n') == 1 and 'bottleneck adapters' in err and '--drop_adapters' in err
  )
  assert not (tmp_path / 'hf').exists()
  drop = ['--checkpoint', str(workdir), '--drop_adapters']
  assert export.main([*drop, '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 0
  assert export.main([*drop, '--out', str(tmp_path / 'plain')]) == 0
  plain = probs(jaxlm.load(str(tmp_path / 'plain')).predict(texts))
  assert jaxlm.load(str(tmp_path / 'plain')).config.adapter_size == 0
  np.testing.assert_allclose(probs(jaxlm.load(str(tmp_path / 'hf')).predict(texts)), plain, atol=1e-5)
  assert np.abs(plain - ours).max() > 1e-4  # What the adapters learnt is gone.


# ----------------------------------------------------------------------------- GLUE via TFDS


@pytest.mark.parametrize(
  'task,keys',
  [('sst2', {'accuracy'}), ('stsb', {'pearson', 'spearman'}), ('mnli', {'accuracy', 'mismatched_accuracy'})],
)
def test_glue_through_tfds_mock_data(task, keys, tmp_path, hf_mlm_dir, capsys):
  init = hf_mlm_dir
  if task == 'sst2':  # Start from a jaxlm export (MLM head, no pooler or classifier) instead.
    init = str(tmp_path / 'jaxlm_export')
    assert export.main(['--checkpoint', hf_mlm_dir, '--out', init]) == 0
  config = config_file('finetune_glue', {
    'task_name': task, 'model.init_from': init, 'num_train_steps': 4, 'global_batch_size': 8,
    'data.seq_len': 16, 'warmup_steps': 1, 'eval_every_steps': 4, 'log_every_steps': 2,
    'checkpoint_every_steps': 4, 'data.shuffle_buffer': 16,
  })  # fmt: skip
  workdir = tmp_path / task
  with tfds.testing.mock_data(num_examples=21):  # 21 eval examples: the last batch of 8 is padded.
    last = trainer.train(config, str(workdir))
  log = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('init from'))
  new = set(log.split('; new: ')[1].split(', '))
  assert new == {'pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias'}, log
  assert 'loaded 21 parameters' in log  # Embeddings and layers; the MLM head is not used.
  results = json.load(open(workdir / 'eval_results.json'))
  assert keys <= set(results) and results['step'] == 4
  assert {f'eval_{k}' for k in keys} <= set(last)
  for k in keys:
    assert -1.0 <= results[k] <= 1.0
  main = {'sst2': 'accuracy', 'stsb': 'pearson', 'mnli': 'accuracy'}[task]
  assert (workdir / 'checkpoints' / 'best' / '4').is_dir(), main
  if task == 'mnli':
    assert json.load(open(workdir / 'labels.json')) == ['entailment', 'neutral', 'contradiction']
  if task == 'stsb':
    assert not (workdir / 'labels.json').exists()  # Regression: one output, no label set.


def test_finetune_config_errors(tmp_path):
  c = config_file('finetune_files', {'data.train': 'jsonl:x.jsonl'})
  with pytest.raises(UsageError, match='model.init_from'):
    trainer.check_config(c, 1)
  c = config_file('finetune_glue', {'task_name': 'sst3', 'model.init_from': '/x'})
  with pytest.raises(UsageError, match="task_name='sst3'"):
    glue.resolve(c)
  c = config_file('finetune_files', {'data.train': 'jsonl:x', 'model.init_from': '/x', 'finetune.lora_targets': 'q,z'})
  with pytest.raises(UsageError, match='finetune.lora_targets'):
    trainer.check_config(c, 1)
  c = config_file('finetune_files', {'data.train': 'jsonl:x', 'model.init_from': '/x', 'finetune.mode': 'adapters'})
  with pytest.raises(UsageError, match='finetune.mode'):
    trainer.check_config(c, 1)
  for key, value, message in [
    ('finetune.adapter_placement', 'middle', "finetune.adapter_placement='middle': expected one of"),
    ('finetune.adapter_size', 0, 'finetune.adapter_size=0: must be a positive integer'),
  ]:
    c = config_file('finetune_files', {'data.train': 'jsonl:x', 'model.init_from': '/x', key: value})
    with pytest.raises(UsageError, match=message):
      trainer.check_config(c, 1)
  sft = {'task': 'sft', 'data.train': 'jsonl:x', 'finetune.mode': 'adapter'}
  with pytest.raises(UsageError, match="finetune.mode='adapter': bottleneck adapters are for BERT encoders"):
    trainer.check_config(config_file('quickstart_causal', sft), 1)


# ----------------------------------------------------------------------------- pruning


def test_gradual_magnitude_pruning_while_fine_tuning_minilm(minilm_run, capsys):
  """The shared MiniLM run, pruned to 50% along a cubic schedule over steps 0-12: the sparsity reached,
  pruned weights exactly zero through later updates, and the accuracy it keeps."""
  workdir, _, _ = minilm_run
  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  last = {k: v for m in logged if m['step'] == 30 for k, v in m.items()}
  kernels = ('q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'wi_kernel', 'wo_kernel')
  ckpt = lambda s: ocp.StandardCheckpointer().restore(str(workdir / 'checkpoints' / str(s) / 'state'))['params']
  at15, at30 = ckpt(15), ckpt(30)
  for name in kernels:
    w15, w30 = np.asarray(at15['layers'][name]), np.asarray(at30['layers'][name])
    per_layer = (w30 == 0).reshape(w30.shape[0], -1).mean(1)
    np.testing.assert_allclose(per_layer, 0.5, atol=1e-3)  # Every layer slice at the target.
    assert np.all(w30[w15 == 0] == 0.0)  # Pruned by step 12, still exactly zero 15 updates later.
    assert np.any(w30[w15 != 0] != w15[w15 != 0])  # The rest trains on.
  assert np.any(np.asarray(at30['embeddings']['word']) != np.asarray(at15['embeddings']['word']))
  sparsity = [m['sparsity'] for m in logged if 'sparsity' in m]
  assert sparsity[0] < 0.5 and sparsity == sorted(sparsity)  # Rising along the schedule (logged every 4 steps).
  assert last['sparsity'] == pytest.approx(0.5, abs=1e-3)
  with capsys.disabled():
    print(f'\npruned MiniLM fine-tune: sparsity {last["sparsity"]:.3f}, eval accuracy {last["eval_accuracy"]:.3f}')
  assert last['eval_accuracy'] >= 0.9


def test_eval_set_problems_stop_the_run_before_training(tmp_path, hf_mlm_dir):
  train_path = _write_jsonl(tmp_path / 'train.jsonl', _sentiment(32, 0))
  unseen = _write_jsonl(tmp_path / 'unseen.jsonl', _sentiment(8, 1) + [{'text': 'so so', 'label': 'mixed'}])
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  for dev, message in ((unseen, "label 'mixed' is not in the label set"), (empty, 'no examples')):
    config = config_file('finetune_files', {
      'model.init_from': hf_mlm_dir, 'data.train': f'jsonl:{train_path}', 'data.eval': f'jsonl:{dev}',
      'num_train_steps': 4, 'global_batch_size': 8, 'data.seq_len': 16, 'eval_every_steps': 4,
    })  # fmt: skip
    workdir = tmp_path / f'run_{os.path.basename(str(dev))}'
    with pytest.raises(UsageError, match=message):
      trainer.train(config, str(workdir))
    assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()
