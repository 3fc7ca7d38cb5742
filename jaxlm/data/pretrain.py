"""Masked-LM pretraining examples on tf.data: documents -> tokens -> packed sequences -> masks.

  text_records(spec)  the records of a source (sources.py) with the data config's field names
  pretrain_dataset(...)  tokenized, packed into [CLS] A [SEP] (B [SEP]) sequences of seq_len,
                     shuffled, dynamically masked (80% [MASK] / 10% random / 10% kept), this
                     process's share of every global batch, batched
  document_ids(...)  segment and position ids of the documents packed into one sequence
                     (data.separate_documents: no attention across documents)

Every sequence gets a global index before the per-process split, and its masks are drawn
from (seed, index): the same seed gives the same batches whatever the number of hosts, and
a later epoch masks the same text differently. Tokenizing is one Rust call per 256
documents; packing and masking are tf.data graph ops.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from jaxlm.data import sources
from jaxlm.errors import UsageError
from jaxlm.tokenizer import Tokenizer

_TOKENIZE_BATCH = 256


class Stats:
  """Counters the pipeline keeps on the host (e.g. texts with undecodable bytes, replaced)."""

  undecodable = 0


def text_records(spec: str, cfg: dict | None = None, key: str = 'data.train', file_shard=None) -> tf.data.Dataset:
  """The records of a source, with the field names and options of a data config dict."""
  cfg = cfg or {}
  fields = sources.Fields(text=cfg.get('text_field') or 'text')
  return sources.records(
    spec, key, fields, text_docs=cfg.get('text_docs', 'line'), file_shard=file_shard,
    split=sources.split_for(cfg, key), tfds_data_dir=cfg.get('tfds_data_dir') or None,
  )  # fmt: skip


def _decode(b: bytes) -> str:
  try:
    return b.decode('utf-8')
  except UnicodeDecodeError:
    Stats.undecodable += 1
    return b.decode('utf-8', errors='replace')


def iter_texts(spec: str, cfg: dict | None = None, key: str = 'data.train'):
  """The documents of a text source as Python strings (for training a tokenizer)."""
  kind, arg = sources.split_spec(spec, key)
  if kind == 'builtin':
    if arg not in sources.BUILTIN:
      raise UsageError(f'{key}={spec!r}: unknown builtin corpus; expected one of {sorted(sources.BUILTIN)}')
    yield from sources.BUILTIN[arg]()
    return
  if kind == 'tfrecord':
    raise UsageError(f'{key}={spec!r}: pre-tokenized records hold no text to train a tokenizer on')
  with sources.usage_errors(f'{key}={spec!r}'):
    for rec in text_records(spec, cfg, key).as_numpy_iterator():
      yield _decode(rec['text'])


def token_stream(recs: tf.data.Dataset, tokenizer: Tokenizer, end_id: int | None = None) -> tf.data.Dataset:
  """One int32 token per element: every document's tokens followed by `end_id` ([SEP] by default; a causal
  LM's end-of-text, data/causal.py)."""
  backend = tokenizer.fresh_backend()  # Whole documents: no truncation.
  sep = tokenizer.sep_id if end_id is None else end_id
  if 'input_ids' in recs.element_spec:  # Pre-tokenized.
    return recs.map(lambda r: tf.concat([r['input_ids'], [sep]], 0)).unbatch()

  def encode(texts: np.ndarray) -> np.ndarray:
    encs = backend.encode_batch([_decode(t) for t in texts], add_special_tokens=False)
    out = [np.asarray(e.ids + [sep], np.int32) for e in encs if e.ids]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  ids = (
    recs.map(lambda r: r['text'])
    .batch(_TOKENIZE_BATCH)
    .map(
      lambda t: tf.ensure_shape(tf.numpy_function(encode, [t], tf.int32, stateful=False), [None]),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  )
  return ids.unbatch()


def check_options(nsp: bool, separate_documents: bool) -> None:
  """Raises UsageError for data.* options that cannot go together."""
  if nsp and separate_documents:
    raise UsageError('data.separate_documents=True cannot be combined with data.nsp=True: a next-sentence pair'
                     ' is one example across two segments, not separate documents')  # fmt: skip


def document_ids(body: tf.Tensor, seq_len: int, sep: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(segment_ids, position_ids), int32 [seq_len] each, of the packed row [CLS] body [SEP] + padding.

  A segment is the piece of one document in the row: 1, 2, ... in order, 0 on padding. Each
  document's [SEP] ends its segment; the row's leading [CLS] joins the first piece and its closing
  [SEP] the last. Positions restart at 0 where a segment starts (0 on padding)."""
  segs = 1 + tf.cumsum(tf.cast(body == sep, tf.int32), exclusive=True)
  segs = tf.concat([[1], segs, segs[-1:]], 0)
  index = tf.range(tf.shape(segs)[0])
  starts = tf.math.segment_min(index, segs)  # segs is sorted: where each segment begins.
  positions = index - tf.gather(starts, segs)
  fill = [[0, seq_len - tf.shape(segs)[0]]]
  return tf.pad(segs, fill), tf.pad(positions, fill)


def pack(stream: tf.data.Dataset, seq_len: int, tokenizer: Tokenizer, nsp: bool, seed: int,
         separate_documents: bool = False) -> tf.data.Dataset:  # fmt: skip
  """Fixed-length sequences {input_ids, token_type_ids[, nsp_labels]} from a token stream.

  With `separate_documents`, every sequence also gets `segment_ids` and `position_ids`
  (document_ids): the packing, and so the tokens of each sequence, stay the same."""
  check_options(nsp, separate_documents)
  cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
  if not nsp:  # The last, shorter sequence is padded, so no token is dropped.

    def one(x):
      ids = tf.concat([[cls], x, [sep]], 0)
      ids = tf.pad(ids, [[0, seq_len - tf.shape(ids)[0]]], constant_values=pad)
      out = {'input_ids': ids, 'token_type_ids': tf.zeros([seq_len], tf.int32)}
      if separate_documents:
        out['segment_ids'], out['position_ids'] = document_ids(x, seq_len, sep)
      return out

    return stream.batch(seq_len - 2).map(one)
  h = (seq_len - 3) // 2  # A and B get half each; an odd leftover position is padding.
  halves = stream.batch(h, drop_remainder=True)
  pairs = halves.batch(2, drop_remainder=True)
  randoms = halves.shuffle(4096, seed=seed + 1).repeat()

  def make(i, pair, rand):
    is_random = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), i])) < 0.5
    b = tf.where(is_random, rand, pair[1])
    ids = tf.concat([[cls], pair[0], [sep], b, [sep]], 0)
    n = 2 * h + 3
    ids = tf.pad(ids, [[0, seq_len - n]], constant_values=pad)
    types = tf.concat([tf.zeros([h + 2], tf.int32), tf.ones([h + 1], tf.int32), tf.zeros([seq_len - n], tf.int32)], 0)
    return {'input_ids': ids, 'token_type_ids': types, 'nsp_labels': tf.cast(is_random, tf.int32)}

  return tf.data.Dataset.zip((pairs.enumerate(), randoms)).map(lambda ip, r: make(ip[0], ip[1], r))


def continuation_table(tokenizer: Tokenizer) -> np.ndarray:
  """bool[vocab]: True for WordPiece continuations ('##...'), which belong to the previous word."""
  table = np.zeros(tokenizer.vocab_size, bool)
  for tok, i in tokenizer.backend.get_vocab().items():
    if tok.startswith('##') and i < len(table):
      table[i] = True
  return table


def mask_fn(tokenizer: Tokenizer, seq_len: int, max_predictions: int, mask_prob: float, seed: int,
            whole_word: bool = False):  # fmt: skip
  """A tf function (index, example) -> example with masks drawn from (seed, index).

  Chooses round(mask_prob * valid tokens) positions (at most max_predictions, never [CLS],
  [SEP] or padding); of those 80% become [MASK], 10% a random token, 10% stay. With
  `whole_word`, words are chosen rather than tokens, all of a word's WordPieces together
  (a word that would overflow max_predictions is left out).
  """
  vocab, P, T = tokenizer.vocab_size, max_predictions, seq_len
  special = tf.constant(sorted({tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id}), tf.int32)
  is_cont = tf.constant(continuation_table(tokenizer)) if whole_word else None

  def choose(ids, valid, n, seed1):
    """bool[T]: the positions to predict."""
    scores = tf.random.stateless_uniform([T], seed=seed1)
    if not whole_word:
      top = tf.math.top_k(tf.where(valid, scores, -1.0), k=P).indices
      return tf.scatter_nd(top[:, None], tf.range(P) < n, [T])
    after_valid = tf.concat([[False], valid[:-1]], 0)
    starts = valid & ~(tf.gather(is_cont, ids) & after_valid)  # First pieces ('##' after [CLS]/[SEP] too).
    word = tf.cumsum(tf.cast(starts, tf.int32)) - 1  # Word index of every position.
    word_len = tf.math.unsorted_segment_sum(tf.cast(valid, tf.int32), tf.maximum(word, 0), T)
    order = tf.math.top_k(tf.where(starts, scores, -1.0), k=P).indices  # Up to P words, random order.
    # Fewer words than P (a short last sequence): the rest of `order` are no starts, maybe [CLS] of word -1.
    order_words = tf.maximum(tf.gather(word, order), 0)
    lens = tf.where(tf.gather(starts, order), tf.gather(word_len, order_words), 0)
    keep_word = (tf.cumsum(lens) <= n) & (lens > 0)
    chosen_words = tf.scatter_nd(order_words[:, None], tf.cast(keep_word, tf.int32), [T]) > 0
    return valid & tf.gather(chosen_words, tf.maximum(word, 0))

  def apply(index, ex):
    ids = ex['input_ids']
    s1 = tf.stack([tf.cast(seed, tf.int64), index * 3])
    s2, s3 = s1 + [0, 1], s1 + [0, 2]
    valid = tf.logical_not(tf.reduce_any(ids[:, None] == special[None, :], axis=1))
    n_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    n = tf.cast(tf.round(tf.cast(n_valid, tf.float32) * mask_prob), tf.int32)
    n = tf.minimum(tf.minimum(P, tf.maximum(1, n)), n_valid)
    chosen = choose(ids, valid, n, s1)
    # Ascending positions of the chosen tokens, padded with 0 (weight 0).
    ranked = tf.math.top_k(tf.where(chosen, -tf.range(T), -T - 1), k=P)
    keep = ranked.values > -T - 1
    positions = tf.where(keep, -ranked.values, 0)
    labels = tf.gather(ids, positions)
    r = tf.random.stateless_uniform([P], seed=s2)
    random_ids = tf.random.stateless_uniform([P], seed=s3, minval=0, maxval=vocab, dtype=tf.int32)
    new = tf.where(r < 0.8, tokenizer.mask_id, tf.where(r < 0.9, random_ids, labels))
    masked = tf.tensor_scatter_nd_update(ids, tf.boolean_mask(positions, keep)[:, None], tf.boolean_mask(new, keep))
    out = dict(ex)
    out.update(
      input_ids=masked,
      attention_mask=tf.cast(ids != tokenizer.pad_id, tf.int32),
      masked_positions=positions,
      masked_ids=tf.where(keep, labels, 0),
      masked_weights=tf.cast(keep, tf.float32),
    )
    return out

  return apply


class Iterator:
  """Numpy batches from a dataset, with a position that can be saved and restored exactly.

  Uses tf.data iterator checkpointing: the state is the shuffle buffer and the input offsets
  (kilobytes to a few megabytes), never the data already read.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._it = iter(ds)
    self._ckpt = tf.train.Checkpoint(iterator=self._it)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    with sources.usage_errors():  # A UsageError raised inside a tokenizing map.
      return {k: v.numpy() for k, v in next(self._it).items()}

  def save(self, prefix: str) -> str | None:
    """Writes the iterator state under `prefix` (local or gs://); returns the checkpoint path.

    A source whose position cannot be serialised (one generated by Python code, such as
    TFDS mock data) gets a `<prefix>.unsaved` marker instead, and a warning: a resume from
    such a checkpoint restarts the input stream."""
    try:
      return self._ckpt.write(prefix)
    except tf.errors.FailedPreconditionError as e:
      if not getattr(self, '_warned', False):
        print(f'warning: the input position cannot be saved ({str(e).splitlines()[0][-60:]});'
              ' a resume restarts the input stream', flush=True)  # fmt: skip
        self._warned = True
      tf.io.gfile.makedirs(os.path.dirname(prefix))
      with tf.io.gfile.GFile(prefix + '.unsaved', 'w') as f:
        f.write('input position not serialisable\n')
      return None

  def restore(self, path: str) -> None:
    """Continues exactly where the iterator that wrote `path` was."""
    self._ckpt.read(path).assert_consumed()


def pretrain_dataset(
  spec: str,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  max_predictions: int,
  global_batch_size: int,
  mask_prob: float = 0.15,
  nsp: bool = False,
  whole_word: bool = False,
  separate_documents: bool = False,
  seed: int = 0,
  shuffle_buffer: int = 1000,
  process_index: int = 0,
  process_count: int = 1,
  repeat: bool = True,
  key: str = 'data.train',
  data_cfg: dict | None = None,
) -> tf.data.Dataset:
  """This process's batches of masked pretraining examples (global_batch_size / process_count rows).

  Hosts split the work by file when the source has at least one file per host (each reads
  only its files), otherwise by sequence: every host packs the whole stream and keeps every
  process_count-th sequence, so each sequence is used exactly once per epoch and the global
  batches are the same whatever the number of hosts. With `separate_documents` each sequence
  also holds `segment_ids` and `position_ids` (document_ids); its tokens and masks are unchanged.
  """
  check_options(nsp, separate_documents)
  if tokenizer.mask_id is None:
    raise UsageError(f'{tokenizer.source}: the vocabulary has no [MASK] token, which MLM needs')
  kind, _ = sources.split_spec(spec, key)
  by_file = sources.by_file(spec, key, process_count, sources.split_for(data_cfg, key))
  recs = text_records(spec, data_cfg, key, file_shard=(process_index, process_count) if by_file else None)
  seqs = pack(token_stream(recs, tokenizer), seq_len, tokenizer, nsp, seed, separate_documents)
  counted = Stats.undecodable
  with sources.usage_errors(f'{key}={spec!r}'):
    empty = next(iter(seqs.take(1)), None) is None
  Stats.undecodable = counted  # The peek above is not a read of the data.
  if empty:
    raise UsageError(f'{key}={spec!r}: not one full sequence of {seq_len} tokens; is the corpus empty?')
  if kind == 'builtin':
    seqs = seqs.cache()  # Small and fixed: keep it in memory after the first epoch.
  if repeat:
    seqs = seqs.repeat()
  if shuffle_buffer:
    seqs = seqs.shuffle(shuffle_buffer, seed=seed + (process_index if by_file else 0), reshuffle_each_iteration=True)
  mask_seed = seed + (1_000_003 * process_index if by_file else 0)
  seqs = seqs.enumerate().map(mask_fn(tokenizer, seq_len, max_predictions, mask_prob, mask_seed, whole_word),
                              tf.data.AUTOTUNE)  # fmt: skip
  if not by_file:
    seqs = seqs.shard(process_count, process_index)
  options = tf.data.Options()
  options.deterministic = True
  return seqs.batch(global_batch_size // process_count, drop_remainder=True).with_options(options).prefetch(2)


def eval_batches(
  spec: str, tokenizer: Tokenizer, *, seq_len: int, max_predictions: int, global_batch_size: int, mask_prob: float,
  nsp: bool, whole_word: bool, seed: int, process_index: int, process_count: int, data_cfg: dict | None = None,
  separate_documents: bool = False,
) -> list[dict]:  # fmt: skip
  """This process's share of the whole eval set, read once, as padded numpy batches.

  Every host gets the same number of batches; the rows that pad the last one have zero
  masked_weights (and nsp_weights), so they count nowhere in the metrics (and, with
  separate_documents, segment_ids of 0: padding only).
  """
  ds = pretrain_dataset(
    spec, tokenizer, seq_len=seq_len, max_predictions=max_predictions, global_batch_size=1, mask_prob=mask_prob,
    nsp=nsp, whole_word=whole_word, separate_documents=separate_documents, seed=seed, shuffle_buffer=0, repeat=False,
    key='data.eval', data_cfg=data_cfg,
  )  # fmt: skip
  rows = [{k: v[0] for k, v in b.items()} for b in Iterator(ds)]
  n = len(rows)
  total = -(-n // global_batch_size) * global_batch_size
  pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
  rows += [pad] * (total - n)
  if nsp:
    for i, r in enumerate(rows):
      r['nsp_weights'] = np.float32(i < n)
  local = global_batch_size // process_count
  batches = []
  for start in range(0, total, global_batch_size):
    mine = rows[start + process_index * local : start + (process_index + 1) * local]
    batches.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
  return batches
