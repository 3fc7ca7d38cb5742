"""Causal language-model examples on tf.data: next-token prediction over documents, or prompt -> response pairs.

  token_stream(recs, tokenizer)  one token per element: every document's tokens followed by the
                                 end-of-text token (tokenizer.eos_id)
  document_ids(tokens, seq_len, eos)  segment and position ids of the documents in one row
  pack(stream, seq_len, ...)     the stream cut into rows of seq_len + 1 tokens (the last one padded):
                                 {input_ids, targets, loss_weights[, segment_ids, position_ids]}
  causal_dataset(spec, ...)      packed rows of a source, shuffled, this process's share of every
                                 global batch, batched
  eval_batches(spec, ...)        the whole eval set of causal_dataset, read once, as padded numpy batches
  sft_rows(recs, tokenizer, seq_len)  supervised fine-tuning: one prompt / response record per row,
                                 {input_ids, targets, loss_weights}, the loss on the response only
  chat_rows(recs, tokenizer, seq_len, key)  the same from conversations (data.messages_field), rendered by
                                 the tokenizer's chat template: the loss on the assistant messages
  pack_examples(examples, seq_len, pad)  several sft_rows / chat_rows examples a row, each attending only to
                                 itself (segment_ids, position_ids; data.pack_examples)
  sft_dataset(spec, ...)         sft_rows of a source (packed or not), shuffled, this process's share, batched; each
                                 batch cut to the smallest length bucket that holds its weighted targets
  sft_eval_batches(spec, ...)    the whole eval set of sft_dataset, read once, as padded numpy batches

A row x of seq_len + 1 tokens gives input_ids = x[:-1] and targets = x[1:] (int32 [seq_len]); loss_weights
(float32 [seq_len]) is 1.0 where the target is a real token and 0.0 on padding. Documents follow each other
in the rows, so a row may hold the end of one and the start of the next; with separate_documents the rows
also carry segment_ids and position_ids, so that no token attends to another document, and the target that
crosses from a document's end-of-text token to the next document has weight 0.

The per-process split, shuffling and determinism are pretrain.py's: hosts split a source by file when it
has at least one file per host, otherwise every host reads the whole stream and keeps every
process_count-th row, so the global batches are the same whatever the number of hosts.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from jaxlm import chat
from jaxlm.data import classify, pretrain, sources
from jaxlm.errors import UsageError
from jaxlm.tokenizer import Tokenizer

_TOKENIZE_BATCH = 256
_PACK_GROUP = 256  # pack_examples fills rows from the examples of each run of this many consecutive ones.


def _eos(tokenizer: Tokenizer) -> int:
  if tokenizer.eos_id is None:
    raise UsageError(f'{tokenizer.source}: the tokenizer has no end-of-text token, which causal LM data needs'
                     ' (train one with tools/train_tokenizer.py --kind bpe)')  # fmt: skip
  tokenizer.encode_plain([])  # Makes its backend now, not in the parallel calls of a tf.data map.
  return tokenizer.eos_id


def token_stream(recs: tf.data.Dataset, tokenizer: Tokenizer) -> tf.data.Dataset:
  """One int32 token per element: every document's tokens followed by the end-of-text token."""
  return pretrain.token_stream(recs, tokenizer, _eos(tokenizer))


def document_ids(tokens: tf.Tensor, seq_len: int, eos: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(segment_ids, position_ids), int32 [seq_len] each, of a row's input tokens (at most seq_len, then padding).

  A segment is the piece of one document in the row, its end-of-text token included: 1, 2, ... in order,
  0 on padding. Positions restart at 0 where a segment starts (0 on padding)."""
  segs = 1 + tf.cumsum(tf.cast(tokens == eos, tf.int32), exclusive=True)
  index = tf.range(tf.shape(segs)[0])
  starts = tf.math.segment_min(index, segs)  # segs is sorted: where each segment begins.
  positions = index - tf.gather(starts, segs)
  fill = [[0, seq_len - tf.shape(segs)[0]]]
  return tf.pad(segs, fill), tf.pad(positions, fill)


def pack(stream: tf.data.Dataset, seq_len: int, eos: int, pad: int, separate_documents: bool) -> tf.data.Dataset:
  """Examples {input_ids, targets, loss_weights[, segment_ids, position_ids]} from a token stream cut into rows
  of seq_len + 1 tokens; the last row is padded (a last single token, which predicts nothing, is dropped)."""

  def one(row):
    n = tf.shape(row)[0]
    ids = tf.pad(row, [[0, seq_len + 1 - n]], constant_values=pad)
    inputs = ids[:-1]
    real = tf.range(seq_len) + 1 < n  # Targets that are tokens of the row.
    out = {'input_ids': inputs, 'targets': ids[1:]}
    if separate_documents:
      real &= inputs != eos  # The target after a document's end is the next document's first token.
      out['segment_ids'], out['position_ids'] = document_ids(row[:seq_len], seq_len, eos)
    out['loss_weights'] = tf.cast(real, tf.float32)
    return out

  return stream.batch(seq_len + 1).filter(lambda r: tf.shape(r)[0] > 1).map(one, num_parallel_calls=tf.data.AUTOTUNE)


def _need(ex):
  """The positions of a row the loss reads: up to its last weighted target (0 if none)."""
  w = ex['loss_weights']
  return tf.reduce_max(tf.where(w > 0, tf.range(1, tf.shape(w)[0] + 1), 0))


def _share(examples: tf.data.Dataset, *, spec: str, key: str, empty: str, by_file: bool, cache: bool, seed: int,
           shuffle_buffer: int, repeat: bool, global_batch_size: int, process_index: int,
           process_count: int, buckets: tuple[int, ...] = ()) -> tf.data.Dataset:  # fmt: skip
  """This process's batches of `examples`: checked for emptiness (the error says `empty`), cached, repeated,
  shuffled with the seed and shared between the processes as pretrain.pretrain_dataset does. With `buckets`
  (several lengths; every process reading every example, not by file), every process batches the same
  global batches, keeps its rows, and cuts them to the smallest bucket that holds every row's weighted
  targets: the positions after them change no loss (causal attention), so the loss is the uncut one."""
  if global_batch_size % process_count:
    raise UsageError(f'global_batch_size={global_batch_size} is not a multiple of the {process_count} processes')
  counted = pretrain.Stats.undecodable
  with sources.usage_errors(f'{key}={spec!r}'):
    none = next(iter(examples.take(1)), None) is None
  pretrain.Stats.undecodable = counted  # The peek above is not a read of the data.
  if none:
    raise UsageError(f'{key}={spec!r}: {empty}')
  if cache:
    examples = examples.cache()  # Small and fixed: kept in memory after the first epoch.
  if repeat:
    examples = examples.repeat()
  if shuffle_buffer:
    examples = examples.shuffle(shuffle_buffer, seed=seed + (process_index if by_file else 0),
                                reshuffle_each_iteration=True)  # fmt: skip
  local = global_batch_size // process_count
  if len(buckets) > 1:
    lo = process_index * local

    def cut(b):
      T = classify.padded_to(b.pop('need'), buckets)
      return {k: v[lo : lo + local, :T] for k, v in b.items()}

    batches = examples.map(lambda ex: {**ex, 'need': _need(ex)}).batch(global_batch_size, drop_remainder=True).map(cut)
  else:
    if not by_file:
      examples = examples.shard(process_count, process_index)
    batches = examples.batch(local, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return batches.with_options(options).prefetch(2)


def causal_dataset(
  spec: str,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int = 0,
  separate_documents: bool = False,
  shuffle_buffer: int = 1000,
  process_index: int = 0,
  process_count: int = 1,
  repeat: bool = True,
  key: str = 'data.train',
  data_cfg: dict | None = None,
) -> tf.data.Dataset:
  """This process's batches (global_batch_size / process_count rows) of next-token examples: input_ids, targets
  (int32 [B, seq_len]), loss_weights (float32) and, with `separate_documents`, segment_ids and position_ids."""
  by_file = sources.by_file(spec, key, process_count, sources.split_for(data_cfg, key))
  recs = pretrain.text_records(spec, data_cfg, key, file_shard=(process_index, process_count) if by_file else None)
  eos = _eos(tokenizer)
  examples = pack(token_stream(recs, tokenizer), seq_len, eos, tokenizer.pad_id, separate_documents)
  return _share(
    examples, spec=spec, key=key, empty='no tokens; is the corpus empty?', by_file=by_file,
    cache=sources.split_spec(spec, key)[0] == 'builtin', seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
    global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
  )  # fmt: skip


def _whole(ds: tf.data.Dataset, global_batch_size: int, process_index: int, process_count: int,
           buckets: tuple[int, ...] = ()) -> list[dict]:  # fmt: skip
  """This process's share of the rows of a one-row-per-batch dataset, padded with zero rows to whole global
  batches (weight 0 and segment 0 there: they count nowhere). With `buckets`, the rows are sorted by the
  positions their loss reads and each global batch is cut to the smallest bucket that holds them (_share)."""
  found = [{k: v[0] for k, v in b.items()} for b in pretrain.Iterator(ds)]
  need = lambda r: int(np.flatnonzero(r['loss_weights'])[-1]) + 1 if r['loss_weights'].any() else 0  # noqa: E731
  if len(buckets) > 1:
    found.sort(key=need)  # The metrics are sums: the order changes none.
  n = len(found)
  total = -(-n // global_batch_size) * global_batch_size
  pad = {k: np.zeros_like(v) for k, v in found[0].items()}
  found += [pad] * (total - n)
  local = global_batch_size // process_count
  batches = []
  for start in range(0, total, global_batch_size):
    longest = max(need(r) for r in found[start : start + global_batch_size])
    T = next((b for b in buckets if b >= longest), None) if len(buckets) > 1 else None
    mine = found[start + process_index * local : start + (process_index + 1) * local]
    batches.append({k: np.stack([r[k] for r in mine])[:, :T] for k in mine[0]})
  return batches


def eval_batches(
  spec: str, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int, process_index: int, process_count: int,
  separate_documents: bool = False, data_cfg: dict | None = None,
) -> list[dict]:  # fmt: skip
  """This process's share of the whole eval set of causal_dataset, read once, as padded numpy batches; every
  host gets the same number of batches."""
  ds = causal_dataset(
    spec, tokenizer, seq_len=seq_len, global_batch_size=1, separate_documents=separate_documents, shuffle_buffer=0,
    repeat=False, key='data.eval', data_cfg=data_cfg,
  )  # fmt: skip
  return _whole(ds, global_batch_size, process_index, process_count)


def sft_rows(recs: tf.data.Dataset, tokenizer: Tokenizer, seq_len: int) -> tf.data.Dataset:
  """Examples {input_ids, targets, loss_weights} from {text: prompt, text_pair: response} records: prompt tokens,
  response tokens and the end-of-text token, cut to seq_len + 1 and padded. Only targets that are response
  tokens or the end-of-text token weigh 1; an example cut before its response is dropped."""
  eos, pad = _eos(tokenizer), tokenizer.pad_id

  def encode(prompts: np.ndarray, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ps = tokenizer.encode_plain([pretrain._decode(t) for t in prompts])
    rs = tokenizer.encode_plain([pretrain._decode(t) for t in responses])
    ids = np.full((len(ps), seq_len + 1), pad, np.int32)
    weights = np.zeros((len(ps), seq_len), np.float32)
    for k, (p, r) in enumerate(zip(ps, rs)):
      x = (p + r + [eos])[: seq_len + 1]
      ids[k, : len(x)] = x
      weights[k, max(len(p) - 1, 0) : len(x) - 1] = 1.0  # Position i predicts x[i + 1].
    return ids, weights

  def batch(b):
    ids, weights = tf.numpy_function(encode, [b['text'], b['text_pair']], [tf.int32, tf.float32], stateful=False)
    ids, weights = tf.ensure_shape(ids, [None, seq_len + 1]), tf.ensure_shape(weights, [None, seq_len])
    return {'input_ids': ids[:, :-1], 'targets': ids[:, 1:], 'loss_weights': weights}

  examples = recs.batch(_TOKENIZE_BATCH).map(batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return examples.filter(lambda ex: tf.reduce_any(ex['loss_weights'] > 0))


def chat_tokens(conversations: list[str], tokenizer: Tokenizer, key: str) -> list[tuple[list[int], list[bool]]]:
  """(ids, assistant) per conversation (JSON text of a list of messages): the tokens of its text by the tokenizer's
  chat template, tokenized as transformers' apply_chat_template does, and whether each lies in an assistant
  message (chat.assistant_spans, by the tokens' character offsets)."""
  texts, spans = [], []
  for raw in conversations:
    where = f'{key}: the conversation {raw[:60]!r}'
    try:
      conv = json.loads(raw)
    except json.JSONDecodeError as e:
      raise UsageError(f'{where}: not JSON ({e.msg}); data.messages_field holds a list of messages') from None
    text, s = chat.assistant_spans(tokenizer.chat_template, conv, tokenizer.special_tokens, where)
    texts.append(text)
    spans.append(s)
  out = []
  for enc, s in zip(tokenizer.backend.encode_batch(texts, add_special_tokens=False), spans):
    out.append((enc.ids, [any(a <= start < b for a, b in s) for start, _ in enc.offsets]))
  return out


def chat_rows(recs: tf.data.Dataset, tokenizer: Tokenizer, seq_len: int, key: str) -> tf.data.Dataset:
  """Examples {input_ids, targets, loss_weights} from {text: conversation} records (chat_tokens), cut to seq_len + 1
  tokens and padded. The targets that are tokens of an assistant message weigh 1 (no end-of-text is added: the
  template ends each turn); a conversation cut before any assistant token is dropped."""
  pad = tokenizer.pad_id

  def encode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = chat_tokens([pretrain._decode(t) for t in raw], tokenizer, key)
    ids = np.full((len(rows), seq_len + 1), pad, np.int32)
    weights = np.zeros((len(rows), seq_len), np.float32)
    for k, (x, assistant) in enumerate(rows):
      x, assistant = x[: seq_len + 1], assistant[: seq_len + 1]
      ids[k, : len(x)] = x
      weights[k, : len(x) - 1] = assistant[1:]  # Position i predicts x[i + 1].
    return ids, weights

  def batch(b):
    ids, weights = tf.numpy_function(encode, [b['text']], [tf.int32, tf.float32], stateful=False)
    ids, weights = tf.ensure_shape(ids, [None, seq_len + 1]), tf.ensure_shape(weights, [None, seq_len])
    return {'input_ids': ids[:, :-1], 'targets': ids[:, 1:], 'loss_weights': weights}

  examples = recs.batch(_TOKENIZE_BATCH).map(batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return examples.filter(lambda ex: tf.reduce_any(ex['loss_weights'] > 0))


def pack_examples(examples: tf.data.Dataset, seq_len: int, pad: int) -> tf.data.Dataset:
  """Rows of several examples each ({input_ids, targets, loss_weights}, as sft_rows / chat_rows make them): from
  each run of _PACK_GROUP consecutive examples, every example in turn goes, whole, into the first row with room
  for its positions up to its last weighted target (first fit). The rows also carry segment_ids (1, 2, ... per
  example, 0 on padding) and position_ids (from 0 in each example), so that an example attends only to itself,
  at the positions it has alone: its loss is the one it has alone in a row. The same examples give the same rows."""

  def pack(ids: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    need = [int(np.flatnonzero(w)[-1]) + 1 for w in weights]  # Every example has a weighted target (filtered).
    rows: list[list[int]] = []
    room: list[int] = []
    for k, n in enumerate(need):
      r = next((i for i, left in enumerate(room) if left >= n), len(rows))
      if r == len(rows):
        rows.append([])
        room.append(seq_len)
      rows[r].append(k)
      room[r] -= n
    shape = (len(rows), seq_len)
    out = (np.full(shape, pad, np.int32), np.full(shape, pad, np.int32), np.zeros(shape, np.float32),
           np.zeros(shape, np.int32), np.zeros(shape, np.int32))  # fmt: skip
    for r, members in enumerate(rows):
      at = 0
      for segment, k in enumerate(members, 1):
        n, span = need[k], slice(at, at + need[k])
        out[0][r, span], out[1][r, span], out[2][r, span] = ids[k, :n], targets[k, :n], weights[k, :n]
        out[3][r, span], out[4][r, span] = segment, np.arange(n)
        at += n
    return out

  def group(b):
    keys = ('input_ids', 'targets', 'loss_weights', 'segment_ids', 'position_ids')
    packed = tf.numpy_function(pack, [b['input_ids'], b['targets'], b['loss_weights']],
                               [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32], stateful=False)  # fmt: skip
    return {k: tf.ensure_shape(v, [None, seq_len]) for k, v in zip(keys, packed)}

  return examples.batch(_PACK_GROUP).map(group).unbatch()


def _sft_records(spec: str, key: str, prompt_field: str, response_field: str, data_cfg: dict | None,
                 file_shard=None, messages_field: str = '') -> tf.data.Dataset:  # fmt: skip
  kind, _ = sources.split_spec(spec, key)
  if kind in ('builtin', 'tfrecord'):
    raise UsageError(
      f'{key}={spec!r}: supervised fine-tuning reads prompt / response records (jsonl, csv, tsv, parquet, hf, tfds)'
    )
  fields = sources.Fields(text=prompt_field, text_pair=response_field)
  if messages_field:
    fields = sources.Fields(text=messages_field, text_role='messages')
  return sources.records(
    spec, key, fields, file_shard=file_shard,
    split=sources.split_for(data_cfg, key), tfds_data_dir=(data_cfg or {}).get('tfds_data_dir') or None,
  )  # fmt: skip


def sft_dataset(
  spec: str,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int = 0,
  prompt_field: str = 'prompt',
  response_field: str = 'response',
  messages_field: str = '',
  buckets: tuple[int, ...] = (),
  pack: bool = False,
  shuffle_buffer: int = 1000,
  process_index: int = 0,
  process_count: int = 1,
  repeat: bool = True,
  key: str = 'data.train',
  data_cfg: dict | None = None,
) -> tf.data.Dataset:
  """This process's batches of supervised fine-tuning examples, one prompt / response record a row (sft_rows), or
  one conversation (chat_rows) with `messages_field`: input_ids, targets (int32 [B, seq_len], or [B, T] cut to
  a length of `buckets`, _share) and loss_weights (float32, 1 on the response's or the assistant's targets). With
  `pack`, several examples a row (pack_examples) and their segment_ids and position_ids."""
  by_file = len(buckets) <= 1 and sources.by_file(spec, key, process_count, sources.split_for(data_cfg, key))
  recs = _sft_records(spec, key, prompt_field, response_field, data_cfg,
                      (process_index, process_count) if by_file else None, messages_field)  # fmt: skip
  if messages_field:
    rows = chat_rows(recs, tokenizer, seq_len, key)
    empty = f'no {messages_field!r} conversation with an assistant token within seq_len={seq_len}'
  else:
    rows = sft_rows(recs, tokenizer, seq_len)
    empty = f'no {prompt_field!r} / {response_field!r} example with a response token within seq_len={seq_len}'
  if pack:
    rows = pack_examples(rows, seq_len, tokenizer.pad_id)
  return _share(
    rows, spec=spec, key=key, by_file=by_file, cache=False, seed=seed, empty=empty, buckets=buckets,
    shuffle_buffer=shuffle_buffer, repeat=repeat, global_batch_size=global_batch_size, process_index=process_index,
    process_count=process_count,
  )  # fmt: skip


def sft_eval_batches(
  spec: str, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int, process_index: int, process_count: int,
  prompt_field: str = 'prompt', response_field: str = 'response', messages_field: str = '',
  buckets: tuple[int, ...] = (), data_cfg: dict | None = None,
) -> list[dict]:  # fmt: skip
  """This process's share of the whole eval set of sft_dataset, read once, as padded numpy batches (cut to the
  lengths of `buckets`, _whole)."""
  ds = sft_dataset(
    spec, tokenizer, seq_len=seq_len, global_batch_size=1, prompt_field=prompt_field, response_field=response_field,
    messages_field=messages_field, shuffle_buffer=0, repeat=False, key='data.eval', data_cfg=data_cfg,
  )  # fmt: skip
  return _whole(ds, global_batch_size, process_index, process_count, buckets)
