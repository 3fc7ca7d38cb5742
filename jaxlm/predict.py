"""Batch inference over a file: `python -m jaxlm.predict --checkpoint PATH --input FILE --output OUT.jsonl`.

  --checkpoint  anything jaxlm.load reads: a Hugging Face BERT, GPT-2 or Llama directory, a training workdir,
                a checkpoint step, a jaxlm export (float or int8)
  --mode        classify   {"label": ..., "probabilities": {label: p}}, or {"score": x} for regression
                fill-mask  {"masks": [[{"token", "token_str", "score", "sequence"} x top_k] per [MASK]]}
                embed      {"embedding": [...]} (--pooling mean | cls, --normalize)
                generate   {"generated": "..."}, the continuation of each prompt, from a causal LM
                           (--max_new_tokens, --temperature, --top_k, --top_p, --seed, --stop)
                chat       {"generated": "..."}, the assistant's reply to each conversation, by the model's
                           chat template: a field (--text_field, default messages) holding a list of
                           {"role", "content"} messages (JSONL, or a Parquet / Arrow list column), or
                           a text (any format), one user message; --system puts a system message
                           first where a conversation has none; the generate flags apply
                score      {"nll": x, "tokens": n, "perplexity": p}, a causal LM's summed next-token
                           negative log-likelihood of each text (nats) and over how many tokens; with
                           --text_pair_field, of the continuation in that field given the text (-nll is
                           its log-probability, as multiple-choice tasks compare). The perplexity over
                           all tokens ends the run on stderr
  --input       .txt (one text per line, every line counts), .jsonl (one object per non-blank
                line), .csv / .tsv (a header row), .parquet; or, as in data.train, parquet:GLOB
                (Parquet files in name order) or hf:PATH (a Hugging Face save_to_disk directory; the
                split of a DatasetDict is --split, needed when it has several). The text is in
                --text_field, and the second segment of a pair in --text_pair_field. --format
                overrides the extension. Parquet and Arrow rows are numbered from 0 in messages.

The input is read lazily, a window of a few batches at a time (sorted by length inside the
window, so batches pad little), and one JSON line per input is written in input order as it
goes, with a progress bar on stderr and the examples/s at the end. The lines go to a temporary
file next to --output that replaces it only when the whole input succeeded: a failed run leaves
an existing --output as it was (`--output -` streams to stdout instead).

The input's format and first record, the output's directory and the flags are checked before
the model is loaded. Bad input (a missing file or field, --output naming the input, a fill-mask
text without [MASK], a mode the model has no head for) is one line `error: ...` on stderr and
exit code 2. Bytes that are not UTF-8 are replaced by U+FFFD and counted in one warning at the
end; a CSV / TSV row whose quoted field runs over several lines (legitimate, or an unterminated
quote swallowing the rows after it) is named in a warning. Imports neither TensorFlow nor the
training code.
"""

from __future__ import annotations

if __name__ == '__main__':  # Before JAX is imported: huge pages, the compilation cache (hostenv.py).
  from jaxlm import hostenv

  hostenv.reexec_with_hugepages()
  hostenv.compilation_cache_env()

import argparse
import contextlib
import csv
import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from jaxlm import chat, generate, inference, tables
from jaxlm.errors import UsageError

FORMATS = ('txt', 'jsonl', 'csv', 'tsv', 'parquet', 'hf')
MODES = ('classify', 'fill-mask', 'embed', 'generate', 'chat', 'score')
CAUSAL_MODES = ('generate', 'chat', 'score')
_EXTENSIONS = {'.txt': 'txt', '.text': 'txt', '.jsonl': 'jsonl', '.ndjson': 'jsonl', '.json': 'jsonl',
               '.csv': 'csv', '.tsv': 'tsv', '.parquet': 'parquet'}  # fmt: skip
WINDOW_BATCHES = 64  # Batches read, length-sorted and run together.


def input_format(path: str, fmt: str | None) -> str:
  """The input format: the KIND of a parquet: / hf: source, else `fmt` if given, else from the file extension
  (a directory: a saved Hugging Face dataset)."""
  kind, sep, _ = path.partition(':')
  if sep and kind in tables.KINDS:
    return kind
  if fmt:
    return fmt
  if os.path.isdir(path):
    return 'hf'
  ext = os.path.splitext(path)[1].lower()
  if ext not in _EXTENSIONS:
    raise UsageError(f'{path}: cannot tell the format from the extension {ext!r}; pass --format {"|".join(FORMATS)}')
  return _EXTENSIONS[ext]


def _text(value, where: str, field: str, messages: bool = False) -> str | list:
  if messages and isinstance(value, list):  # A conversation (chat), checked with the input's line.
    return value
  if not isinstance(value, str):
    raise UsageError(f'{where}: field {field!r} is {type(value).__name__}, not a string')
  return value


@dataclasses.dataclass
class ReadStats:
  """What reading an input noticed without stopping: undecodable bytes, CSV fields over several lines."""

  undecodable: int = 0  # Inputs with bytes that are not UTF-8 (replaced by U+FFFD).
  multiline: list = dataclasses.field(default_factory=list)  # (line, lines, column) per CSV / TSV row.


def _decoded(f, bad: list) -> Iterator[str]:
  """The lines of a binary file as text; a line that is not UTF-8 is decoded with U+FFFD and counted in bad[0]."""
  for raw in f:  # Split on b'\n' only, like _count: the line numbers stay those of the file.
    try:
      yield raw.decode('utf-8')
    except UnicodeDecodeError:
      bad[0] += 1
      yield raw.decode('utf-8', errors='replace')


def _tables(path: str, fmt: str, split: str | None) -> list[tables.Table]:
  """The files of a Parquet or saved Hugging Face input (`path` with or without its KIND: prefix)."""
  arg = path.removeprefix(f'{fmt}:')
  if fmt == 'hf':
    return tables.open_tables(fmt, tables.hf_files(arg, split, '--split'))
  paths = sorted(glob.glob(arg))
  if not paths:
    raise UsageError(f'{path}: no such file')
  return tables.open_tables(fmt, paths)


def read_inputs(
  path: str, fmt: str, text_field: str = 'text', pair_field: str | None = None, stats: ReadStats | None = None,
  split: str | None = None, messages: bool = False,
) -> Iterator:  # fmt: skip
  """(line number, text or (text, pair)) per input, read lazily from `path` (Parquet / Arrow: row number from
  0; `split`: of a saved DatasetDict); `stats` counts what was repaired. `messages`: a JSONL text field may
  also hold a list (a conversation)."""
  if fmt in tables.KINDS:
    found = _tables(path, fmt, split)
    roles = {text_field: 'messages' if messages else 'text', **({pair_field: 'text'} if pair_field else {})}
    tables.check_columns(found, roles)
    listed = messages and tables.is_list(found[0].schema.field(text_field).type)  # Conversations, as JSON text.
    for n, row in enumerate(tables.iter_text(found, roles)):
      yield n, json.loads(row[0]) if listed else (row[0], row[-1]) if pair_field else row[0]
    return
  if not os.path.isfile(path):
    raise UsageError(f'{path}: no such file')
  stats = stats if stats is not None else ReadStats()
  bad = [0]
  with open(path, 'rb') as f:
    lines = _decoded(f, bad)
    if fmt in ('txt', 'jsonl'):
      for n, line in enumerate(lines, 1):
        if bad[0]:  # This line had bytes that are not UTF-8.
          stats.undecodable += 1
          bad[0] = 0
        if fmt == 'txt':
          yield n, line.rstrip('\r\n')
          continue
        if not line.strip():
          continue
        where = f'{path}:{n}'
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise UsageError(f'{where}: not valid JSON ({e.msg})') from None
        if not isinstance(rec, dict):
          raise UsageError(f'{where}: expected a JSON object, got {type(rec).__name__}')
        for field in (text_field, pair_field):
          if field and field not in rec:
            raise UsageError(f'{where}: no field {field!r} (fields: {", ".join(map(repr, rec)) or "none"})')
        text = _text(rec[text_field], where, text_field, messages)
        yield n, (text, _text(rec[pair_field], where, pair_field)) if pair_field else text
    else:
      yield from _csv_rows(path, lines, fmt, text_field, pair_field, stats, bad)


def _csv_rows(path, lines: Iterable[str], fmt, text_field, pair_field, stats: ReadStats, bad: list) -> Iterator:
  reader = csv.reader(lines, delimiter=',' if fmt == 'csv' else '\t')
  try:
    columns = next(reader, None) or []
    for field in (text_field, pair_field):
      if field and field not in columns:
        raise UsageError(f'{path}: no column {field!r} (columns: {", ".join(map(repr, columns)) or "none"})')
    bad[0], last = 0, reader.line_num
    for row in reader:
      n, last = last + 1, reader.line_num  # A row starts on the line after the previous one ended.
      if not row:  # A blank line.
        continue
      if bad[0]:  # One of the row's lines had bytes that are not UTF-8.
        stats.undecodable += 1
        bad[0] = 0
      if last > n:  # The python csv module joins lines inside quotes; an unterminated quote takes the rest.
        split = [i for i, v in enumerate(row) if '\n' in v or '\r' in v]
        if split:
          column = columns[split[0]] if split[0] < len(columns) else f'#{split[0] + 1}'
          stats.multiline.append((n, last - n + 1, column))
      rec = dict(zip(columns, row))
      for field in (text_field, pair_field):
        if field and rec.get(field) is None:
          raise UsageError(f'{path}:{n}: the row has no value for column {field!r}')
      yield n, (rec[text_field], rec[pair_field]) if pair_field else rec[text_field]
  except csv.Error as e:  # A NUL byte, or a field over csv's size limit (an unterminated quote, often).
    raise UsageError(f'{path}:{reader.line_num}: not valid {fmt.upper()} ({e})') from None


def _count(path: str, fmt: str, split: str | None = None) -> int | None:
  """Number of inputs for the progress bar (one fast pass over the bytes, or the files' row counts); None for
  CSV / TSV."""
  if fmt in tables.KINDS:
    return sum(t.num_rows for t in _tables(path, fmt, split))
  if fmt not in ('txt', 'jsonl'):
    return None
  with open(path, 'rb') as f:
    return sum(1 for line in f if fmt == 'txt' or line.strip())


def _windows(records: Iterator, size: int) -> Iterator[list]:
  window = []
  for rec in records:
    window.append(rec)
    if len(window) == size:
      yield window
      window = []
  if window:
    yield window


def _length(x) -> int:
  if isinstance(x, list):  # A conversation.
    return sum(len(str(m)) for m in x)
  return len(x) if isinstance(x, str) else len(x[0]) + len(x[1])


def _conversation(x, system: str | None, where: str, predictor) -> list:
  """Input `x` of --mode chat as a conversation (a text is one user message), checked against the template."""
  conv = [{'role': 'user', 'content': x}] if isinstance(x, str) else chat.check_conversation(x, where)
  if system is not None and not (conv and conv[0].get('role') == 'system'):
    conv = [{'role': 'system', 'content': system}, *conv]
  tok = predictor.tokenizer
  chat.render(tok.chat_template, conv, getattr(tok, 'special_tokens', {}), where=where)  # Its refusal names the line.
  return conv


def _run(predictor, mode: str, inputs: list, args, names: list[str] | None = None) -> list[dict]:
  """One output record per input, for inputs of one window; `names`: what an error about an input calls it."""
  if mode == 'classify':
    return predictor.predict(inputs)
  if mode == 'embed':
    vecs = predictor.embed(inputs, pooling=args.pooling, normalize=args.normalize)
    return [{'embedding': [float(f'{x:.7g}') for x in v]} for v in vecs]
  if mode in ('generate', 'chat'):
    run = predictor.generate if mode == 'generate' else predictor.chat
    texts = run(inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or 0,
                top_p=args.top_p, seed=args.seed, stop=args.stop)  # fmt: skip
    return [{'generated': t} for t in texts]
  if mode == 'score':
    pairs = bool(inputs) and not isinstance(inputs[0], str)
    texts, tails = ([x[0] for x in inputs], [x[1] for x in inputs]) if pairs else (inputs, None)
    scores = predictor.score(texts, tails, names=names)
    return [{**s, 'perplexity': math.exp(s['nll'] / s['tokens'])} for s in scores]
  out = []
  for res in predictor.fill_mask(inputs, top_k=args.top_k or 5):
    masks = [res] if res and isinstance(res[0], dict) else res
    out.append({'masks': masks})
  return out


@contextlib.contextmanager
def output_file(path: str, input_path: str):
  """A text file to write `path` through: a temporary file next to it, renamed over it when the block
  succeeds and removed when it fails, so `path` is either the old file or the complete new one.
  "-" is stdout. `path` naming the input, a directory or an unwritable place is a UsageError,
  raised before anything is written."""
  if path == '-':
    yield sys.stdout
    return
  dest = os.path.realpath(path)  # Through a symlink: the file it points to is replaced, not the link.
  if os.path.isdir(dest):
    raise UsageError(f'--output {path}: is a directory')
  if os.path.exists(dest) and os.path.exists(input_path) and os.path.samefile(dest, input_path):
    raise UsageError(f'--output {path}: is the input file; write to another file')
  tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.tmp-{os.getpid()}')
  try:
    f = open(tmp, 'w', encoding='utf-8')
  except OSError as e:
    raise UsageError(f'--output {path}: cannot be written ({e.strerror})') from None
  try:
    yield f
    try:  # Only now, with every line written: the new file replaces the old one.
      f.flush()
      os.fsync(f.fileno())  # On disk before the rename: a crash leaves the old file or the new one.
      f.close()
      if os.path.exists(dest):
        shutil.copymode(dest, tmp)
      os.replace(tmp, dest)
    except OSError as e:
      raise UsageError(f'--output {path}: cannot be written ({e.strerror or e})') from None
  finally:
    f.close()
    if os.path.exists(tmp):
      os.remove(tmp)


def _warn(message: str) -> None:
  tqdm.write(f'warning: {message}', file=sys.stderr)  # Above the progress bar, not through it.


def _report(path: str, stats: ReadStats, named: int) -> int:
  """Warns about the rows of `stats.multiline` after the first `named`; returns how many are named now."""
  if named == 0 and stats.multiline:
    line, lines, column = stats.multiline[0]
    _warn(f'{path}:{line}: the quoted field {column!r} runs over {lines} lines (an unterminated quote?)')
    return 1
  return named


def predict_file(predictor, records: Iterable, out, args, stats: ReadStats | None = None) -> int:
  """Runs `records` (from read_inputs) through the predictor, one JSON line per input to `out`, in
  input order; returns the number of inputs."""
  stats = stats if stats is not None else ReadStats()
  mask = getattr(predictor.tokenizer, 'mask_token', None)
  n, named, nll, tokens = 0, 0, 0.0, 0
  try:
    fmt = input_format(args.input, args.format)
    with tqdm(total=_count(args.input, fmt, args.split), unit='ex', file=sys.stderr, dynamic_ncols=True) as bar:
      for window in _windows(records, args.batch_size * WINDOW_BATCHES):
        named = _report(args.input, stats, named)
        if args.mode == 'chat':
          window = [(line, _conversation(x, args.system, f'{args.input}:{line}', predictor)) for line, x in window]
        if args.mode == 'fill-mask':
          for line, x in window:
            if not any(mask in t for t in ([x] if isinstance(x, str) else x)):
              raise UsageError(f'{args.input}:{line}: no {mask} in the text')
        order = sorted(range(len(window)), key=lambda i: _length(window[i][1]))
        names = [f'{args.input}:{window[i][0]}' for i in order]
        results = _run(predictor, args.mode, [window[i][1] for i in order], args, names)
        if args.mode == 'score':
          nll, tokens = nll + sum(r['nll'] for r in results), tokens + sum(r['tokens'] for r in results)
        by_input = [None] * len(window)
        for i, res in zip(order, results):
          by_input[i] = res
        try:
          out.writelines(json.dumps(r) + '\n' for r in by_input)
          out.flush()
        except OSError as e:
          raise UsageError(f'--output {args.output}: cannot be written ({e.strerror or e})') from None
        n += len(window)
        bar.update(len(window))
  finally:  # Also when the run stops: what was repaired or suspicious so far.
    named = _report(args.input, stats, named)
    if len(stats.multiline) > named:
      more = stats.multiline[named:]
      lines = ', '.join(str(line) for line, _, _ in more[:5]) + (', ...' if len(more) > 5 else '')
      _warn(f'{args.input}: {len(more)} more row(s) with a quoted field over several lines (lines {lines})')
    if stats.undecodable:
      _warn(f'{stats.undecodable} input(s) had undecodable bytes (replaced by U+FFFD)')
  if tokens:
    tqdm.write(f'perplexity {math.exp(nll / tokens):.4f} over {tokens} tokens of {n} inputs', file=sys.stderr)
  return n


def _check_flags(args) -> None:
  if args.system is not None and args.mode != 'chat':
    raise UsageError(f'--system is for --mode chat, not --mode {args.mode}')
  for flag in ('batch_size', 'max_length', 'top_k', 'max_new_tokens'):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise UsageError(f'--{flag}={value}: must be at least 1')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='HF dir, training workdir, checkpoint step or jaxlm export')
  p.add_argument('--input', required=True, help='.txt, .jsonl, .csv, .tsv or .parquet file; parquet:GLOB; hf:PATH')
  p.add_argument('--output', required=True, help='JSON lines out, one per input ("-" = stdout)')
  p.add_argument('--mode', choices=MODES, default='classify', help='what to compute')
  p.add_argument('--format', choices=FORMATS, help='input format (default: from the extension)')
  p.add_argument('--split', help='hf: the split of a saved DatasetDict (needed when it has several)')
  p.add_argument('--text_field', help='JSONL field / CSV column holding the text (default: text; chat: messages)')
  p.add_argument('--text_pair_field', help='JSONL field / CSV column holding the second segment')
  p.add_argument('--batch_size', type=int, default=32, help='inputs per forward pass')
  p.add_argument('--max_length', type=int, default=None, help='truncate to this many tokens (default 512)')
  p.add_argument('--top_k', type=int, help='fill-mask: fillers per [MASK] (5); generate: sample from the k likeliest')
  p.add_argument('--max_new_tokens', type=int, default=64, help='generate: tokens per prompt at most')
  p.add_argument('--temperature', type=float, default=0.0, help='generate: 0 = greedy, else sampling')
  p.add_argument('--top_p', type=float, default=1.0, help='generate: nucleus sampling mass')
  p.add_argument('--seed', type=int, default=0, help='generate: sampling seed')
  p.add_argument('--stop', action='append', help='generate: a string that ends the continuation (repeatable)')
  p.add_argument('--system', help='chat: a system message for the conversations that have none')
  p.add_argument('--pooling', choices=['mean', 'cls'], default='mean', help='embed: mean of tokens or [CLS]')
  p.add_argument('--normalize', action='store_true', help='embed: unit-length vectors')
  p.add_argument('--dtype', help='compute dtype (default: bfloat16 on TPU / GPU, float32 on CPU)')
  p.add_argument('--quantize', choices=['none', 'int8'], default='none', help='int8: quantize kernels on loading')
  args = p.parse_args(argv)
  args.text_field = args.text_field or ('messages' if args.mode == 'chat' else 'text')
  try:
    _check_flags(args)
    fmt = input_format(args.input, args.format)
    stats = ReadStats()
    records = read_inputs(
      args.input, fmt, args.text_field, args.text_pair_field, stats, args.split, args.mode == 'chat'
    )
    # The first record now: a wrong format or field stops the run before the model is loaded.
    first = next(records, None)
    records = itertools.chain([first] if first is not None else [], records)
    with output_file(args.output, args.input) as out:
      predictor = inference.load(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size, quantize=args.quantize)
      causal = isinstance(predictor, generate.Generator)
      if causal != (args.mode in CAUSAL_MODES):
        raise UsageError(f'{args.checkpoint}: --mode {args.mode} needs ' + ('an encoder; this is a causal LM (--mode generate)'
                         if causal else 'a causal LM (GPT-2, Llama); this is an encoder'))  # fmt: skip
      if args.mode == 'chat' and predictor.tokenizer.chat_template is None:
        raise UsageError(f'{args.checkpoint}: --mode chat needs a chat template; the tokenizer has none (--mode generate'
                         ' takes prompts written out)')  # fmt: skip
      if args.max_length and not causal:
        predictor.max_length = min(args.max_length, predictor.config.max_position_embeddings)
      if args.mode == 'classify' and not predictor.config.num_labels:
        raise UsageError(f'{args.checkpoint}: --mode classify needs a classifier head; this model has none')
      if args.mode == 'fill-mask' and not predictor.config.mlm_head:
        raise UsageError(f'{args.checkpoint}: --mode fill-mask needs an MLM head; this model has none')
      t0 = time.perf_counter()
      n = predict_file(predictor, records, out, args, stats)
      seconds = time.perf_counter() - t0
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{n} examples in {seconds:.1f}s: {n / max(seconds, 1e-9):.1f} examples/s -> {args.output}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
