"""Parquet files and datasets saved by Hugging Face `datasets` (`save_to_disk`), read with pyarrow.

  hf_files(path, split, split_key)  the Arrow files of a saved Dataset, or of one split of a DatasetDict
  open_tables(kind, paths)          a Table (schema, row count) per file: kind 'parquet' or 'hf'
  check_columns(tables, roles, key) an error naming the file and column that is missing or of the wrong type
  read_text(table, roles, start, n) rows [start, start + n) of some columns, every value as UTF-8 bytes
  iter_text(tables, roles)          every row, in file order, as a tuple of str

Files are read a row group (Parquet) or a record batch (Arrow) at a time, never whole: read_text
continues a cursor where the last read of that file ended, so reading a file slice after slice
decodes each row group once, and a read from anywhere (a resumed run) skips whole row groups to it.
Values come out as text, as JSONL's do: strings as they are, numbers and booleans written out, a
`datasets` ClassLabel id as its class name. A column's role says what it may hold: 'text'
(strings), 'class' (strings, integers, booleans), 'number' (integers, floats) or 'any'.

No TensorFlow here: jaxlm.predict reads these files too; data/sources.py wraps them in tf.data.
Paths may be local or URIs (gs://, s3://) through pyarrow's file systems.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pyarrow import types as pat

from jaxlm.errors import UsageError

KINDS = ('parquet', 'hf')
SLICE = 128  # Rows per read_text call of iter_text (and of the tf.data source, data/sources.py).
_ROLES = {  # role: (what it takes, in words; the test on a column's type)
  'text': ('strings', lambda t: _is_string(t)),
  'class': ('strings, integers or booleans', lambda t: _is_string(t) or pat.is_integer(t) or pat.is_boolean(t)),
  'number': ('integers or floats', lambda t: pat.is_integer(t) or pat.is_floating(t)),
  'any': ('strings, numbers or booleans',
          lambda t: _is_string(t) or pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t)),
  'messages': ('lists of {role, content} messages, or their JSON text',
               lambda t: _is_string(t) or is_list(t)),
}  # fmt: skip


def is_list(t: pa.DataType) -> bool:
  return pat.is_list(t) or pat.is_large_list(t)


def _is_string(t: pa.DataType) -> bool:
  if pat.is_dictionary(t):
    t = t.value_type
  return pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t)


def _open(path: str) -> pa.NativeFile:
  """A random-access file: memory-mapped when local, through pyarrow's file system for a URI."""
  try:
    if '://' in path:
      fs, inner = pafs.FileSystem.from_uri(path)
      return fs.open_input_file(inner)
    return pa.memory_map(path)
  except (FileNotFoundError, pa.ArrowException, OSError) as e:
    raise UsageError(f'{path}: cannot be opened ({str(e).splitlines()[0]})') from None


def _json(path: str) -> dict | None:
  """The JSON object in `path`, or None if there is no such file."""
  try:
    if '://' in path:
      fs, inner = pafs.FileSystem.from_uri(path)
      if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
      with fs.open_input_stream(inner) as f:
        return json.loads(f.read())
    with open(path, 'rb') as f:
      return json.loads(f.read())
  except (FileNotFoundError, NotADirectoryError):
    return None
  except ValueError as e:  # Not JSON (or not UTF-8).
    raise UsageError(f'{path}: not valid JSON ({e})') from None


def hf_files(path: str, split: str | None, split_key: str) -> list[str]:
  """The Arrow files, in order, of a dataset saved by `save_to_disk`: the split `split` of a DatasetDict (None:
  its only split), or a Dataset's own (the split is not used). Errors name `split_key` (what sets the split)."""
  root = path.rstrip('/')
  splits = (_json(f'{root}/dataset_dict.json') or {}).get('splits')
  where = root
  if splits is not None:
    if split is None and len(splits) == 1:
      split = splits[0]
    if split is None:
      raise UsageError(f'{root}: a saved DatasetDict with the splits {splits}; choose one with {split_key}')
    if split not in splits:
      raise UsageError(f'{root}: no split {split!r} ({split_key}); the saved DatasetDict has {splits}')
    where = f'{root}/{split}'
  state = _json(f'{where}/state.json')
  if state is None or '_data_files' not in state:
    raise UsageError(f"{where}: not a dataset saved by datasets' save_to_disk (no dataset_dict.json or state.json)")
  if not state['_data_files']:  # save_to_disk writes no Arrow file for an empty split.
    raise UsageError(f'{where}: no rows ({split_key}: an empty split)' if splits is not None else f'{where}: no rows')
  if state.get('_indices_data_files'):
    raise UsageError(f'{where}: the saved dataset has an indices mapping; save it again after .flatten_indices()')
  return [f'{where}/{f["filename"]}' for f in state['_data_files']]


class Table:
  """One Parquet or Arrow-stream file: its schema, row count and row-group (record-batch) sizes."""

  def __init__(self, kind: str, path: str):
    self.kind, self.path = kind, path
    source = _open(path)
    try:
      if kind == 'parquet':
        pf = pq.ParquetFile(source)
        self.schema = pf.schema_arrow
        self.groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
      else:
        reader = pa.ipc.open_stream(source)
        self.schema = reader.schema
        self.groups = [b.num_rows for b in reader]  # Memory-mapped: the batches' data is not read.
    except pa.ArrowException as e:
      what = 'a Parquet file' if kind == 'parquet' else 'an Arrow stream file (as save_to_disk writes)'
      raise UsageError(f'{path}: not {what} ({str(e).splitlines()[0]})') from None
    self.num_rows = sum(self.groups)
    self.class_names = _class_names(self.schema)

  def batches(self, columns: list[str], start: int) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` from row `start` on; whole row groups before it are skipped unread."""
    first, skip = 0, start
    while first < len(self.groups) and skip >= self.groups[first]:
      skip -= self.groups[first]
      first += 1
    if self.kind == 'parquet':
      groups = range(first, len(self.groups))
      it = pq.ParquetFile(_open(self.path)).iter_batches(batch_size=SLICE, row_groups=groups, columns=columns)
    else:
      reader = pa.ipc.open_stream(_open(self.path))
      for _ in range(first):
        reader.read_next_batch()
      it = (b.select(columns) for b in reader)
    for b in it:
      if skip >= b.num_rows:
        skip -= b.num_rows
        continue
      yield b.slice(skip)
      skip = 0


def _class_names(schema: pa.Schema) -> dict[str, list[str]]:
  """{column: class names} of the `datasets` ClassLabel features named in the schema's metadata."""
  try:
    features = json.loads((schema.metadata or {}).get(b'huggingface', b'{}'))['info']['features']
  except (KeyError, TypeError, ValueError):
    return {}
  return {k: v['names'] for k, v in features.items() if isinstance(v, dict) and v.get('_type') == 'ClassLabel'}


def open_tables(kind: str, paths: list[str]) -> list[Table]:
  """A Table per file."""
  return [Table(kind, p) for p in paths]


def check_columns(tables: list[Table], roles: dict[str, str], key: str = '') -> None:
  """Raises UsageError naming the first file and column that is missing or whose type its role does not take."""
  for t in tables:
    where = f'{t.path} ({key})' if key else t.path
    for name, role in roles.items():
      if name not in t.schema.names:
        raise UsageError(f'{where}: no column {name!r}; it has {t.schema.names}')
      typ = t.schema.field(name).type
      if name in t.class_names and role in ('class', 'any'):
        continue
      expected, ok = _ROLES[role]
      if not ok(typ):
        hint = ' (a number to predict is task=regression)' if role == 'class' and pat.is_floating(typ) else ''
        raise UsageError(f'{where}: column {name!r} holds {typ}; expected {expected}{hint}')


class _Cursor:
  """Reads one file's rows in order, keeping what a record batch had beyond the last read."""

  def __init__(self, table: Table, columns: list[str], start: int):
    self.key, self.pos = (table.path, tuple(columns)), start
    self._batches, self._rest = table.batches(columns, start), None

  def take(self, n: int) -> list[pa.RecordBatch]:
    parts, have = [], 0
    while have < n:
      if self._rest is None or not self._rest.num_rows:
        self._rest = next(self._batches, None)
        if self._rest is None:
          break
      k = min(n - have, self._rest.num_rows)
      parts.append(self._rest.slice(0, k))
      self._rest, have = self._rest.slice(k), have + k
    self.pos += have
    return parts


_cursors: list[_Cursor] = []  # The most recently used last; a few, for iterators that read one file at once.
_lock = threading.Lock()


def _rows(table: Table, columns: list[str], start: int, n: int) -> pa.Table:
  with _lock:
    key = (table.path, tuple(columns))
    cursor = next((c for c in _cursors if c.key == key and c.pos == start), None)
    if cursor is None:
      cursor = _Cursor(table, columns, start)
    else:
      _cursors.remove(cursor)
    parts = cursor.take(n)
    if cursor.pos < table.num_rows:
      _cursors.append(cursor)
      del _cursors[:-8]
  schema = pa.schema([table.schema.field(c) for c in columns])
  return pa.Table.from_batches(parts, schema=schema)


def _as_bytes(col: pa.ChunkedArray, names: list[str] | None) -> np.ndarray:
  if names is not None:  # A ClassLabel: an id names a class; another value (-1: no label) stays a number.
    ids = col.to_numpy()
    return np.asarray([names[i].encode() if 0 <= i < len(names) else str(i).encode() for i in ids], object)
  if is_list(col.type):  # A conversation per row: as JSON text.
    return np.asarray([json.dumps(v, ensure_ascii=False).encode() for v in col.to_pylist()], object)
  if pat.is_dictionary(col.type):
    col = pc.cast(col, col.type.value_type)
  if pat.is_boolean(col.type):  # As Python (and JSONL's str()) writes them.
    return np.where(col.to_numpy(zero_copy_only=False), b'True', b'False').astype(object)
  if not _is_string(col.type):
    col = pc.cast(col, pa.string())
  return pc.cast(col, pa.large_binary()).to_numpy(zero_copy_only=False)


def read_text(table: Table, roles: dict[str, str], start: int, n: int) -> list[np.ndarray]:
  """Rows [start, start + n) of the columns of `roles`, each an object array of UTF-8 bytes; a null value
  is an error naming the file, row (from 0) and column."""
  columns = list(roles)
  rows = _rows(table, columns, start, n)
  out = []
  for name in columns:
    col = rows.column(name)
    if col.null_count:
      row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
      raise UsageError(f'{table.path}: row {row}: column {name!r} is null')
    out.append(_as_bytes(col, table.class_names.get(name) if roles[name] in ('class', 'any') else None))
  return out


def iter_text(tables: list[Table], roles: dict[str, str]) -> Iterator[tuple[str, ...]]:
  """Every row of the tables in order, as a tuple of the columns of `roles` as str."""
  for t in tables:
    for start in range(0, t.num_rows, SLICE):
      cols = read_text(t, roles, start, SLICE)
      yield from zip(*[[b.decode('utf-8', errors='replace') for b in c] for c in cols])
