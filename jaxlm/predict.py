"""Batch inference over a file: `python -m jaxlm.predict --checkpoint PATH --input FILE --output OUT.jsonl`.

  --checkpoint  anything jaxlm.load reads: a Hugging Face BERT directory, a training workdir,
                a checkpoint step, a jaxlm export (float or int8)
  --mode        classify   {"label": ..., "probabilities": {label: p}}, or {"score": x} for regression
                fill-mask  {"masks": [[{"token", "token_str", "score", "sequence"} x top_k] per [MASK]]}
                embed      {"embedding": [...]} (--pooling mean | cls, --normalize)
  --input       .txt (one text per line, every line counts), .jsonl (one object per non-blank
                line), .csv / .tsv (a header row); the text is in --text_field, and the second
                segment of a pair in --text_pair_field. --format overrides the extension.

The input is read lazily, a window of a few batches at a time (sorted by length inside the
window, so batches pad little), and one JSON line per input is written in input order as it
goes, with a progress bar on stderr and the examples/s at the end. Bad input (a missing file or
field, a fill-mask text without [MASK], a mode the model has no head for) is one line
`error: ...` on stderr and exit code 2. Imports neither TensorFlow nor the training code.
"""

from __future__ import annotations

if __name__ == '__main__':  # Before JAX is imported: huge pages for XLA's CPU buffers (hostenv.py).
  from jaxlm import hostenv

  hostenv.reexec_with_hugepages()

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator

from jaxlm.errors import UsageError

FORMATS = ('txt', 'jsonl', 'csv', 'tsv')
MODES = ('classify', 'fill-mask', 'embed')
_EXTENSIONS = {'.txt': 'txt', '.text': 'txt', '.jsonl': 'jsonl', '.ndjson': 'jsonl', '.json': 'jsonl',
               '.csv': 'csv', '.tsv': 'tsv'}  # fmt: skip
WINDOW_BATCHES = 8  # Batches read, length-sorted and run together.


def input_format(path: str, fmt: str | None) -> str:
  """The input format: `fmt` if given, else from the file extension."""
  if fmt:
    return fmt
  ext = os.path.splitext(path)[1].lower()
  if ext not in _EXTENSIONS:
    raise UsageError(f'{path}: cannot tell the format from the extension {ext!r}; pass --format {"|".join(FORMATS)}')
  return _EXTENSIONS[ext]


def _text(value, where: str, field: str) -> str:
  if not isinstance(value, str):
    raise UsageError(f'{where}: field {field!r} is {type(value).__name__}, not a string')
  return value


def read_inputs(path: str, fmt: str, text_field: str = 'text', pair_field: str | None = None) -> Iterator:
  """(line number, text or (text, pair)) per input, read lazily from `path`."""
  if not os.path.isfile(path):
    raise UsageError(f'{path}: no such file')
  with open(path, encoding='utf-8', newline='' if fmt in ('csv', 'tsv') else None) as f:
    if fmt == 'txt':
      for n, line in enumerate(f, 1):
        yield n, line.rstrip('\r\n')
    elif fmt == 'jsonl':
      for n, line in enumerate(f, 1):
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
        text = _text(rec[text_field], where, text_field)
        yield n, (text, _text(rec[pair_field], where, pair_field)) if pair_field else text
    else:
      reader = csv.DictReader(f, delimiter=',' if fmt == 'csv' else '\t')
      columns = reader.fieldnames or []
      for field in (text_field, pair_field):
        if field and field not in columns:
          raise UsageError(f'{path}: no column {field!r} (columns: {", ".join(map(repr, columns)) or "none"})')
      for rec in reader:
        n = reader.line_num
        for field in (text_field, pair_field):
          if field and rec.get(field) is None:
            raise UsageError(f'{path}:{n}: the row has no value for column {field!r}')
        yield n, (rec[text_field], rec[pair_field]) if pair_field else rec[text_field]


def _count(path: str, fmt: str) -> int | None:
  """Number of inputs for the progress bar (one fast pass over the bytes); None for CSV / TSV."""
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
  return len(x) if isinstance(x, str) else len(x[0]) + len(x[1])


def _run(predictor, mode: str, inputs: list, args) -> list[dict]:
  """One output record per input, for inputs of one window."""
  if mode == 'classify':
    return predictor.predict(inputs)
  if mode == 'embed':
    vecs = predictor.embed(inputs, pooling=args.pooling, normalize=args.normalize)
    return [{'embedding': [float(f'{x:.7g}') for x in v]} for v in vecs]
  out = []
  for res in predictor.fill_mask(inputs, top_k=args.top_k):
    masks = [res] if res and isinstance(res[0], dict) else res
    out.append({'masks': masks})
  return out


def predict_file(predictor, args) -> int:
  """Streams `args.input` through the predictor into `args.output`; returns the number of inputs."""
  from tqdm import tqdm

  fmt = input_format(args.input, args.format)
  records = read_inputs(args.input, fmt, args.text_field, args.text_pair_field)
  mask = predictor.tokenizer.mask_token
  n = 0
  out = sys.stdout if args.output == '-' else open(args.output, 'w', encoding='utf-8')
  try:
    with tqdm(total=_count(args.input, fmt), unit='ex', file=sys.stderr, dynamic_ncols=True) as bar:
      for window in _windows(records, args.batch_size * WINDOW_BATCHES):
        if args.mode == 'fill-mask':
          for line, x in window:
            if not any(mask in t for t in ([x] if isinstance(x, str) else x)):
              raise UsageError(f'{args.input}:{line}: no {mask} in the text')
        order = sorted(range(len(window)), key=lambda i: _length(window[i][1]))
        results = _run(predictor, args.mode, [window[i][1] for i in order], args)
        by_input = [None] * len(window)
        for i, res in zip(order, results):
          by_input[i] = res
        out.writelines(json.dumps(r) + '\n' for r in by_input)
        out.flush()
        n += len(window)
        bar.update(len(window))
  finally:
    if out is not sys.stdout:
      out.close()
  return n


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='HF dir, training workdir, checkpoint step or jaxlm export')
  p.add_argument('--input', required=True, help='.txt, .jsonl, .csv or .tsv file')
  p.add_argument('--output', required=True, help='JSON lines out, one per input ("-" = stdout)')
  p.add_argument('--mode', choices=MODES, default='classify', help='what to compute')
  p.add_argument('--format', choices=FORMATS, help='input format (default: from the extension)')
  p.add_argument('--text_field', default='text', help='JSONL field / CSV column holding the text')
  p.add_argument('--text_pair_field', help='JSONL field / CSV column holding the second segment')
  p.add_argument('--batch_size', type=int, default=32, help='inputs per forward pass')
  p.add_argument('--max_length', type=int, default=None, help='truncate to this many tokens (default 512)')
  p.add_argument('--top_k', type=int, default=5, help='fill-mask: fillers per [MASK]')
  p.add_argument('--pooling', choices=['mean', 'cls'], default='mean', help='embed: mean of tokens or [CLS]')
  p.add_argument('--normalize', action='store_true', help='embed: unit-length vectors')
  p.add_argument('--dtype', help='compute dtype (default: bfloat16 on TPU / GPU, float32 on CPU)')
  p.add_argument('--quantize', choices=['none', 'int8'], default='none', help='int8: quantize kernels on loading')
  args = p.parse_args(argv)
  try:
    if args.batch_size < 1:
      raise UsageError(f'--batch_size={args.batch_size}: must be at least 1')
    input_format(args.input, args.format)
    if not os.path.isfile(args.input):
      raise UsageError(f'{args.input}: no such file')
    from jaxlm import inference

    predictor = inference.load(args.checkpoint, dtype=args.dtype, batch_size=args.batch_size, quantize=args.quantize)
    if args.max_length:
      predictor.max_length = min(args.max_length, predictor.config.max_position_embeddings)
    if args.mode == 'classify' and not predictor.config.num_labels:
      raise UsageError(f'{args.checkpoint}: --mode classify needs a classifier head; this model has none')
    if args.mode == 'fill-mask' and not predictor.config.mlm_head:
      raise UsageError(f'{args.checkpoint}: --mode fill-mask needs an MLM head; this model has none')
    t0 = time.perf_counter()
    n = predict_file(predictor, args)
    seconds = time.perf_counter() - t0
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{n} examples in {seconds:.1f}s: {n / max(seconds, 1e-9):.1f} examples/s -> {args.output}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
