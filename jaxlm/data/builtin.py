"""`builtin:stdlib`: an offline English corpus that every machine already has.

The documentation strings of the Python standard library (modules, classes, functions),
read through `inspect` at run time: no download and no data file. Each docstring is one
document; its paragraphs are kept. About 2 MB of technical English, enough to train a small
WordPiece vocabulary and to watch a tiny BERT's MLM loss fall.
"""

from __future__ import annotations

import importlib
import inspect
import re

# A fixed list, so the corpus is the same on every run of one Python version.
MODULES = (
  'argparse', 'array', 'asyncio', 'base64', 'bisect', 'builtins', 'calendar', 'collections', 'configparser',
  'contextlib', 'copy', 'csv', 'dataclasses', 'datetime', 'decimal', 'difflib', 'email', 'enum', 'fractions',
  'ftplib', 'functools', 'getopt', 'gettext', 'glob', 'gzip', 'hashlib', 'heapq', 'hmac', 'html', 'http.client',
  'http.server', 'imaplib', 'inspect', 'io', 'ipaddress', 'itertools', 'json', 'locale', 'logging', 'mailbox',
  'math', 'mimetypes', 'multiprocessing', 'numbers', 'operator', 'optparse', 'os', 'pathlib', 'pickle',
  'pkgutil', 'platform', 'poplib', 'pprint', 'pydoc', 'queue', 'random', 're', 'sched', 'secrets', 'selectors',
  'shelve', 'shlex', 'shutil', 'smtplib', 'socket', 'socketserver', 'sqlite3', 'ssl', 'statistics', 'string',
  'struct', 'subprocess', 'tarfile', 'tempfile', 'textwrap', 'threading', 'time', 'timeit', 'tokenize', 'trace',
  'traceback', 'turtle', 'types', 'typing', 'unittest', 'urllib.parse', 'urllib.request', 'uuid', 'warnings',
  'wave', 'weakref', 'xml.dom.minidom', 'xml.etree.ElementTree', 'zipfile', 'zoneinfo',
)  # fmt: skip
_MIN_WORDS = 12


def _clean(doc: str) -> str:
  paras = [re.sub(r'\s+', ' ', p).strip() for p in re.split(r'\n\s*\n', doc)]
  return '\n'.join(p for p in paras if len(p.split()) >= 4)


def stdlib_documents() -> list[str]:
  """Every docstring of MODULES with at least a dozen words, one string per document."""
  docs, seen = [], set()

  def add(obj):
    try:
      doc = inspect.getdoc(obj)
    except Exception:  # noqa: BLE001 (odd objects raise anything)
      return
    if not doc:
      return
    text = _clean(doc)
    if len(text.split()) >= _MIN_WORDS and text not in seen:
      seen.add(text)
      docs.append(text)

  for name in MODULES:
    try:
      mod = importlib.import_module(name)
    except ImportError:  # e.g. turtle without tkinter
      continue
    add(mod)
    for _, member in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
      if inspect.isclass(member) or inspect.isfunction(member) or inspect.isbuiltin(member):
        add(member)
        if inspect.isclass(member):
          for _, meth in sorted(vars(member).items(), key=lambda kv: kv[0]):
            if inspect.isfunction(meth):
              add(meth)
  return docs


BUILTIN = {'stdlib': stdlib_documents}
