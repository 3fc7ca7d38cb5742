"""The tokenizer of a training run: `vocab.for_run(config, workdir)`.

data.tokenizer, else the tokenizer of model.init_from, else WORKDIR/tokenizer when it was trained
on this run's data and settings (training.json records them), else a vocabulary trained on
data.train: WordPiece for an encoder, a byte-level BPE for a decoder (deterministic either way:
every process trains the same one; process 0 saves it once it passed its checks). A saved vocabulary that does not match the run is an error, never reused.
"""

from __future__ import annotations

import hashlib
import json
import time

import jax
import numpy as np
import tensorflow as tf
from etils import epath
from jax.experimental import multihost_utils

from jaxlm import store
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pretrain, sources
from jaxlm.errors import UsageError


def for_run(config, workdir: str, kind: str = 'wordpiece') -> tokenizer_lib.Tokenizer:
  """data.tokenizer, else the tokenizer of model.init_from, else WORKDIR/tokenizer if it was trained on this run's
  data and settings, else one of `kind` ('wordpiece' or 'bpe') trained on data.train (saved there once it passed
  its checks); with the chat template of data.chat_template, if set."""
  template = None
  if config.data.chat_template:
    path = epath.Path(config.data.chat_template)
    if not path.is_file():
      raise UsageError(f'data.chat_template={config.data.chat_template!r}: no such file (a Jinja chat template)')
    template = path.read_text()
  tok = _for_run(config, workdir, kind, template)
  if template is not None:
    tok.chat_template = template
  return tok


def _for_run(config, workdir: str, kind: str, template: str | None) -> tokenizer_lib.Tokenizer:
  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  if config.model.init_from:
    return tokenizer_lib.load(store.tokenizer_dir(config.model.init_from))
  d = config.data
  saved = epath.Path(workdir) / 'tokenizer'  # Local or remote (gs://).
  if (saved / 'tokenizer.json').exists():
    _check_saved_tokenizer(saved, config, kind)
    return tokenizer_lib.load(str(saved))
  if not d.train_tokenizer_vocab:
    raise UsageError('data.tokenizer is empty: set it, or model.init_from, or data.train_tokenizer_vocab')
  # Training is deterministic, so every process trains its own copy: no process waits on another's errors.
  t0 = time.perf_counter()
  record = _tokenizer_record(config, kind)  # Before reading: a file changed meanwhile shows as a mismatch next time.
  texts = pretrain.iter_texts(d.train, d.to_dict())
  if kind == 'bpe':
    tok = tokenizer_lib.train_bpe(texts, d.train_tokenizer_vocab)
  else:
    tok = tokenizer_lib.train_wordpiece(texts, d.train_tokenizer_vocab, d.lowercase)
  tok.chat_template = template
  if tok.vocab_size <= (len(tokenizer_lib.SPECIAL_TOKENS) if kind == 'wordpiece' else 257):
    raise UsageError(f'data.train={d.train!r}: no text to train a tokenizer on')
  if jax.process_count() > 1:  # The same vocabulary everywhere, or the processes read different data.
    digest = np.frombuffer(hashlib.sha256(tok.backend.to_str().encode()).digest(), np.uint8)
    if not (np.asarray(multihost_utils.process_allgather(digest)) == digest).all():
      raise UsageError(
        f'data.train={d.train!r}: the processes trained different vocabularies, so they read different data'
      )
  name = 'byte-level BPE' if kind == 'bpe' else 'WordPiece'
  print(f'trained a {tok.vocab_size}-token {name} vocabulary in {time.perf_counter() - t0:.1f}s', flush=True)
  if jax.process_index() == 0:
    tok.save(str(saved), {'training.json': json.dumps(record, indent=2)})
  return tok


def _tokenizer_record(config, tokenizer_kind: str = 'wordpiece') -> dict:
  """What a trained tokenizer depends on: its kind (recorded for BPE only: records written before BPE
  existed are WordPiece's), the data.* settings that shape its texts, and (path, size, mtime) of every
  file data.train names (the builtin corpora are named by data.train itself)."""
  d = config.data
  kind, _ = sources.split_spec(d.train, 'data.train')
  rec = {'data.train': d.train, 'data.train_tokenizer_vocab': d.train_tokenizer_vocab, 'data.lowercase': d.lowercase}
  if tokenizer_kind == 'bpe':
    rec['tokenizer_kind'] = 'bpe'
    del rec['data.lowercase']  # A byte-level BPE keeps the case.
  if kind == 'text':
    rec['data.text_docs'] = d.text_docs
  if kind in ('jsonl', 'csv', 'tsv', 'parquet', 'hf', 'tfds'):
    rec['data.text_field'] = d.text_field
  if kind == 'tfds':
    rec.update({'data.train_split': d.train_split, 'data.tfds_data_dir': d.tfds_data_dir})
  if kind == 'hf':
    rec['data.train_split'] = d.train_split
  if kind in ('text', 'jsonl', 'csv', 'tsv', 'parquet', 'hf'):
    stats = [(p, tf.io.gfile.stat(p)) for p in sources.files(d.train, 'data.train', d.train_split)]
    rec['files'] = [[p, st.length, st.mtime_nsec] for p, st in stats]
  return rec


def _check_saved_tokenizer(saved, config, kind: str = 'wordpiece') -> None:
  """Accepts WORKDIR/tokenizer if its record matches this run (a run that trains none accepts any vocabulary
  size); an error naming the first difference otherwise."""
  d, path = config.data, saved / 'training.json'
  if not path.exists():  # Saved before records were kept.
    print(f'warning: {saved} has no record of its training data (training.json): using it unchecked', flush=True)
    return
  old, new = json.loads(path.read_text()), _tokenizer_record(config, kind)
  if not d.train_tokenizer_vocab:
    del new['data.train_tokenizer_vocab']
  fix = f'use another workdir or delete {saved}'
  if old.get('data.train') != d.train:
    raise UsageError(
      f'{saved} was trained on data.train={old.get("data.train")!r} (vocab {old.get("data.train_tokenizer_vocab")})'
      f' but this run has data.train={d.train!r}: {fix}'
    )
  for k, v in {**new, 'tokenizer_kind': new.get('tokenizer_kind')}.items():
    if k != 'files' and old.get(k) != v:
      raise UsageError(f'{saved} was trained with {k}={old.get(k)!r} but this run has {k}={v!r}: {fix}')
  if old.get('files') != new.get('files'):
    changed = sorted({tuple(f) for f in old.get('files') or []} ^ {tuple(f) for f in new.get('files') or []})
    raise UsageError(
      f'{saved} was trained on data.train={d.train!r} but its files have changed since ({changed[0][0]}'
      f' is new, gone, or of another size or time): {fix}'
    )
  print(f'using the tokenizer in {saved}, trained on data.train={d.train!r}', flush=True)
