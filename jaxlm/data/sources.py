"""Where examples come from: `KIND:SPEC` strings as tf.data datasets.

  builtin:NAME    the offline corpus of builtin.py (documents)
  text:GLOB       plain text: one document per line, or (data.text_docs='blank_line')
                  documents separated by blank lines
  jsonl:GLOB      one JSON object per line; fields named by data.text_field / text_pair_field /
                  label_field
  csv:GLOB        comma-separated with a header row naming the columns
  tsv:GLOB        tab-separated with a header row
  parquet:GLOB    Parquet files (the Hugging Face Hub's shards, pandas, Spark); columns named as
                  JSONL's fields, read a row group at a time (tables.py)
  hf:PATH         a dataset saved by Hugging Face `datasets`' save_to_disk: a Dataset, or a
                  DatasetDict whose split is data.train_split / data.eval_split, as for tfds
  tfrecord:GLOB   pre-tokenized documents written by tools/prepare_data.py (`input_ids`)
  tfds:NAME       a TensorFlow Datasets dataset (split, data_dir from the config; gs:// works)

Every path goes through tf.io.gfile (Parquet and Arrow files through pyarrow's file systems),
so gs:// works like a local path. Text sources yield dicts of tf.string (`text`, optionally
`text_pair` and `label`); tfrecord yields `input_ids`. Parquet and Arrow rows are read in slices
of tables.SLICE rows by (file, first row), so their position, like every other source's, is
part of the tf.data iterator checkpoint. Nothing here uses Python generators, so the iterators
stay checkpointable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import tensorflow as tf

from jaxlm import tables
from jaxlm.config import split_spec
from jaxlm.data.builtin import BUILTIN
from jaxlm.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Fields:
  """Names of the fields a record source reads."""

  text: str = 'text'
  text_pair: str = ''
  label: str = ''
  label_role: str = 'any'  # What a Parquet / Arrow label column may hold (tables.py): 'class', 'number', 'any'.
  text_role: str = 'text'  # 'messages': the text field holds a conversation, read as JSON text (tables.py).


TEXT_DOCS = ('line', 'blank_line')
FILE_KINDS = ('text', 'jsonl', 'csv', 'tsv', 'tfrecord', 'parquet', 'hf')  # Sources that hosts can split by file.


def check_config(d) -> None:
  """Raises UsageError naming the first bad data.* source key: data.train, data.eval, data.text_docs."""
  split_spec(d.train, 'data.train')  # Also catches the empty default of the pretraining configs.
  if d.eval:
    split_spec(d.eval, 'data.eval')
  if d.text_docs not in TEXT_DOCS:
    raise UsageError(f'data.text_docs={d.text_docs!r}: expected line or blank_line')


def split_for(cfg: dict | None, key: str) -> str:
  """The split (tfds:, hf:) of the source under `key`: data.eval_split for data.eval, else data.train_split."""
  return (cfg or {}).get('eval_split' if key == 'data.eval' else 'train_split', 'train')


def files(spec: str, key: str, split: str = 'train') -> list[str]:
  """The sorted files a file source names (an hf: split's Arrow files, in order); an error naming the key if
  there are none."""
  kind, arg = split_spec(spec, key)
  if kind == 'hf':
    return tables.hf_files(arg, split, 'data.eval_split' if key == 'data.eval' else 'data.train_split')
  found = sorted(tf.io.gfile.glob(arg))
  if not found:
    raise UsageError(f'{key}={spec!r}: the glob matches no file')
  return found


def by_file(spec: str, key: str, process_count: int, split: str = 'train') -> bool:
  """Whether the hosts split the source by file (a file source with at least one file per host) rather than
  every host reading all of it."""
  kind, _ = split_spec(spec, key)
  return process_count > 1 and kind in FILE_KINDS and len(files(spec, key, split)) >= process_count


def _read_header(path: str, delim: str, key: str) -> list[str]:
  with tf.io.gfile.GFile(path, 'r') as f:
    header = f.readline().rstrip('\r\n')
  if not header:
    raise UsageError(f'{path} ({key}): empty file, expected a header row')
  return header.split(delim)


def _column(header: list[str], name: str, path: str, key: str) -> int:
  if name not in header:
    raise UsageError(f'{path} ({key}): no column {name!r}; the header has {header}')
  return header.index(name)


@contextlib.contextmanager
def usage_errors(where: str = 'the input'):
  """Turns what TensorFlow raises for bad input data into one UsageError: a UsageError raised inside
  a tf.data map (wrapped in an OpError) as itself, a CSV / TSV quote left open naming `where`."""
  try:
    yield
  except tf.errors.OpError as e:
    msg = str(e)
    if 'UsageError: ' in msg:
      raise UsageError(msg.split('UsageError: ', 1)[1].split('\n')[0].strip()) from None
    if isinstance(e, tf.errors.InvalidArgumentError) and 'quote' in msg:
      detail = msg.split('}}', 1)[-1].split('[Op:')[0].strip()
      raise UsageError(
        f'{where}: a quoted CSV / TSV field is never closed (an unterminated quote?): {detail}'
      ) from None
    raise


def _jsonl_fields(line: bytes, names: tuple[str, ...], where: str) -> list[bytes]:
  try:
    obj = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f'{where}: not valid JSON ({e}): {line[:80]!r}') from None
  if not isinstance(obj, dict):
    raise UsageError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  out = []
  for n in names:
    if n not in obj:
      raise UsageError(f'{where}: no field {n!r} (the record has {sorted(obj)})')
    v = obj[n]
    if isinstance(v, (list, dict)):  # A conversation (data.messages_field): as JSON text.
      v = json.dumps(v, ensure_ascii=False)
    out.append(str(v).encode() if not isinstance(v, str) else v.encode('utf-8', errors='replace'))
  return out


def _table_records(kind: str, paths: list[str], spec: str, key: str, names: tuple[str, ...],
                   out_keys: tuple[str, ...], roles: dict[str, str]) -> tf.data.Dataset:  # fmt: skip
  """The rows of Parquet or Arrow files as records: slices of tables.SLICE rows named by (file, first row),
  read in order and flattened, so that the iterator checkpoint holds a slice at most."""
  found = tables.open_tables(kind, paths)
  tables.check_columns(found, roles, key)
  if not any(t.num_rows for t in found):
    where = paths[0] if len(paths) == 1 else f'{key}={spec!r} ({len(paths)} files)'
    raise UsageError(f'{where}: no rows')
  columns = list(roles)

  def read(i, start):
    got = tables.read_text(found[int(i)], roles, int(start), tables.SLICE)
    return [got[columns.index(n)] for n in names]

  def slice_records(i, start):
    got = tf.numpy_function(read, [i, start], [tf.string] * len(names), stateful=False)
    return {k: tf.ensure_shape(x, [None]) for k, x in zip(out_keys, got)}

  sizes = tf.data.Dataset.from_tensor_slices((np.arange(len(found)), np.asarray([t.num_rows for t in found])))
  starts = sizes.flat_map(lambda i, n: tf.data.Dataset.range(0, n, tables.SLICE).map(lambda s: (i, s)))
  return starts.map(slice_records).unbatch()


def records(
  spec: str, key: str, fields: Fields, *, text_docs: str = 'line', file_shard: tuple[int, int] | None = None,
  split: str = 'train', tfds_data_dir: str | None = None,
) -> tf.data.Dataset:  # fmt: skip
  """A dataset of {'text'[, 'text_pair'][, 'label']} tf.string records (or {'input_ids'} for tfrecord).

  `file_shard=(index, count)` keeps every count-th file from index: one host's disjoint share. `split`
  is the tfds: split, or the split of an hf: DatasetDict.
  """
  kind, arg = split_spec(spec, key)
  names = tuple(n for n in (fields.text, fields.text_pair, fields.label) if n)
  out_keys = ('text',) + (('text_pair',) if fields.text_pair else ()) + (('label',) if fields.label else ())
  if kind == 'builtin':
    if arg not in BUILTIN:
      raise UsageError(f'{key}={spec!r}: unknown builtin corpus; expected one of {sorted(BUILTIN)}')
    return tf.data.Dataset.from_tensor_slices({'text': BUILTIN[arg]()})
  if kind == 'tfds':
    import tensorflow_datasets as tfds  # lazy: only tfds: sources need it (0.35 s of every start otherwise)

    try:
      ds = tfds.load(arg, split=split, data_dir=tfds_data_dir, shuffle_files=False)
    except Exception as e:  # noqa: BLE001 (tfds raises many types for a missing dataset)
      raise UsageError(f'{key}={spec!r}: cannot load split {split!r}: {e}'.splitlines()[0]) from e
    missing = [n for n in names if n not in ds.element_spec]
    if missing:
      raise UsageError(f'{key}={spec!r}: no field {missing[0]!r}; it has {sorted(ds.element_spec)}')
    return ds.map(lambda ex: {k: tf.strings.as_string(ex[n]) if ex[n].dtype != tf.string else ex[n]
                              for k, n in zip(out_keys, names)})  # fmt: skip
  paths = files(spec, key, split)
  if file_shard is not None:
    paths = paths[file_shard[0] :: file_shard[1]]
  if kind in tables.KINDS:
    roles = {fields.text: fields.text_role, fields.text_pair: 'text', fields.label: fields.label_role}
    return _table_records(kind, paths, spec, key, names, out_keys, {n: r for n, r in roles.items() if n})
  if kind == 'tfrecord':
    feats = {'input_ids': tf.io.VarLenFeature(tf.int64)}
    parse = lambda r: {
      'input_ids': tf.cast(tf.sparse.to_dense(tf.io.parse_single_example(r, feats)['input_ids']), tf.int32)
    }
    return tf.data.TFRecordDataset(paths).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  if kind == 'text':
    if text_docs == 'blank_line':
      whole = tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file)
      docs = whole.flat_map(lambda t: tf.data.Dataset.from_tensor_slices(tf.strings.split(t, '\n\n')))
      docs = docs.map(lambda d: tf.strings.strip(tf.strings.regex_replace(d, r'\s*\n\s*', ' ')))
    else:
      docs = tf.data.TextLineDataset(paths).map(tf.strings.strip)
    return docs.filter(lambda s: tf.strings.length(s) > 0).map(lambda s: {'text': s})
  if kind == 'jsonl':
    per_file = []
    for p in paths:
      with tf.io.gfile.GFile(p, 'rb') as f:  # The first record is checked here, for one clear error.
        first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), None)
      if first is not None:
        _jsonl_fields(first[1], names, f'{p}:{first[0]}')
      # Numbered lines, so that a bad record later in the file is named by its line.
      lines = tf.data.TextLineDataset(p).enumerate(start=1)
      lines = lines.filter(lambda n, s: tf.strings.length(tf.strings.strip(s)) > 0)
      fn = lambda n, line, p=p: tf.numpy_function(
        lambda n, b: _jsonl_fields(b, names, f'{p}:{n}'), [n, line], [tf.string] * len(names), stateful=False
      )
      per_file.append(
        lines.map(lambda n, line, fn=fn: dict(zip(out_keys, [tf.ensure_shape(x, []) for x in fn(n, line)])))
      )
    ds = per_file[0]
    for d in per_file[1:]:
      ds = ds.concatenate(d)
    return ds
  if kind in ('csv', 'tsv'):
    delim = ',' if kind == 'csv' else '\t'
    per_file = []
    for p in paths:
      header = _read_header(p, delim, key)
      cols = [_column(header, n, p, key) for n in names]
      ds = tf.data.experimental.CsvDataset(
        p, [tf.string] * len(cols), header=True, field_delim=delim, select_cols=cols, use_quote_delim=kind == 'csv'
      )
      order = np.argsort(np.argsort(cols))  # CsvDataset returns columns in file order.
      per_file.append(ds.map(lambda *xs, order=order: {k: xs[i] for k, i in zip(out_keys, order)}))
    ds = per_file[0]
    for d in per_file[1:]:
      ds = ds.concatenate(d)
    return ds
  raise AssertionError(kind)
