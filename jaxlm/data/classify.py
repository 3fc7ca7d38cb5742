"""Classification and regression examples on tf.data: text (or text pairs) with a label.

  label_set(spec, ...)         the sorted labels of a training source (read once)
  bucket_lengths(data_cfg, T)  the lengths a batch may be padded to (data.bucket_lengths)
  classify_dataset(spec, ...)  tokenized, padded batches {input_ids, attention_mask,
                               token_type_ids, labels, weights}
  eval_batches(spec, ...)      the whole eval set, length-sorted, as this process's batches

Compute follows the real tokens: a batch is padded to the smallest bucket length that holds its
longest example, not to data.seq_len, so a run compiles one program per bucket (a handful). With
`data.length_window` > 1, the shuffled examples are sorted by length in windows of that many
global batches and the window's batches run in a random order: each batch holds examples of
similar length (fairseq's and transformers' group-by-length), while which examples share a
window, and the order of the batches, stay random. Every process reads the whole global batch and
keeps its rows, so all processes pad a step to the same length, and the batches of a step are
the same whatever the number of processes. The state of the pipeline (shuffle buffer, window)
is part of the tf.data iterator checkpoint, so a resume continues exactly.

Labels are strings mapped to ids through the label set; a label outside it stops the run with
one error naming the source and the field. With `regression=True` the label is a float.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from jaxlm.data import pretrain, sources
from jaxlm.errors import UsageError
from jaxlm.tokenizer import Tokenizer


def _fields(data_cfg: dict, regression: bool) -> sources.Fields:
  return sources.Fields(
    text=data_cfg.get('text_field') or 'text',
    text_pair=data_cfg.get('text_pair_field') or '',
    label=data_cfg.get('label_field') or 'label',
    label_role='number' if regression else 'class',
  )


def _records(
  spec: str, data_cfg: dict, key: str, split: str | None = None, regression: bool = False
) -> tf.data.Dataset:
  return sources.records(
    spec, key, _fields(data_cfg, regression), split=split or sources.split_for(data_cfg, key),
    tfds_data_dir=data_cfg.get('tfds_data_dir') or None,
  )  # fmt: skip


def label_set(spec: str, data_cfg: dict, key: str = 'data.train') -> list[str]:
  """Every distinct label of a source, sorted (numerically when all are integers)."""
  with sources.usage_errors(f'{key}={spec!r}'):
    labels = {bytes(r).decode() for r in _records(spec, data_cfg, key).map(lambda r: r['label']).as_numpy_iterator()}
  if not labels:
    raise UsageError(f'{key}={spec!r}: no examples')
  if all(s.lstrip('-').isdigit() for s in labels):
    return sorted(labels, key=int)
  return sorted(labels)


def bucket_lengths(data_cfg: dict, seq_len: int) -> tuple[int, ...]:
  """The ascending lengths a batch is padded to, seq_len the last: `data.bucket_lengths` is '' (16, 24,
  32, 48, 64, 96, ...: powers of two and 1.5 times them, below seq_len), 'none' (seq_len only) or
  comma-separated lengths."""
  spec = str(data_cfg.get('bucket_lengths') or '').strip()
  if spec == 'none':
    return (seq_len,)
  if not spec:
    lengths = [m << i for i in range(seq_len.bit_length()) for m in (16, 24) if m << i < seq_len]
  else:
    try:
      lengths = [int(x) for x in spec.split(',') if x.strip()]
    except ValueError:
      raise UsageError(f"data.bucket_lengths={spec!r}: expected '', 'none' or comma-separated lengths") from None
    bad = [n for n in lengths if n < 1 or n > seq_len]
    if bad or not lengths:
      raise UsageError(f'data.bucket_lengths={spec!r}: lengths must be between 1 and data.seq_len={seq_len}')
  return tuple(sorted({n for n in lengths if n < seq_len})) + (seq_len,)


def check_config(data_cfg: dict) -> None:
  """Raises UsageError naming the first bad length-bucketing key of a fine-tuning data config."""
  bucket_lengths(data_cfg, int(data_cfg['seq_len']))
  window = data_cfg.get('length_window', 1)
  if not isinstance(window, int) or window < 1:
    raise UsageError(f'data.length_window={window!r}: must be a positive integer (1 = no grouping by length)')


def padded_to(lengths, buckets: tuple[int, ...]):
  """The smallest bucket that holds the longest of `lengths` (a tf tensor)."""
  longest = tf.reduce_max(lengths)
  fits = tf.constant(buckets, tf.int32)
  return tf.reduce_min(tf.where(fits >= longest, fits, buckets[-1]))


def classify_dataset(
  spec: str,
  tokenizer: Tokenizer,
  *,
  labels: list[str] | None,
  seq_len: int,
  global_batch_size: int,
  data_cfg: dict,
  key: str = 'data.train',
  seed: int = 0,
  shuffle_buffer: int = 0,
  repeat: bool = False,
  process_index: int = 0,
  process_count: int = 1,
  split: str | None = None,
) -> tf.data.Dataset:
  """This process's share of padded classification batches; `labels=None` means regression."""
  fields = _fields(data_cfg, labels is None)
  recs = _records(spec, data_cfg, key, split, regression=labels is None)
  backend, pad = tokenizer.fresh_backend(truncation=seq_len), tokenizer.pad_id
  label_ids = {s: i for i, s in enumerate(labels or [])}
  where = f'{key}={spec!r}, field {fields.label!r}'

  def encode(text, pair, label):
    a = [pretrain._decode(t) for t in text]
    encs = backend.encode_batch(list(zip(a, [pretrain._decode(t) for t in pair])) if fields.text_pair else a)
    ids = np.full((len(a), seq_len), pad, np.int32)
    types = np.zeros((len(a), seq_len), np.int32)
    for r, e in enumerate(encs):
      ids[r, : len(e.ids)], types[r, : len(e.type_ids)] = e.ids, e.type_ids
    out = np.zeros(len(a), np.float32)
    for r, raw in enumerate(label):
      s = raw.decode()
      if labels is None:
        try:
          out[r] = float(s)
        except ValueError:
          raise UsageError(f'{where}: {s!r} is not a number (regression)') from None
      elif s not in label_ids:
        raise UsageError(f'{where}: label {s!r} is not in the label set {labels}')
      else:
        out[r] = label_ids[s]
    lengths = np.asarray([len(e.ids) for e in encs], np.int32)
    return ids, types, out, lengths

  def group(index, ids, types, y, lengths):
    """A window's examples sorted by length, cut into global batches that run in a random order."""
    order = np.argsort(lengths, kind='stable')
    starts = np.arange(0, len(order), global_batch_size)
    np.random.default_rng([seed, int(index)]).shuffle(starts)
    order = np.concatenate([order[i : i + global_batch_size] for i in starts])
    return ids[order], types[order], y[order], lengths[order]

  def window_fn(index, b):
    pair = b['text_pair'] if fields.text_pair else b['text']
    out = tf.numpy_function(
      encode, [b['text'], pair, b['label']], [tf.int32, tf.int32, tf.float32, tf.int32], stateful=False
    )
    if window > 1:
      out = tf.numpy_function(group, [index, *out], [tf.int32, tf.int32, tf.float32, tf.int32], stateful=False)
    ids, types, y, n = out
    return {'input_ids': tf.ensure_shape(ids, [None, seq_len]), 'token_type_ids': tf.ensure_shape(types, [None, seq_len]),
            'labels': tf.ensure_shape(y, [None]), 'length': tf.ensure_shape(n, [None])}  # fmt: skip

  def batch_fn(b):
    T = padded_to(b['length'], buckets)
    lo = process_index * local
    ids, types, y = (
      b['input_ids'][lo : lo + local, :T],
      b['token_type_ids'][lo : lo + local, :T],
      b['labels'][lo : lo + local],
    )
    return {
      'input_ids': ids, 'token_type_ids': types, 'attention_mask': tf.cast(ids != pad, tf.int32),
      'labels': y if labels is None else tf.cast(y, tf.int32), 'weights': tf.ones_like(y),
    }  # fmt: skip

  buckets = bucket_lengths(data_cfg, seq_len)
  window = data_cfg.get('length_window', 1) if repeat else 1
  local = global_batch_size // process_count
  if repeat:
    recs = recs.repeat()
  if shuffle_buffer:
    recs = recs.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  recs = recs.batch(global_batch_size * window, drop_remainder=repeat).enumerate()
  rows = recs.map(window_fn, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  options = tf.data.Options()
  options.deterministic = True
  batches = rows.batch(global_batch_size, drop_remainder=repeat).map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE)
  return batches.with_options(options).prefetch(2)


def eval_batches(
  spec: str, tokenizer: Tokenizer, *, labels: list[str] | None, seq_len: int, global_batch_size: int,
  data_cfg: dict, process_index: int, process_count: int, split: str | None = None, key: str = 'data.eval',
) -> tuple[list[dict], int]:  # fmt: skip
  """(this process's batches of the whole eval set, number of real examples), read once.

  The examples are sorted by length (metrics do not depend on their order) and each global batch
  is padded to its bucket length, so evaluation computes little padding. Every host reads the set
  and keeps its rows of each global batch, so all hosts run the same number of batches; the rows
  that pad the last one have weight 0 and count nowhere. `data.bucket_lengths='none'` keeps the
  file order and pads every batch to seq_len.
  """
  whole = {**data_cfg, 'bucket_lengths': 'none'}
  ds = classify_dataset(
    spec, tokenizer, labels=labels, seq_len=seq_len, global_batch_size=256, data_cfg=whole, key=key, split=split,
  )  # fmt: skip
  parts = list(pretrain.Iterator(ds))
  if not parts:
    raise UsageError(f'{key}={spec!r}: no examples' + (f' in split {split!r}' if split else ''))
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  n = len(rows['labels'])
  buckets = bucket_lengths(data_cfg, seq_len)
  if len(buckets) > 1:
    order = np.argsort(rows['attention_mask'].sum(1), kind='stable')
    rows = {k: v[order] for k, v in rows.items()}
  total = -(-n // global_batch_size) * global_batch_size
  for k, v in rows.items():  # Padding rows repeat the first example (a valid input) with weight 0.
    rows[k] = np.concatenate([v, np.repeat(v[:1], total - n, axis=0)])
  rows['weights'][n:] = 0.0
  local = global_batch_size // process_count
  batches = []
  for start in range(0, total, global_batch_size):
    longest = int(rows['attention_mask'][start : start + global_batch_size].sum(1).max())
    T = next(b for b in buckets if b >= longest)
    lo = start + process_index * local
    batches.append({k: v[lo : lo + local, :T] if v.ndim == 2 else v[lo : lo + local] for k, v in rows.items()})
  return batches, n
