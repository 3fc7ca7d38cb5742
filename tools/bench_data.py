"""A labelled set of real, ragged short texts that every machine with Python already has.

  python tools/bench.py --mode make-ragged --out DIR     # DIR/train.jsonl, DIR/test.jsonl: {"text", "label"}

The sentences of the Python standard library's own prose: the docstrings of its modules, classes
and functions and its comment blocks, read from the source files with `ast` and one regular expression (no
module is imported, nothing is downloaded). A sentence's label says which part of the library its
module belongs to (TOPICS): 'io', the internet and the operating system, or 'code', the language's
tools and its data. Sentences have 5 to 60 words, mostly plain words; most are short and a few
long, as in real short-text tasks. A sentence found under both labels is left out; both labels
give the same number of examples. The same Python version and seed always give the same files.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sysconfig

import numpy as np

from jaxlm.errors import UsageError

# The two labels and the top-level modules / packages that give each its sentences (a module of
# neither is not read): 'io' is the internet and the operating system (sockets, mail, HTTP, files,
# archives, processes, threads); 'code' is the language's tools (debugging, testing, inspection,
# logging, typing) and its data (text, formats, numbers, dates, containers).
TOPICS = {
  'io': (
    'asyncore', 'base64', 'cgi', 'email', 'ftplib', 'html', 'http', 'imaplib', 'ipaddress', 'mailbox', 'mimetypes',
    'nntplib', 'poplib', 'quopri', 'selectors', 'smtpd', 'smtplib', 'socket', 'socketserver', 'ssl', 'telnetlib',
    'urllib', 'uu', 'webbrowser', 'wsgiref', 'xmlrpc',
    '_pyio', 'asyncio', 'bz2', 'concurrent', 'dbm', 'fileinput', 'fnmatch', 'genericpath', 'glob', 'gzip', 'io',
    'lzma', 'multiprocessing', 'ntpath', 'os', 'pathlib', 'posixpath', 'queue', 'sched', 'shutil', 'signal', 'stat',
    'subprocess', 'tarfile', 'tempfile', 'threading', 'zipfile',
  ),
  'code': (
    'ast', 'bdb', 'cProfile', 'code', 'codeop', 'dis', 'distutils', 'doctest', 'importlib', 'inspect', 'logging',
    'modulefinder', 'pdb', 'pkgutil', 'profile', 'pstats', 'py_compile', 'pyclbr', 'pydoc', 'runpy', 'site',
    'symtable', 'tabnanny', 'timeit', 'trace', 'traceback', 'typing', 'unittest', 'venv', 'warnings',
    '_pydecimal', '_strptime', 'bisect', 'calendar', 'codecs', 'collections', 'colorsys', 'configparser', 'copy',
    'csv', 'dataclasses', 'datetime', 'difflib', 'encodings', 'enum', 'fractions', 'functools', 'gettext', 'graphlib',
    'hashlib', 'heapq', 'hmac', 'json', 'locale', 'numbers', 'operator', 'pickle', 'pickletools', 'plistlib',
    'pprint', 'random', 're', 'reprlib', 'secrets', 'shelve', 'shlex', 'sqlite3', 'statistics', 'string',
    'textwrap', 'tokenize', 'tomllib', 'uuid', 'xml', 'zoneinfo',
  ),
}  # fmt: skip
MIN_WORDS, MAX_WORDS = 5, 60
_SKIP_DIRS = ('test', 'tests', '__pycache__')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z])')
_RULE = re.compile(r'[-=*#~_+.]{4,}')
_WORD = re.compile(r'[A-Za-z][a-z]+[,;:.!?]?$')  # A plain word, not an identifier or a number.
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)  # What a class or function can sit in.
# A string literal (its prefix letters are skipped as code) or a comment, whichever starts first: a '#' in a string
# is no comment. Backslashes escape the next character in every kind of literal, raw ones included.
_STRING_OR_COMMENT = re.compile(
  r"""(?P<string>'{3}(?:\\.|[^\\])*?'{3}|"{3}(?:\\.|[^\\])*?"{3}|'(?:\\.|[^\\'\n])*'|"(?:\\.|[^\\"\n])*")"""
  r'|(?P<comment>#[^\r\n]*)',
  re.S,
)


def _sentences(text: str):
  """The prose sentences of a docstring or comment block: 5-60 words, mostly plain words."""
  for para in re.split(r'\n\s*\n', text):
    if '>>>' in para or para.lstrip().startswith(('$ ', '%')):
      continue  # An example session, not prose.
    para = _RULE.sub(' ', para)  # Decorative lines (----, ====) and table borders are not words.
    for s in _SENTENCE_END.split(re.sub(r'\s+', ' ', para).strip()):
      words = s.split()
      if MIN_WORDS <= len(words) <= MAX_WORDS and sum(map(bool, map(_WORD.match, words))) >= 0.7 * len(words):
        yield s


def _file_text(path: str):
  """Docstrings and comment blocks (consecutive comment lines joined) of one source file, docstrings first in
  breadth-first order (as `ast.walk` visits them), then the comments in file order."""
  with open(path, encoding='utf-8', errors='replace') as f:
    src = f.read()
  try:
    tree = ast.parse(src)
  except (SyntaxError, ValueError):
    return
  level = [tree]  # Docstrings sit on statements only: expressions are not walked (the walk's cost).
  while level:
    for node in level:
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          yield doc
    level = [c for node in level for c in ast.iter_child_nodes(node) if isinstance(c, _STATEMENTS)]
  block, last, line, pos = [], -2, 1, 0
  for m in _STRING_OR_COMMENT.finditer(src):  # The file parsed, so its strings are well formed.
    if m.lastgroup == 'comment':
      line += src.count('\n', pos, m.start())
      pos = m.start()
      if line != last + 1 and block:
        yield ' '.join(block)
        block = []
      block.append(m.group().lstrip('#!').strip())
      last = line
  if block:
    yield ' '.join(block)


@functools.lru_cache(maxsize=2)  # Reading the library takes seconds; sets of several sizes or seeds read it once.
def topic_sentences(stdlib: str | None = None) -> dict[str, tuple[str, ...]]:
  """Every distinct prose sentence under each TOPICS label, in a fixed order; sentences under both are left out."""
  stdlib = stdlib or sysconfig.get_paths()['stdlib']
  label_of = {module: topic for topic, modules in TOPICS.items() for module in modules}
  found: dict[str, dict[str, None]] = {topic: {} for topic in TOPICS}  # Ordered sets.
  for entry in sorted(os.listdir(stdlib)):
    topic = label_of.get(entry.removesuffix('.py'))
    path = os.path.join(stdlib, entry)
    if topic is None:
      continue
    files = [path] if entry.endswith('.py') else []
    for root, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
      files += [os.path.join(root, n) for n in sorted(names) if n.endswith('.py')]
    for file in files:
      for text in _file_text(file):
        found[topic].update(dict.fromkeys(_sentences(text)))
  seen: dict[str, int] = {}
  for sentences in found.values():
    for s in sentences:
      seen[s] = seen.get(s, 0) + 1
  return {topic: tuple(s for s in sentences if seen[s] == 1) for topic, sentences in found.items()}


def make_ragged(
  out: str, train: int = 12800, test: int = 1600, seed: int = 0, model_dir: str | None = None, stdlib: str | None = None
) -> dict:
  """Writes out/train.jsonl and out/test.jsonl ({"text", "label"}, labels balanced); returns split_stats of each."""
  by_topic = topic_sentences(stdlib)
  per_train, per_test = train // len(TOPICS), test // len(TOPICS)
  rng = np.random.default_rng(seed)
  splits = {'train': [], 'test': []}
  for topic, sentences in by_topic.items():
    if len(sentences) < per_train + per_test:
      raise UsageError(f'--train_examples {train}, --test_examples {test}: the label {topic!r} has only'
                       f' {len(sentences)} sentences; {per_train + per_test} are needed')  # fmt: skip
    picked = [sentences[i] for i in rng.permutation(len(sentences))[: per_train + per_test]]
    splits['train'] += [(s, topic) for s in picked[:per_train]]
    splits['test'] += [(s, topic) for s in picked[per_train:]]
  os.makedirs(out, exist_ok=True)
  for name, rows in splits.items():
    rows = [rows[i] for i in rng.permutation(len(rows))]
    with open(os.path.join(out, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps({'text': text, 'label': label}) + '\n' for text, label in rows)
  return {name: split_stats(os.path.join(out, f'{name}.jsonl'), model_dir) for name in splits}


def split_stats(path: str, model_dir: str | None = None, batch: int = 32) -> dict:
  """A JSONL split's examples per label and lengths in words; with `model_dir`, in that tokenizer's tokens too, and
  the mean longest example of its batches of `batch` in file order (what padding each batch to its longest costs)."""
  rows = read_jsonl(path)
  labels = {}
  for r in rows:
    labels[r['label']] = labels.get(r['label'], 0) + 1
  stats = {'examples': len(rows), 'labels': dict(sorted(labels.items())),
           'words': length_stats([len(r['text'].split()) for r in rows])}  # fmt: skip
  if model_dir:
    tokens = token_lengths([r['text'] for r in rows], model_dir)
    stats['tokens'] = length_stats(tokens)
    stats[f'tokens_longest_of_{batch}'] = float(
      np.mean([max(tokens[i : i + batch]) for i in range(0, len(rows), batch)])
    )
  return stats


def token_lengths(texts: list[str], model_dir: str) -> list[int]:
  """Each text's length in the tokens of `model_dir`'s tokenizer.json, [CLS] and [SEP] included, untruncated."""
  from tokenizers import Tokenizer  # lazy: only the statistics need it

  tok = Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
  tok.no_truncation()
  tok.no_padding()
  return [len(e.ids) for e in tok.encode_batch(texts)]


def length_stats(lengths) -> dict:
  """mean, p50, p90 and max of a list of lengths."""
  x = np.asarray(lengths)
  return {'mean': float(x.mean()), 'p50': float(np.percentile(x, 50)), 'p90': float(np.percentile(x, 90)),
          'max': int(x.max())}  # fmt: skip


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
