"""The tf.data input pipeline: sources, masking statistics, packing, host split, determinism, resume."""

import json
import os

import numpy as np
import pytest

from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pretrain, sources
from jaxlm.data.builtin import stdlib_documents
from jaxlm.errors import UsageError

T, P = 64, 10


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """The builtin corpus as 4 text files, 2 JSONL, a CSV and a TSV; a vocabulary; TFRecords."""
  root = tmp_path_factory.mktemp('corpus')
  docs = [d.replace('\n', ' ') for d in stdlib_documents()[:600]]
  for i in range(4):
    (root / f'part{i}.txt').write_text('\n'.join(docs[i::4]) + '\n')
  for i in range(2):
    (root / f'part{i}.jsonl').write_text(''.join(json.dumps({'body': d, 'label': 'x'}) + '\n' for d in docs[i::2]))
  (root / 'all.csv').write_text('id,body\n' + ''.join(f'{i},"{d.replace(chr(34), "")}"\n' for i, d in enumerate(docs)))
  (root / 'all.tsv').write_text('body\tid\n' + ''.join(f'{d.replace(chr(9), " ")}\t{i}\n' for i, d in enumerate(docs)))
  tok = tokenizer_lib.train_wordpiece(docs, 3000)
  tok.save(str(root / 'tok'))
  from tools import prepare_data

  assert prepare_data.main(['--input', f'text:{root}/part*.txt', '--tokenizer', str(root / 'tok'),
                            '--out', str(root / 'rec'), '--workers', '2']) == 0  # fmt: skip
  return root, tokenizer_lib.load(str(root / 'tok')), docs


def _ds(spec, tok, **kw):
  args = dict(seq_len=T, max_predictions=P, global_batch_size=8, seed=0, shuffle_buffer=50)
  args.update(kw)
  return pretrain.pretrain_dataset(spec, tok, **args)


def _take(ds, n):
  it = pretrain.Iterator(ds)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize('spec', ['text:{r}/part*.txt', 'jsonl:{r}/*.jsonl', 'csv:{r}/all.csv', 'tsv:{r}/all.tsv',
                                  'tfrecord:{r}/rec/*.tfrecord', 'builtin:stdlib'])  # fmt: skip
def test_every_source_gives_masked_batches(spec, corpus):
  root, tok, _ = corpus
  b = _take(_ds(spec.format(r=root), tok, data_cfg={'text_field': 'body'}), 2)[1]
  assert b['input_ids'].shape == (8, T) and b['masked_positions'].shape == (8, P)
  assert (b['input_ids'][:, 0] == tok.cls_id).all()
  assert (b['input_ids'] == tok.mask_id).sum() > 0 and b['masked_weights'].sum() > 8


def test_masking_statistics(corpus):
  root, tok, _ = corpus
  ds = _ds(f'text:{root}/part*.txt', tok, global_batch_size=256, max_predictions=20)
  b = next(pretrain.Iterator(ds))
  original = b['input_ids'].copy()
  rows = np.arange(256)[:, None]
  w = b['masked_weights'] > 0
  original[rows.repeat(20, 1)[w], b['masked_positions'][w]] = b['masked_ids'][w]
  special = np.isin(original, [tok.cls_id, tok.sep_id, tok.pad_id])
  assert not special[rows.repeat(20, 1)[w], b['masked_positions'][w]].any()  # No special token chosen.
  rate = w.sum() / (~special).sum()
  assert 0.14 < rate < 0.16, rate
  at = b['input_ids'][rows.repeat(20, 1)[w], b['masked_positions'][w]]
  labels = b['masked_ids'][w]
  frac_mask = (at == tok.mask_id).mean()
  frac_kept = (at == labels).mean()
  assert 0.77 < frac_mask < 0.83 and 0.08 < frac_kept < 0.12, (frac_mask, frac_kept)
  changed = (b['input_ids'] != original).sum()
  assert changed <= w.sum()  # Nothing outside the chosen positions moved.


def test_whole_word_masking_masks_words_together(corpus):
  root, tok, _ = corpus
  cont = pretrain.continuation_table(tok)
  b = next(pretrain.Iterator(_ds(f'text:{root}/part*.txt', tok, global_batch_size=64, whole_word=True)))
  n_pieces = 0
  for r in range(64):
    ids, w = b['input_ids'][r].copy(), b['masked_weights'][r] > 0
    ids[b['masked_positions'][r][w]] = b['masked_ids'][r][w]
    chosen = set(b['masked_positions'][r][w].tolist())
    for t in range(2, T):
      if cont[ids[t]] and ids[t - 1] not in (tok.cls_id, tok.sep_id):
        n_pieces += 1
        assert (t in chosen) == (t - 1 in chosen), (r, t)  # A continuation goes with its word.
  assert n_pieces > 50


def test_whole_word_masking_of_a_sequence_with_few_words(corpus, tmp_path):
  _, tok, _ = corpus
  (tmp_path / 'few.txt').write_text('one two three\n')  # A single sequence of 3 words, fewer than P.
  kw = dict(seq_len=T, max_predictions=P, mask_prob=0.5, nsp=False, seed=0, global_batch_size=1, process_index=0,
            process_count=1)  # fmt: skip
  (b,) = pretrain.eval_batches(f'text:{tmp_path}/few.txt', tok, whole_word=True, **kw)
  (want,) = pretrain.eval_batches(f'text:{tmp_path}/few.txt', tok, whole_word=False, **kw)
  assert b['masked_weights'].sum() == want['masked_weights'].sum() == 2  # round(0.5 * 3 words of a piece each)


def test_packing_drops_and_duplicates_no_token(corpus):
  root, tok, _ = corpus
  recs = pretrain.text_records(f'text:{root}/part0.txt')
  stream = [int(x) for x in pretrain.token_stream(recs, tok).as_numpy_iterator()]
  packed = pretrain.pack(pretrain.token_stream(recs, tok), T, tok, nsp=False, seed=0)
  body = []
  for ex in packed.as_numpy_iterator():
    ids = ex['input_ids']
    n = int((ids != tok.pad_id).sum())
    assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id
    body += ids[1 : n - 1].tolist()
  assert body == stream


def test_separate_documents_segments_and_positions(corpus, tmp_path):
  _, tok, _ = corpus
  docs = ['the quick brown fox', 'a module of the standard library for the whole program', 'short one']
  (tmp_path / 'three.txt').write_text(''.join(d + '\n' for d in docs))
  pieces = [tok.backend.encode(d, add_special_tokens=False).ids + [tok.sep_id] for d in docs]
  stream = [(t, i) for i, p in enumerate(pieces) for t in p]  # (token, its document)
  t = 12
  rows = list(pretrain.pack(pretrain.token_stream(pretrain.text_records(f'text:{tmp_path}/three.txt'), tok), t, tok,
                            nsp=False, seed=0, separate_documents=True).as_numpy_iterator())  # fmt: skip
  body = t - 2
  assert len(rows) == -(-len(stream) // body) >= 3
  for r, row in enumerate(rows):
    chunk = stream[r * body : (r + 1) * body]
    owners = [chunk[0][1]] + [i for _, i in chunk] + [chunk[-1][1]]  # [CLS] and the closing [SEP] join their pieces.
    n = len(owners)
    want_seg = [sorted(set(owners)).index(i) + 1 for i in owners] + [0] * (t - n)
    want_pos = [owners[: k + 1].count(i) - 1 for k, i in enumerate(owners)] + [0] * (t - n)
    assert row['input_ids'][:n].tolist() == [tok.cls_id] + [x for x, _ in chunk] + [tok.sep_id]
    assert row['segment_ids'].tolist() == want_seg and row['position_ids'].tolist() == want_pos, r
    assert row['segment_ids'].dtype == row['position_ids'].dtype == np.int32
    seg, ids = row['segment_ids'], row['input_ids']
    for k in range(1, n - 2):  # A document's [SEP] is the last token of its segment ...
      assert (ids[k] == tok.sep_id) == (seg[k + 1] != seg[k]), (r, k)
    assert seg[n - 1] == seg[n - 2]  # ... and the row's closing [SEP] joins the piece before it.
  # The first row: [CLS] and the first document from 0, then the second document from 0 again.
  first = len(pieces[0]) + 1
  assert first < t - 2
  assert rows[0]['position_ids'][:first].tolist() == list(range(first))
  assert rows[0]['position_ids'][first] == 0 and rows[0]['segment_ids'][first] == 2
  assert (rows[-1]['segment_ids'] == 0).any()  # The last row is padded: segment 0, position 0.
  assert not (rows[-1]['position_ids'][rows[-1]['segment_ids'] == 0]).any()
  assert max(int(r['segment_ids'].max()) for r in rows) >= 2
  assert not any('segment_ids' in r for r in pretrain.pack(
    pretrain.token_stream(pretrain.text_records(f'text:{tmp_path}/three.txt'), tok), t, tok, nsp=False, seed=0
  ).as_numpy_iterator())  # fmt: skip


@pytest.mark.parametrize('whole_word', [False, True])
def test_separate_documents_keeps_tokens_and_masks(whole_word, corpus):
  root, tok, _ = corpus
  spec = f'text:{root}/part*.txt'
  plain = _take(_ds(spec, tok, whole_word=whole_word), 3)
  packed = _take(_ds(spec, tok, whole_word=whole_word, separate_documents=True), 3)
  for a, b in zip(plain, packed):
    assert set(b) == set(a) | {'segment_ids', 'position_ids'}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ((b['segment_ids'] > 0) == (b['attention_mask'] > 0)).all() and (b['segment_ids'][:, 0] == 1).all()
    assert (b['segment_ids'].max(1) > 1).any()  # Rows of several documents.
  kw = dict(seq_len=T, max_predictions=P, mask_prob=0.15, nsp=False, whole_word=whole_word, seed=0,
            global_batch_size=16, process_index=0, process_count=1)  # fmt: skip
  evals = pretrain.eval_batches(f'text:{root}/part0.txt', tok, separate_documents=True, **kw)
  for a, b in zip(pretrain.eval_batches(f'text:{root}/part0.txt', tok, **kw), evals):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert evals[-1]['masked_weights'][-1].sum() == 0 and not evals[-1]['segment_ids'][-1].any()  # A padding row.
  with pytest.raises(UsageError, match=r'data.separate_documents=True cannot be combined with data.nsp=True'):
    _ds(spec, tok, nsp=True, separate_documents=True)


def test_next_sentence_pairs(corpus):
  root, tok, _ = corpus
  b = next(pretrain.Iterator(_ds(f'text:{root}/part*.txt', tok, nsp=True, global_batch_size=200)))
  assert set(np.unique(b['nsp_labels'])) == {0, 1} and 0.35 < b['nsp_labels'].mean() < 0.65
  types = b['token_type_ids']
  assert (types[:, 0] == 0).all() and (types.max(1) == 1).all()
  assert ((b['input_ids'] == tok.sep_id).sum(1) >= 2).all()


@pytest.mark.parametrize('spec', ['builtin:stdlib', 'text:{r}/part*.txt'])
def test_host_shares_cover_every_sequence_once(spec, corpus):
  root, tok, _ = corpus
  spec = spec.format(r=root)
  kw = dict(repeat=False, shuffle_buffer=0, global_batch_size=4)
  rows = lambda ds: [tuple(r) for b in pretrain.Iterator(ds) for r in b['masked_ids']]
  whole = rows(_ds(spec, tok, **kw))
  shares = [rows(_ds(spec, tok, process_index=i, process_count=2, **kw)) for i in range(2)]
  if spec.startswith('builtin'):
    # By sequence: global batch j is host 0's local batch j next to host 1's.
    n = min(len(shares[0]), len(shares[1])) // 2
    assert n > 100
    for j in range(n):
      assert sorted(whole[4 * j : 4 * j + 4]) == sorted(shares[0][2 * j : 2 * j + 2] + shares[1][2 * j : 2 * j + 2])
  else:
    # By file (4 files, 2 hosts): disjoint files that together hold every document.
    recs = lambda shard: sources.records(spec, 'k', sources.Fields(), file_shard=shard)
    docs = lambda shard: [bytes(r['text']) for r in recs(shard).as_numpy_iterator()]
    assert sorted(docs((0, 2)) + docs((1, 2))) == sorted(docs(None))
    assert not set(docs((0, 2))) & set(docs((1, 2)))
    assert len(shares[0]) > 0 and len(shares[1]) > 0


def test_same_seed_same_batches_and_exact_resume(corpus, tmp_path):
  root, tok, _ = corpus
  spec = f'text:{root}/part*.txt'
  a = _take(_ds(spec, tok), 6)
  b = _take(_ds(spec, tok), 6)
  c = _take(_ds(spec, tok, seed=1), 1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['input_ids'], c[0]['input_ids'])
  it = pretrain.Iterator(_ds(spec, tok))
  for _ in range(3):
    next(it)
  path = it.save(str(tmp_path / 'iter'))
  assert sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)) < 2_000_000
  resumed = pretrain.Iterator(_ds(spec, tok))
  resumed.restore(path)
  for want in a[3:6]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_is_read_in_full_and_padded(corpus):
  root, tok, _ = corpus
  kw = dict(seq_len=T, max_predictions=P, mask_prob=0.15, nsp=False, whole_word=False, seed=0)
  whole = pretrain.eval_batches(
    f'text:{root}/part0.txt', tok, global_batch_size=16, process_index=0, process_count=1, **kw
  )
  n_real = sum(int((b['masked_weights'].sum(1) > 0).sum()) for b in whole)
  full = list(pretrain.Iterator(pretrain.pretrain_dataset(f'text:{root}/part0.txt', tok, global_batch_size=1,
                                                          repeat=False, shuffle_buffer=0, max_predictions=P, seq_len=T)))  # fmt: skip
  assert n_real == len(full) and n_real % 16 != 0  # Every sequence, and a padded last batch.
  assert whole[-1]['masked_weights'][-1].sum() == 0
  halves = [pretrain.eval_batches(f'text:{root}/part0.txt', tok, global_batch_size=16, process_index=i,
                                  process_count=2, **kw) for i in range(2)]  # fmt: skip
  assert len(halves[0]) == len(halves[1]) == len(whole)
  np.testing.assert_array_equal(
    np.concatenate([halves[0][0]['input_ids'], halves[1][0]['input_ids']]), whole[0]['input_ids']
  )


def test_tfds_source_with_mock_data(corpus):
  import tensorflow_datasets as tfds

  _, tok, _ = corpus
  with tfds.testing.mock_data(num_examples=64):
    recs = list(
      sources.records('tfds:imdb_reviews', 'data.train', sources.Fields(text='text', label='label'))
      .take(3)
      .as_numpy_iterator()
    )
    assert len(recs) == 3 and set(recs[0]) == {'text', 'label'}
    b = next(pretrain.Iterator(_ds('tfds:imdb_reviews', tok, global_batch_size=2, seq_len=32, max_predictions=4)))
    assert b['input_ids'].shape == (2, 32)
    with pytest.raises(UsageError, match="no field 'body'"):
      sources.records('tfds:imdb_reviews', 'data.train', sources.Fields(text='body'))


def test_bad_input_is_one_clear_error(corpus, tmp_path):
  root, tok, _ = corpus
  with pytest.raises(UsageError, match='the glob matches no file'):
    _ds(f'text:{tmp_path}/nothing*.txt', tok)
  (tmp_path / 'empty.txt').write_text('\n\n')
  with pytest.raises(UsageError, match='is the corpus empty'):
    _ds(f'text:{tmp_path}/empty.txt', tok)
  with pytest.raises(UsageError, match="part0.jsonl:1: no field 'text'"):
    _ds(f'jsonl:{root}/part0.jsonl', tok)
  # A bad record deep in a file is named by its line, from inside tf.data, as one UsageError.
  good = ''.join(json.dumps({'text': f'record {i} with a few words of text in it'}) + '\n' for i in range(300))
  (tmp_path / 'late.jsonl').write_text(good + '\n{"text": "broken\n' + good)
  with pytest.raises(UsageError, match=r'late.jsonl:302: not valid JSON'):
    list(pretrain.iter_texts(f'jsonl:{tmp_path}/late.jsonl'))
  (tmp_path / 'quote.csv').write_text('text,label\nfine,a\n"never closed,b\nnext,a\n')
  with pytest.raises(UsageError, match=r"data.train='csv:.*quote.csv': a quoted CSV / TSV field is never closed"):
    list(pretrain.iter_texts(f'csv:{tmp_path}/quote.csv'))
  with pytest.raises(UsageError, match=r'late.jsonl:302: not valid JSON'):
    it = pretrain.Iterator(_ds(f'jsonl:{tmp_path}/late.jsonl', tok, global_batch_size=1, shuffle_buffer=0))
    for _ in range(10_000):
      next(it)
  with pytest.raises(UsageError, match=r"all.csv \(data.train\): no column 'text'"):
    _ds(f'csv:{root}/all.csv', tok)
  with pytest.raises(UsageError, match='expected KIND:SPEC'):
    _ds('avro:/x', tok)
  (tmp_path / 'bad.txt').write_bytes(b'caf\xe9 au lait and more words here\n' + b'plain words ' * 200 + b'\n')
  before = pretrain.Stats.undecodable
  b = next(pretrain.Iterator(_ds(f'text:{tmp_path}/bad.txt', tok, global_batch_size=1, shuffle_buffer=0)))
  assert pretrain.Stats.undecodable == before + 1 and b['input_ids'].shape == (1, T)


def test_classification_batches_pairs_labels_and_regression(corpus, tmp_path):
  from jaxlm.data import classify

  _, tok, _ = corpus
  rows = [('good film', 'yes indeed', 'pos', '4.5'), ('bad film', 'not at all', 'neg', '1.0'),
          ('fine', 'so so', 'neutral', '3.0')]  # fmt: skip
  (tmp_path / 'train.tsv').write_text('a\tb\ty\tscore\n' + ''.join('\t'.join(r) + '\n' for r in rows))
  (tmp_path / 'dev.jsonl').write_text(json.dumps({'a': 'ok', 'b': 'sure', 'y': 'maybe', 'score': 2}) + '\n')
  cfg = {'text_field': 'a', 'text_pair_field': 'b', 'label_field': 'y'}
  labels = classify.label_set(f'tsv:{tmp_path}/train.tsv', cfg)
  assert labels == ['neg', 'neutral', 'pos']
  ds = classify.classify_dataset(
    f'tsv:{tmp_path}/train.tsv', tok, labels=labels, seq_len=16, global_batch_size=3, data_cfg=cfg
  )
  b = next(pretrain.Iterator(ds))
  assert b['labels'].tolist() == [2, 0, 1] and b['input_ids'].shape == (3, 16)
  assert (b['token_type_ids'].max(1) == 1).all()  # Pairs: the second segment has type 1.
  enc = tok.encode([('good film', 'yes indeed')], 16)[0][0]
  assert b['input_ids'][0, : len(enc)].tolist() == enc and b['attention_mask'][0].sum() == len(enc)
  reg = classify.classify_dataset(f'tsv:{tmp_path}/train.tsv', tok, labels=None, seq_len=16, global_batch_size=3,
                                  data_cfg={**cfg, 'label_field': 'score'})  # fmt: skip
  assert next(pretrain.Iterator(reg))['labels'].tolist() == [4.5, 1.0, 3.0]
  dev = classify.classify_dataset(f'jsonl:{tmp_path}/dev.jsonl', tok, labels=labels, seq_len=16, global_batch_size=1,
                                  data_cfg=cfg, key='data.eval')  # fmt: skip
  with pytest.raises(
    UsageError, match=r"data.eval='jsonl:.*dev.jsonl', field 'y': label 'maybe' is not in the label set"
  ):
    next(pretrain.Iterator(dev))


def test_trained_vocabulary_loads_in_transformers_and_prepare_data_restarts(corpus, tmp_path, capsys):
  import sys

  import transformers

  root, tok, docs = corpus
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
  import prepare_data
  import train_tokenizer

  assert (
    train_tokenizer.main(['--input', f'text:{root}/part*.txt', '--vocab_size', '1500', '--out', str(tmp_path / 't')])
    == 0
  )
  ours = tokenizer_lib.load(str(tmp_path / 't'))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 't'))
  for text in docs[:20]:
    assert hf(text, truncation=True, max_length=64)['input_ids'] == ours.encode([text], 64)[0][0]
  capsys.readouterr()
  args = ['--input', f'text:{root}/part*.txt', '--tokenizer', str(root / 'tok'), '--out', str(root / 'rec')]
  assert prepare_data.main(args) == 0
  assert '0 shards written (4 already there)' in capsys.readouterr().out
  assert train_tokenizer.main(['--input', f'text:{tmp_path}/none*.txt', '--out', str(tmp_path / 'u')]) == 2
