"""Classification and regression examples on tf.data: text (or text pairs) with a label.

  label_set(spec, ...)         the sorted labels of a training source (read once)
  classify_dataset(spec, ...)  tokenized, padded batches {input_ids, attention_mask,
                               token_type_ids, labels, weights}

Labels are strings mapped to ids through the label set; a label outside it stops the run with
one error naming the source and the field. With `regression=True` the label is a float.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from jaxlm.data import pretrain, sources
from jaxlm.errors import UsageError
from jaxlm.tokenizer import Tokenizer


def _fields(data_cfg: dict) -> sources.Fields:
  return sources.Fields(
    text=data_cfg.get('text_field') or 'text',
    text_pair=data_cfg.get('text_pair_field') or '',
    label=data_cfg.get('label_field') or 'label',
  )


def _records(spec: str, data_cfg: dict, key: str, split: str | None = None) -> tf.data.Dataset:
  split = split or data_cfg.get('eval_split' if key == 'data.eval' else 'train_split', 'train')
  return sources.records(
    spec, key, _fields(data_cfg), tfds_split=split, tfds_data_dir=data_cfg.get('tfds_data_dir') or None
  )


def label_set(spec: str, data_cfg: dict, key: str = 'data.train') -> list[str]:
  """Every distinct label of a source, sorted (numerically when all are integers)."""
  with sources.usage_errors(f'{key}={spec!r}'):
    labels = {bytes(r).decode() for r in _records(spec, data_cfg, key).map(lambda r: r['label']).as_numpy_iterator()}
  if not labels:
    raise UsageError(f'{key}={spec!r}: no examples')
  if all(s.lstrip('-').isdigit() for s in labels):
    return sorted(labels, key=int)
  return sorted(labels)


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
  fields = _fields(data_cfg)
  recs = _records(spec, data_cfg, key, split)
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
    return ids, types, out

  def batch_fn(b):
    pair = b['text_pair'] if fields.text_pair else b['text']
    ids, types, y = tf.numpy_function(
      encode, [b['text'], pair, b['label']], [tf.int32, tf.int32, tf.float32], stateful=False
    )
    ids, types = tf.ensure_shape(ids, [None, seq_len]), tf.ensure_shape(types, [None, seq_len])
    y = tf.ensure_shape(y, [None])
    return {
      'input_ids': ids, 'token_type_ids': types, 'attention_mask': tf.cast(ids != pad, tf.int32),
      'labels': y if labels is None else tf.cast(y, tf.int32), 'weights': tf.ones_like(y),
    }  # fmt: skip

  if repeat:
    recs = recs.repeat()
  if shuffle_buffer:
    recs = recs.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  recs = recs.shard(process_count, process_index)
  local = global_batch_size // process_count
  return recs.batch(local, drop_remainder=repeat).map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def eval_batches(
  spec: str, tokenizer: Tokenizer, *, labels: list[str] | None, seq_len: int, global_batch_size: int,
  data_cfg: dict, process_index: int, process_count: int, split: str | None = None, key: str = 'data.eval',
) -> tuple[list[dict], int]:  # fmt: skip
  """(this process's batches of the whole eval set, number of real examples), read once.

  Every host reads the set and keeps its rows of each global batch, so all hosts run the same
  number of batches; the rows that pad the last one have weight 0 and count nowhere.
  """
  ds = classify_dataset(
    spec, tokenizer, labels=labels, seq_len=seq_len, global_batch_size=256, data_cfg=data_cfg, key=key, split=split,
  )  # fmt: skip
  parts = list(pretrain.Iterator(ds))
  if not parts:
    raise UsageError(f'{key}={spec!r}: no examples' + (f' in split {split!r}' if split else ''))
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  n = len(rows['labels'])
  total = -(-n // global_batch_size) * global_batch_size
  for k, v in rows.items():  # Padding rows repeat the first example (a valid input) with weight 0.
    rows[k] = np.concatenate([v, np.repeat(v[:1], total - n, axis=0)])
  rows['weights'][n:] = 0.0
  local = global_batch_size // process_count
  batches = []
  for start in range(0, total, global_batch_size):
    lo = start + process_index * local
    batches.append({k: v[lo : lo + local] for k, v in rows.items()})
  return batches, n
