"""WordPiece tokenizers from a directory (tokenizer.json or vocab.txt), via Hugging Face `tokenizers`.

A thin wrapper that gives the rest of jaxlm one interface: encode single texts or pairs with
truncation, and know the special ids. It imports neither TensorFlow nor transformers, so the
inference path stays light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from etils import epath
from tokenizers import Tokenizer as _HFTokenizer

from jaxlm.errors import UsageError

TextOrPair = str | tuple[str, str] | list


class Tokenizer:
  """A fast WordPiece tokenizer plus the special tokens BERT needs."""

  def __init__(self, tok: _HFTokenizer, source: str = '', do_lower_case: bool | None = None):
    self._tok = tok
    self._tok.no_padding()
    self._tok.no_truncation()
    self.source = source
    self.do_lower_case = do_lower_case
    ids = {name: tok.token_to_id(name) for name in ('[PAD]', '[CLS]', '[SEP]', '[MASK]', '[UNK]')}
    for name in ('[PAD]', '[CLS]', '[SEP]'):
      if ids[name] is None:
        raise UsageError(f'{source}: the vocabulary has no {name} token')
    self.pad_id, self.cls_id, self.sep_id = ids['[PAD]'], ids['[CLS]'], ids['[SEP]']
    if tok.post_processor is None:  # A freshly trained WordPiece model has none: add BERT's.
      from tokenizers import processors

      tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]',
        pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', self.cls_id), ('[SEP]', self.sep_id)],
      )
    self.mask_id, self.unk_id = ids['[MASK]'], ids['[UNK]']
    self.mask_token = '[MASK]'
    self._encoder = None  # (max_length, backend copy with that truncation), made on first use.

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
    """(ids, type_ids) per input, with [CLS]/[SEP], truncated to `max_length` tokens."""
    if self._encoder is None or self._encoder[0] != max_length:
      self._encoder = (max_length, self.fresh_backend(truncation=max_length))
    batch = [tuple(x) if isinstance(x, (list, tuple)) else x for x in inputs]
    for x in batch:
      if isinstance(x, tuple) and len(x) != 2:
        raise UsageError(f'expected a text or a (text, text_pair), got a tuple of {len(x)}')
    encs = self._encoder[1].encode_batch(batch)
    return [(e.ids, e.type_ids) for e in encs]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids))

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def save(self, out_dir: str) -> None:
    """Writes tokenizer.json, vocab.txt and tokenizer_config.json (readable by transformers); local or gs://."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'tokenizer.json').write_bytes(self._tok.to_str(pretty=True).encode())
    vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
    (out / 'vocab.txt').write_bytes(''.join(t + '\n' for t, _ in vocab).encode())
    cfg = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': bool(self.do_lower_case), 'pad_token': '[PAD]',
           'cls_token': '[CLS]', 'sep_token': '[SEP]', 'mask_token': '[MASK]', 'unk_token': '[UNK]'}  # fmt: skip
    (out / 'tokenizer_config.json').write_text(json.dumps(cfg, indent=2))


def load(path: str) -> Tokenizer:
  """A tokenizer from a directory holding tokenizer.json or vocab.txt, or a tokenizer.json file (local or gs://)."""
  p = epath.Path(path)
  if p.is_file():
    return Tokenizer(_HFTokenizer.from_str(p.read_bytes().decode()), path)
  lower = None
  if (p / 'tokenizer_config.json').exists():
    lower = json.loads((p / 'tokenizer_config.json').read_bytes()).get('do_lower_case')
  tj, vocab = p / 'tokenizer.json', p / 'vocab.txt'
  if tj.exists():
    return Tokenizer(_HFTokenizer.from_str(tj.read_bytes().decode()), str(tj), lower)
  if vocab.exists():
    from tokenizers.implementations import BertWordPieceTokenizer

    lower = True if lower is None else lower
    words = {w.rstrip(): i for i, w in enumerate(vocab.read_bytes().decode().split('\n')) if w.rstrip()}
    return Tokenizer(BertWordPieceTokenizer(words, lowercase=lower)._tokenizer, str(vocab), lower)
  raise UsageError(f'{path}: no tokenizer.json or vocab.txt')


def train_wordpiece(texts, vocab_size: int, lowercase: bool = True, show_progress: bool = False) -> Tokenizer:
  """Trains a BERT WordPiece vocabulary (with [PAD] [UNK] [CLS] [SEP] [MASK]) on an iterable of texts."""
  from tokenizers.implementations import BertWordPieceTokenizer

  tok = BertWordPieceTokenizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
  tok.train_from_iterator(
    texts,
    vocab_size=vocab_size,
    min_frequency=2,
    special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'],
    show_progress=show_progress,
  )
  return Tokenizer(tok._tokenizer, 'trained', lowercase)
