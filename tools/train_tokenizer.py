"""Train a WordPiece or byte-level BPE vocabulary on a corpus; the directory it writes loads in jaxlm and transformers.

python tools/train_tokenizer.py --input 'text:/data/wiki/*.txt' --vocab_size 30522 --out /runs/tok
python tools/train_tokenizer.py --kind bpe --input 'text:/data/web/*.txt' --vocab_size 32000 --out /runs/bpe

--kind wordpiece (the default) trains BERT's WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK] = ids 0-4,
lowercased unless --cased); --kind bpe trains a GPT-2 style byte-level BPE for causal language
models (<|endoftext|> = id 0, then the 256 byte symbols; case is always kept). The same input gives
a byte-identical tokenizer on every run. A corpus without text is an error and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--input', required=True, help='KIND:SPEC of a text source (builtin:, text:, jsonl:, csv:, tsv:, tfds:)'
  )
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--kind', default='wordpiece', choices=['wordpiece', 'bpe'], help='WordPiece (BERT) or byte-level BPE')
  p.add_argument('--vocab_size', type=int, default=30522, help='vocabulary size, special tokens included')
  p.add_argument(
    '--cased', action='store_true', help='keep case (WordPiece; default: lowercase, like bert-base-uncased)'
  )
  p.add_argument('--text_field', default='text', help='field / column of the text (jsonl, csv, tsv, tfds)')
  p.add_argument('--text_docs', default='line', choices=['line', 'blank_line'], help='documents in text files')
  args = p.parse_args(argv)

  from jaxlm.errors import UsageError

  try:
    from jaxlm.data import pretrain
    from jaxlm.tokenizer import SPECIAL_TOKENS, train_bpe, train_wordpiece

    t0 = time.perf_counter()
    cfg = {'text_field': args.text_field, 'text_docs': args.text_docs}
    seen = []  # Texts that are not blank: a BPE vocabulary holds its 257 base tokens even without any.

    def texts():
      for text in pretrain.iter_texts(args.input, cfg, key='--input'):
        if not seen and text.strip():
          seen.append(True)
        yield text

    if args.kind == 'bpe':
      tok = train_bpe(texts(), args.vocab_size, show_progress=True)
    else:
      tok = train_wordpiece(texts(), args.vocab_size, lowercase=not args.cased, show_progress=True)
    if not seen or (args.kind == 'wordpiece' and tok.vocab_size <= len(SPECIAL_TOKENS)):
      raise UsageError(f'--input={args.input!r}: no text to train a tokenizer on')
    tok.save(args.out)
    print(f'{tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {args.out}')
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
