"""Tokenizers from a directory (tokenizer.json, vocab.txt, or GPT-2's vocab.json + merges.txt), via `tokenizers`.

A thin wrapper that gives the rest of jaxlm one interface: encode single texts or pairs with
truncation, encode plain texts, decode, and know the special ids. Two kinds: BERT's WordPiece
([PAD] [CLS] [SEP]) and the byte-level BPE of GPT-2 / Llama style models (an end-of-text token
such as <|endoftext|> or </s>). A tokenizer keeps the chat template its directory ships (chat.py),
and saving it writes the template back. It imports neither TensorFlow nor transformers, so the
inference path stays light.

`train_wordpiece` trains a vocabulary with the algorithm of Hugging Face's WordPiece trainer,
in Python and deterministic: the same texts give a byte-identical tokenizer in every process
and on every run (Hugging Face's trainer breaks ties between equally frequent pairs in hash
order, which changes from process to process). `train_bpe` trains a GPT-2 style byte-level BPE with
Hugging Face's BPE trainer, which is deterministic here: every symbol is one of the 256 byte
symbols, whose ids are fixed, and equal counts are broken by the pair's ids.
"""

from __future__ import annotations

import heapq
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

from etils import epath
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers.implementations import BertWordPieceTokenizer

from jaxlm import chat
from jaxlm.errors import UsageError

TextOrPair = str | tuple[str, str] | list


# The special tokens of a BPE vocabulary, by role, tried in order when tokenizer_config.json names none.
_BPE_SPECIALS = {
  'eos': ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>'),
  'bos': ('<s>', '<|begin_of_text|>', '<bos>'),
  'pad': ('<pad>', '<|pad|>', '[PAD]'),
  'unk': ('<unk>',),
}


class Tokenizer:
  """A fast tokenizer plus its special ids: `kind` 'wordpiece' (BERT: [PAD] [CLS] [SEP] [MASK]) or 'bpe' (a BPE
  model without [CLS], as GPT-2 / Llama: `eos_id`, `bos_id` or None, `pad_id` the padding token's or else eos_id).

  `special_tokens` (role -> token, from tokenizer_config.json: 'eos', 'bos', 'pad', 'unk') names the special
  tokens of a BPE vocabulary; a role it leaves out is found by its usual names. `chat_template`: the Jinja
  template an instruct model's conversations are rendered with (chat.py), or None."""

  def __init__(self, tok: _HFTokenizer, source: str = '', do_lower_case: bool | None = None,
               special_tokens: dict[str, str | None] | None = None, chat_template: str | None = None):  # fmt: skip
    self._tok = tok
    self.chat_template = chat_template
    self._tok.no_padding()
    self._tok.no_truncation()
    self.source = source
    self.do_lower_case = do_lower_case
    self._encoder = None  # (max_length, backend copy with that truncation), made on first use.
    self._plain = None  # The backend copy of encode_plain, made on first use.
    if tok.token_to_id('[CLS]') is None and isinstance(tok.model, models.BPE):
      self._init_bpe(special_tokens or {})
      return
    self.kind = 'wordpiece'
    self.eos_id = self.bos_id = None
    ids = {name: tok.token_to_id(name) for name in ('[PAD]', '[CLS]', '[SEP]', '[MASK]', '[UNK]')}
    for name in ('[PAD]', '[CLS]', '[SEP]'):
      if ids[name] is None:
        raise UsageError(f'{source}: the vocabulary has no {name} token')
    self.pad_id, self.cls_id, self.sep_id = ids['[PAD]'], ids['[CLS]'], ids['[SEP]']
    if tok.post_processor is None:  # A freshly trained WordPiece model has none: add BERT's.
      tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]',
        pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', self.cls_id), ('[SEP]', self.sep_id)],
      )
    self.mask_id, self.unk_id = ids['[MASK]'], ids['[UNK]']
    self.mask_token = '[MASK]'

  def _init_bpe(self, special_tokens: dict[str, str | None]) -> None:
    self.kind = 'bpe'
    self.special_tokens = {}
    for role, names in _BPE_SPECIALS.items():
      if role in special_tokens:  # Named by the tokenizer's config (None: it has none).
        name = special_tokens[role]
        if name is not None and self._tok.token_to_id(name) is None:
          raise UsageError(f'{self.source}: {role}_token {name!r} of tokenizer_config.json is not in the vocabulary')
      else:
        name = next((n for n in names if self._tok.token_to_id(n) is not None), None)
      self.special_tokens[role] = name
    ids = {role: None if n is None else self._tok.token_to_id(n) for role, n in self.special_tokens.items()}
    self.eos_id, self.bos_id, self.unk_id = ids['eos'], ids['bos'], ids['unk']
    self.pad_id = self.eos_id if ids['pad'] is None else ids['pad']  # Padding weighs nothing in a loss: eos will do.
    if self.pad_id is None:
      raise UsageError(f'{self.source}: the BPE vocabulary has no end-of-text token ({", ".join(_BPE_SPECIALS["eos"])})'
                       ' and no padding token')  # fmt: skip
    self.cls_id = self.sep_id = self.mask_id = self.mask_token = None

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  @property
  def backend(self) -> _HFTokenizer:
    """The underlying `tokenizers.Tokenizer` (shared: use `fresh_backend` to change settings)."""
    return self._tok

  def fresh_backend(self, truncation: int | None = None) -> _HFTokenizer:
    """A private copy of the backend, with truncation to `truncation` tokens or none."""
    tok = _HFTokenizer.from_str(self._tok.to_str())
    tok.no_padding()
    if truncation:
      tok.enable_truncation(truncation)
    else:
      tok.no_truncation()
    return tok

  def encode(self, inputs: Sequence[TextOrPair], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, type_ids) per input, with the special tokens of the tokenizer's template ([CLS]/[SEP] for BERT,
    none or <s> for a BPE), truncated to `max_length` tokens."""
    if self._encoder is None or self._encoder[0] != max_length:
      self._encoder = (max_length, self.fresh_backend(truncation=max_length))
    batch = [tuple(x) if isinstance(x, (list, tuple)) else x for x in inputs]
    for x in batch:
      if isinstance(x, tuple) and len(x) != 2:
        raise UsageError(f'expected a text or a (text, text_pair), got a tuple of {len(x)}')
    encs = self._encoder[1].encode_batch(batch)
    return [(e.ids, e.type_ids) for e in encs]

  def encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text: no special tokens added, no truncation. Text that spells a special token
    ('<|endoftext|>') is encoded as text, so a special id in the output is always one that the caller adds."""
    if isinstance(texts, str):
      raise TypeError('encode_plain takes a sequence of texts, not one str')
    if self._plain is None:
      tok = self.fresh_backend()
      tok.encode_special_tokens = True
      self._plain = tok
    return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens left out."""
    return self._tok.decode(list(ids))

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def save(self, out_dir: str, extra_files: dict[str, str] | None = None) -> None:
    """Writes tokenizer.json, tokenizer_config.json (readable by transformers; with the chat template), vocab.txt (WordPiece only) and
    `extra_files` (name -> text); local or gs://. A save killed half way leaves no tokenizer.json in `out_dir`."""
    out = epath.Path(out_dir)
    tmp = out.parent / f'{out.name}.partial'  # Beside `out`, so the final rename stays on one filesystem.
    if tmp.exists():  # Left by a save that was killed.
      tmp.rmtree()
    tmp.mkdir(parents=True)
    (tmp / 'tokenizer.json').write_bytes(self._tok.to_str(pretty=True).encode())
    if self.kind == 'bpe':
      # PreTrainedTokenizerFast runs tokenizer.json as it is; clean-up would change the spaces of decoded text.
      names = {**self.special_tokens, 'pad': self.special_tokens['pad'] or self.special_tokens['eos']}
      cfg = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
             **{f'{role}_token': n for role, n in names.items() if n}}  # fmt: skip
    else:
      vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
      (tmp / 'vocab.txt').write_bytes(''.join(t + '\n' for t, _ in vocab).encode())
      cfg = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': bool(self.do_lower_case), 'pad_token': '[PAD]',
             'cls_token': '[CLS]', 'sep_token': '[SEP]', 'mask_token': '[MASK]', 'unk_token': '[UNK]'}  # fmt: skip
    if self.chat_template is not None:  # Where every transformers version reads it.
      cfg['chat_template'] = self.chat_template
    (tmp / 'tokenizer_config.json').write_text(json.dumps(cfg, indent=2))
    for name, text in (extra_files or {}).items():
      (tmp / name).write_text(text)
    _publish(tmp, out)


def _publish(tmp: epath.Path, out: epath.Path) -> None:
  """Moves the files of directory `tmp` into `out`: one rename when `out` is a new local directory, else file by
  file with tokenizer.json last (object stores rename no directory atomically), so its presence means complete."""
  if '://' not in str(out) and not out.exists():
    tmp.rename(out)
    return
  out.mkdir(parents=True, exist_ok=True)
  if (out / 'tokenizer.json').exists():  # Never an old tokenizer.json beside new files.
    (out / 'tokenizer.json').unlink()
  for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == 'tokenizer.json'):
    (tmp / name).replace(out / name)
  tmp.rmtree()


def _special_names(p: epath.Path) -> tuple[bool | None, dict[str, str | None]]:
  """do_lower_case and the special tokens by role ('eos' -> '</s>') that a Hugging Face directory's
  tokenizer_config.json and special_tokens_map.json name (the config wins)."""
  lower, names = None, {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    if (p / name).exists():
      cfg = json.loads((p / name).read_bytes())
      lower = cfg.get('do_lower_case', lower)
      for role in _BPE_SPECIALS:
        if f'{role}_token' in cfg:
          v = cfg[f'{role}_token']
          names[role] = v.get('content') if isinstance(v, dict) else v  # An AddedToken is a dict.
  return lower, names


def load(path: str) -> Tokenizer:
  """A tokenizer from a directory holding tokenizer.json, vocab.txt (WordPiece) or vocab.json + merges.txt (GPT-2's
  byte-level BPE), or a tokenizer.json file (local or gs://)."""
  p = epath.Path(path)
  if p.is_file():
    return Tokenizer(_HFTokenizer.from_str(p.read_bytes().decode()), path)
  lower, names = _special_names(p)
  template = chat.read_template(p)
  tj, vocab = p / 'tokenizer.json', p / 'vocab.txt'
  if tj.exists():
    return Tokenizer(_HFTokenizer.from_str(tj.read_bytes().decode()), str(tj), lower, names, template)
  if (p / 'vocab.json').exists() and (p / 'merges.txt').exists():  # GPT-2's files, with no tokenizer.json.
    return Tokenizer(_byte_level_bpe(p, names), str(p / 'vocab.json'), lower, names, template)
  if vocab.exists():
    lower = True if lower is None else lower
    words = {w.rstrip(): i for i, w in enumerate(vocab.read_bytes().decode().split('\n')) if w.rstrip()}
    return Tokenizer(BertWordPieceTokenizer(words, lowercase=lower)._tokenizer, str(vocab), lower)
  raise UsageError(f'{path}: no tokenizer.json, vocab.txt, or vocab.json with merges.txt')


def _byte_level_bpe(p: epath.Path, names: dict[str, str | None]) -> _HFTokenizer:
  """GPT-2's byte-level BPE from a directory's vocab.json and merges.txt, built as transformers' GPT2Tokenizer
  builds it (add_prefix_space from tokenizer_config.json), its special tokens (`names`, <|endoftext|>) whole."""
  config = p / 'tokenizer_config.json'
  prefix = bool(json.loads(config.read_bytes()).get('add_prefix_space', False)) if config.exists() else False
  merges = []
  for i, line in enumerate(p.joinpath('merges.txt').read_bytes().decode().splitlines(), 1):
    if line and not (i == 1 and line.startswith('#version')):
      pair = tuple(line.split(' '))
      if len(pair) != 2:
        raise UsageError(f'{p / "merges.txt"}:{i}: expected two symbols separated by a space, got {line!r}')
      merges.append(pair)
  try:
    vocab = json.loads(p.joinpath('vocab.json').read_bytes())
  except ValueError as e:
    raise UsageError(f'{p / "vocab.json"}: not valid JSON') from e
  tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix='',
                                end_of_word_suffix='', fuse_unk=False))  # fmt: skip
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
  tok.decoder = decoders.ByteLevel()
  specials = sorted({n for n in (*names.values(), BPE_EOS) if n is not None and n in vocab}, key=vocab.get)
  tok.add_special_tokens(specials)
  return tok


SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # Ids 0-4 of every trained vocabulary.
_PREFIX = '##'  # WordPiece's mark of a piece that continues a word.


def _bert_parts(lowercase: bool):
  """BERT's normalizer and pre-tokenizer (clean text, CJK characters split, accents stripped when lowercasing)."""
  norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
  return norm, pre_tokenizers.BertPreTokenizer()


def _word_counts(texts, lowercase: bool) -> dict[str, int]:
  """How often each pre-tokenized word occurs in `texts`."""
  norm, pre = _bert_parts(lowercase)
  counts = Counter()
  for text in texts:
    counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
  return counts


def _merged(a: str, b: str) -> str:
  return a + b[len(_PREFIX) :] if b.startswith(_PREFIX) else a + b


def _merge_word(syms: list[str], a: str, b: str, m: str) -> list[str]:
  """`syms` with every (a, b), left to right, replaced by m."""
  out, i, n = [], 0, len(syms)
  while i < n:
    if i + 1 < n and syms[i] == a and syms[i + 1] == b:
      out.append(m)
      i += 2
    else:
      out.append(syms[i])
      i += 1
  return out


def wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                    limit_alphabet: int = 1000) -> list[str]:  # fmt: skip
  """The tokens of a WordPiece vocabulary, in id order, from word counts; the same counts give the same list.

  The algorithm of Hugging Face's WordPiece trainer (BPE over '##'-prefixed continuations):
  the special tokens, the `limit_alphabet` most frequent characters, the continuation pieces
  '##c' that occur, then the most frequent adjacent pair merged, again and again, until
  `vocab_size` tokens or no pair occurs `min_frequency` times. Equal counts are broken by the
  merged string, then by the pair, never by hash order, so every process and run agrees.
  """
  chars = Counter()
  for w, c in word_counts.items():
    for ch in w:
      chars[ch] += c
  alphabet = set(sorted(chars, key=lambda ch: (-chars[ch], ch))[:limit_alphabet])
  words, freqs, conts = [], [], set()
  for w, c in sorted(word_counts.items()):  # Sorted: nothing below depends on the order of a hash map.
    syms = [ch if i == 0 else _PREFIX + ch for i, ch in enumerate(w) if ch in alphabet]  # Others are dropped.
    conts.update(s for s in syms if s.startswith(_PREFIX))
    words.append(syms)
    freqs.append(c)
  vocab = [*SPECIAL_TOKENS, *sorted(alphabet), *sorted(conts - set(SPECIAL_TOKENS) - alphabet)]
  known = set(vocab)
  # Pair counts (weighted by word frequency) and, per pair, the words that hold it (a superset:
  # entries go stale after merges and are skipped). The heap holds (-count, merged, a, b): an
  # entry whose count is no longer the pair's count is dropped when popped, since every change
  # of a count pushes a fresh entry.
  counts, where = Counter(), defaultdict(set)
  for wi, syms in enumerate(words):
    for p in zip(syms, syms[1:]):
      counts[p] += freqs[wi]
      where[p].add(wi)
  heap = [(-c, _merged(*p), *p) for p, c in counts.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    neg, m, a, b = heapq.heappop(heap)
    if counts.get((a, b), 0) != -neg:
      continue
    if -neg < min_frequency:
      break
    if m not in known:
      known.add(m)
      vocab.append(m)
    delta = Counter()
    for wi in where.pop((a, b)):  # In any order: the deltas add up the same.
      syms = words[wi]
      new = _merge_word(syms, a, b, m)
      if len(new) == len(syms):
        continue
      f = freqs[wi]
      for p in zip(syms, syms[1:]):
        delta[p] -= f
      for p in zip(new, new[1:]):
        delta[p] += f
        where[p].add(wi)
      words[wi] = new
    for p, d in delta.items():
      if d:
        c = counts[p] + d
        if c > 0:
          counts[p] = c
          heapq.heappush(heap, (-c, _merged(*p), *p))
        else:
          del counts[p]
  return vocab


def wordpiece_tokenizer(vocab: Sequence[str], lowercase: bool = True) -> Tokenizer:
  """A BERT tokenizer (normalizer, pre-tokenizer, [CLS]/[SEP] template, '##' decoder) over `vocab`."""
  tok = _HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token='[UNK]'))
  tok.normalizer, tok.pre_tokenizer = _bert_parts(lowercase)
  ids = {t: vocab.index(t) for t in ('[CLS]', '[SEP]')}
  tok.post_processor = processors.TemplateProcessing(
    single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1', special_tokens=list(ids.items())
  )
  tok.decoder = decoders.WordPiece(prefix=_PREFIX)
  tok.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
  return Tokenizer(tok, 'trained', lowercase)


def train_wordpiece(texts, vocab_size: int, lowercase: bool = True, show_progress: bool = False) -> Tokenizer:
  """Trains a BERT WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] = ids 0-4) on an iterable of texts.

  Deterministic: the same texts give a byte-identical tokenizer in every process.
  """
  t0 = time.perf_counter()
  counts = _word_counts(texts, lowercase)
  if show_progress:
    print(f'{len(counts)} distinct words, {sum(counts.values())} in all ({time.perf_counter() - t0:.1f}s)', flush=True)
  return wordpiece_tokenizer(wordpiece_vocab(counts, vocab_size), lowercase)


BPE_EOS = '<|endoftext|>'  # Id 0 of every trained BPE vocabulary: the end of each document.


def train_bpe(texts, vocab_size: int, show_progress: bool = False) -> Tokenizer:
  """Trains a GPT-2 style byte-level BPE (<|endoftext|> = id 0, the 256 byte symbols, then merges) on an iterable
  of texts.

  Deterministic: the same texts give a byte-identical tokenizer in every process (Hugging Face's trainer
  numbers the byte symbols in sorted order and breaks equal counts by the pair's ids, never by hash order)."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise UsageError(f'vocab_size={vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} tokens'
                     f' (the {len(alphabet)} bytes and {BPE_EOS})')  # fmt: skip
  tok = _HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=[BPE_EOS], initial_alphabet=alphabet, show_progress=show_progress
  )
  tok.train_from_iterator(texts, trainer)
  return Tokenizer(tok, 'trained')
