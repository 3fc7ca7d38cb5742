"""Tokenize a corpus once into sharded TFRecords that `data.train=tfrecord:GLOB` reads.

  python tools/prepare_data.py --input 'text:/data/wiki/*.txt' --tokenizer /runs/tok --out /data/wiki-tok

One output shard per input file (`part-00000-of-00042.tfrecord`), written in parallel over
files, each to a temporary name and renamed when complete: a rerun skips finished shards, so
an interrupted run restarts where it stopped. Each record is one document's WordPiece ids
(`input_ids`, no special tokens); packing and masking happen at training time, so every epoch
is masked afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time

SHARD = 'part-{:05d}-of-{:05d}.tfrecord'


def _write_shard(job) -> tuple[str, int, int]:
  """Tokenizes one input file into one shard; returns (shard, documents, tokens)."""
  index, count, path, kind, tokenizer_path, out, data_cfg = job
  import tensorflow as tf

  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.data import pretrain

  target = os.path.join(out, SHARD.format(index, count))
  if tf.io.gfile.exists(target):
    return target, -1, -1
  tok = tokenizer_lib.load(tokenizer_path).backend
  docs = n_tok = 0
  tmp = target + '.tmp'
  with tf.io.TFRecordWriter(tmp) as w:
    texts = list(pretrain.iter_texts(f'{kind}:{path}', data_cfg, key='--input'))
    for start in range(0, len(texts), 512):
      for enc in tok.encode_batch(texts[start : start + 512], add_special_tokens=False):
        if not enc.ids:
          continue
        feat = tf.train.Feature(int64_list=tf.train.Int64List(value=enc.ids))
        w.write(tf.train.Example(features=tf.train.Features(feature={'input_ids': feat})).SerializeToString())
        docs, n_tok = docs + 1, n_tok + len(enc.ids)
  tf.io.gfile.rename(tmp, target, overwrite=True)
  return target, docs, n_tok


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--input', required=True, help='KIND:GLOB of text, jsonl, csv, tsv or parquet files')
  p.add_argument('--tokenizer', required=True, help='tokenizer directory or tokenizer.json')
  p.add_argument('--out', required=True, help='output directory (local or gs://)')
  p.add_argument('--text_field', default='text', help='field / column of the text (jsonl, csv, tsv, parquet)')
  p.add_argument('--text_docs', default='line', choices=['line', 'blank_line'], help='documents in text files')
  p.add_argument('--workers', type=int, default=os.cpu_count(), help='parallel processes')
  args = p.parse_args(argv)

  from jaxlm.errors import UsageError

  try:
    import tensorflow as tf
    from tqdm import tqdm

    from jaxlm.config import split_spec
    from jaxlm.data import sources
    from jaxlm.tokenizer import load

    kind, _ = split_spec(args.input, '--input')
    if kind not in ('text', 'jsonl', 'csv', 'tsv', 'parquet'):
      raise UsageError(f'--input={args.input!r}: expected text:, jsonl:, csv:, tsv: or parquet: files')
    paths = sources.files(args.input, '--input')
    load(args.tokenizer)  # Fails early and clearly.
    tf.io.gfile.makedirs(args.out)
    cfg = {'text_field': args.text_field, 'text_docs': args.text_docs}
    jobs = [(i, len(paths), path, kind, args.tokenizer, args.out, cfg) for i, path in enumerate(paths)]
    todo = [j for j in jobs if not tf.io.gfile.exists(os.path.join(args.out, SHARD.format(j[0], j[1])))]
    t0, docs, toks, skipped = time.perf_counter(), 0, 0, len(jobs) - len(todo)
    workers = max(1, min(args.workers, len(todo)))
    # Worker processes only for shards still to write, and only more than one: each one starts a Python.
    with multiprocessing.get_context('spawn').Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
      done = pool.imap_unordered(_write_shard, todo) if pool else map(_write_shard, todo)
      for _, d, n in tqdm(done, total=len(todo), unit='file'):
        if d < 0:  # Finished by another run since.
          skipped += 1
        else:
          docs, toks = docs + d, toks + n
    dt = time.perf_counter() - t0
    print(f'{len(jobs) - skipped} shards written ({skipped} already there): {docs} documents, {toks} tokens,'
          f' {toks / max(dt, 1e-9):,.0f} tokens/s -> {args.out}')  # fmt: skip
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
