"""Masked-LM pretraining examples on tf.data: documents -> tokens -> packed sequences -> masks.

  documents(spec)  builtin:NAME or text:GLOB (one document per line) as a dataset of strings
  pretrain_dataset(...)  tokenized, packed into [CLS] A [SEP] (B [SEP]) sequences of seq_len,
                     shuffled, dynamically masked (80% [MASK] / 10% random / 10% kept), this
                     process's share of every global batch, batched

Every sequence gets a global index before the per-process split, and its masks are drawn
from (seed, index): the same seed gives the same batches whatever the number of hosts, and
a later epoch masks the same text differently. Tokenizing is one Rust call per 256
documents; packing and masking are tf.data graph ops.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from jaxlm.data.builtin import BUILTIN
from jaxlm.errors import UsageError
from jaxlm.tokenizer import Tokenizer

_TOKENIZE_BATCH = 256


def document_list(spec: str) -> list[str] | None:
  """The documents of a builtin corpus (None for file sources)."""
  kind, _, name = spec.partition(':')
  if kind != 'builtin':
    return None
  if name not in BUILTIN:
    raise UsageError(f'{spec}: unknown builtin corpus; expected one of {sorted(BUILTIN)}')
  return BUILTIN[name]()


def documents(spec: str, key: str = 'data.train') -> tf.data.Dataset:
  """A dataset of document strings for `KIND:SPEC` (builtin:NAME or text:GLOB)."""
  kind, _, arg = spec.partition(':')
  if kind == 'builtin':
    return tf.data.Dataset.from_tensor_slices(document_list(spec))
  if kind == 'text':
    files = sorted(tf.io.gfile.glob(arg))
    if not files:
      raise UsageError(f'{key}={spec!r}: the glob matches no file')
    ds = tf.data.TextLineDataset(files).map(tf.strings.strip)
    return ds.filter(lambda s: tf.strings.length(s) > 0)
  raise UsageError(f'{key}={spec!r}: unknown source kind {kind!r}; expected builtin: or text:')


def iter_texts(spec: str, key: str = 'data.train'):
  """The documents of a source as Python strings (for training a tokenizer)."""
  docs = document_list(spec)
  if docs is not None:
    yield from docs
    return
  for t in documents(spec, key).as_numpy_iterator():
    yield t.decode('utf-8', errors='replace')


def token_stream(docs: tf.data.Dataset, tokenizer: Tokenizer) -> tf.data.Dataset:
  """One int32 token per element: every document's WordPieces followed by [SEP]."""
  backend, sep = tokenizer.backend, tokenizer.sep_id

  def encode(texts: np.ndarray) -> np.ndarray:
    encs = backend.encode_batch([t.decode('utf-8', errors='replace') for t in texts], add_special_tokens=False)
    out = [np.asarray(e.ids + [sep], np.int32) for e in encs if e.ids]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  ids = docs.batch(_TOKENIZE_BATCH).map(
    lambda t: tf.ensure_shape(tf.numpy_function(encode, [t], tf.int32, stateful=False), [None]),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return ids.unbatch()


def pack(stream: tf.data.Dataset, seq_len: int, tokenizer: Tokenizer, nsp: bool, seed: int) -> tf.data.Dataset:
  """Fixed-length sequences {input_ids, token_type_ids[, nsp_labels]} from a token stream."""
  cls, sep, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
  if not nsp:
    return stream.batch(seq_len - 2, drop_remainder=True).map(
      lambda x: {
        'input_ids': tf.concat([[cls], x, [sep]], 0),
        'token_type_ids': tf.zeros([seq_len], tf.int32),
      }
    )
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


def mask_fn(tokenizer: Tokenizer, seq_len: int, max_predictions: int, mask_prob: float, seed: int):
  """A tf function (index, example) -> example with masks drawn from (seed, index)."""
  vocab, P = tokenizer.vocab_size, max_predictions
  special = tf.constant(sorted({tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id}), tf.int32)

  def apply(index, ex):
    ids = ex['input_ids']
    s1 = tf.stack([tf.cast(seed, tf.int64), index * 3])
    s2, s3 = s1 + [0, 1], s1 + [0, 2]
    valid = tf.logical_not(tf.reduce_any(ids[:, None] == special[None, :], axis=1))
    n_valid = tf.reduce_sum(tf.cast(valid, tf.int32))
    n = tf.minimum(P, tf.maximum(1, tf.cast(tf.round(tf.cast(n_valid, tf.float32) * mask_prob), tf.int32)))
    n = tf.minimum(n, n_valid)
    scores = tf.where(valid, tf.random.stateless_uniform([seq_len], seed=s1), -1.0)
    # The n highest-scoring valid positions, ascending; unused slots (sorted to the end) point at 0.
    top = tf.math.top_k(scores, k=P).indices
    keep = tf.range(P) < n
    chosen = tf.sort(tf.where(keep, top, seq_len))  # Unused slots sort to the end.
    positions = tf.where(chosen < seq_len, chosen, 0)
    weights = tf.cast(keep, tf.float32)
    labels = tf.gather(ids, positions)
    r = tf.random.stateless_uniform([P], seed=s2)
    random_ids = tf.random.stateless_uniform([P], seed=s3, minval=0, maxval=vocab, dtype=tf.int32)
    new = tf.where(r < 0.8, tokenizer.mask_id, tf.where(r < 0.9, random_ids, labels))
    idx = tf.boolean_mask(positions, keep)[:, None]
    masked = tf.tensor_scatter_nd_update(ids, idx, tf.boolean_mask(new, keep))
    out = dict(ex)
    out.update(
      input_ids=masked,
      attention_mask=tf.cast(ids != tokenizer.pad_id, tf.int32),
      masked_positions=positions,
      masked_ids=tf.where(keep, labels, 0),
      masked_weights=weights,
    )
    return out

  return apply


def pretrain_dataset(
  spec: str,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  max_predictions: int,
  global_batch_size: int,
  mask_prob: float = 0.15,
  nsp: bool = False,
  seed: int = 0,
  shuffle_buffer: int = 1000,
  process_index: int = 0,
  process_count: int = 1,
  repeat: bool = True,
  key: str = 'data.train',
) -> tf.data.Dataset:
  """This process's batches of masked pretraining examples (global_batch_size / process_count rows)."""
  if tokenizer.mask_id is None:
    raise UsageError(f'{tokenizer.source}: the vocabulary has no [MASK] token, which MLM needs')
  local_batch = global_batch_size // process_count
  seqs = pack(token_stream(documents(spec, key), tokenizer), seq_len, tokenizer, nsp, seed).cache()
  if repeat:
    seqs = seqs.repeat()
  if shuffle_buffer:
    seqs = seqs.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  seqs = seqs.enumerate().map(mask_fn(tokenizer, seq_len, max_predictions, mask_prob, seed), tf.data.AUTOTUNE)
  seqs = seqs.shard(process_count, process_index)
  options = tf.data.Options()
  options.deterministic = True
  return seqs.batch(local_batch, drop_remainder=True).with_options(options).prefetch(tf.data.AUTOTUNE)
