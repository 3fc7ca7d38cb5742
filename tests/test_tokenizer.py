"""WordPiece training: deterministic across processes, BERT-shaped, saved complete or not at all."""

import os
import subprocess
import sys

import pytest

from jaxlm import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = """
import sys
from jaxlm import tokenizer
texts = open(sys.argv[1], encoding='utf-8').read().split('\\n')
tokenizer.train_wordpiece(texts, 1000).save(sys.argv[2])
"""


@pytest.fixture(scope='module')
def docs():
  from jaxlm.data.builtin import stdlib_documents

  return [d.replace('\n', ' ') for d in stdlib_documents()[:300]]


def test_training_is_byte_identical_in_fresh_processes(docs, tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(docs), encoding='utf-8')
  outs = []
  for seed in ('1', '2'):  # Another string hash seed: another iteration order of every hash map.
    out = tmp_path / f'tok{seed}'
    env = {**os.environ, 'PYTHONHASHSEED': seed}
    res = subprocess.run([sys.executable, '-c', _TRAIN, str(corpus), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    outs.append(out)
  assert (outs[0] / 'tokenizer.json').read_bytes() == (outs[1] / 'tokenizer.json').read_bytes()
  assert (outs[0] / 'vocab.txt').read_bytes() == (outs[1] / 'vocab.txt').read_bytes()
  assert tokenizer.load(str(outs[0])).vocab_size == 1000


def test_equal_counts_are_broken_by_the_merged_string():
  # 'ab' and 'cd' occur twice each and room is left for one merge: it is 'ab' whatever the order of the texts.
  # 'xy' occurs once: below the minimum frequency of 2, never merged.
  want = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'b', 'c', 'd', 'x', 'y', '##b', '##d', '##y', 'ab']
  for texts in (['ab cd xy', 'ab cd'], ['cd ab', 'xy cd ab']):
    tok = tokenizer.train_wordpiece(texts, 15)
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == want
    assert [tok.id_to_token(i) for i in range(tok.vocab_size, tok.vocab_size + 2)] == [None, None]
  tok = tokenizer.train_wordpiece(['ab cd xy', 'ab cd'], 100)
  assert tok.vocab_size == 16 and tok.id_to_token(15) == 'cd'
  # A merge can rebuild a token that exists already: counted once. 'abab' -> 'ab' '##ab' needs ('##a', '##b').
  counts = {'abab': 3, 'ab': 3}
  vocab = tokenizer.wordpiece_vocab(counts, 100)
  assert len(vocab) == len(set(vocab)) and {'ab', '##ab', 'abab'} <= set(vocab)


def test_trained_tokenizer_is_a_bert_tokenizer(docs, tmp_path):
  import transformers

  tok = tokenizer.train_wordpiece(docs, 1000)
  assert tok.vocab_size == 1000 and [tok.id_to_token(i) for i in range(5)] == list(tokenizer.SPECIAL_TOKENS)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  pair = ('Return the sorted list.', 'Élan [MASK] unknownword')
  [(ids, types)] = tok.encode([pair], 64)
  n_a = len(tok.encode([pair[0]], 64)[0][0]) - 1  # [CLS] A
  assert ids[0] == tok.cls_id and ids[n_a] == tok.sep_id and ids[-1] == tok.sep_id and tok.mask_id in ids
  assert types == [0] * (n_a + 1) + [1] * (len(ids) - n_a - 1)
  assert any(tok.id_to_token(i).startswith('##') for i in ids)
  assert tok.decode(tok.encode([pair[0]], 64)[0][0]) == 'return the sorted list.'  # Lowercased, '##' joined.
  tok.save(str(tmp_path / 'tok'))
  assert sorted(os.listdir(tmp_path)) == ['tok']  # Nothing partial left beside it.
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  os.remove(tmp_path / 'tok' / 'tokenizer.json')  # vocab.txt alone, as transformers' slow tokenizers read it.
  hf_vocab = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  ours_vocab = tokenizer.load(str(tmp_path / 'tok'))
  for text in [*docs[:20], pair]:
    a, b = (text, None) if isinstance(text, str) else text
    want = tok.encode([text], 64)[0][0]
    assert hf(a, b, truncation=True, max_length=64)['input_ids'] == want
    assert hf_vocab(a, b, truncation=True, max_length=64)['input_ids'] == want
    assert ours_vocab.encode([text], 64)[0][0] == want
  cased = tokenizer.train_wordpiece(docs, 1000, lowercase=False)
  assert cased.decode(cased.encode(['Return'], 8)[0][0]) == 'Return'


def test_a_save_replaces_a_killed_one_and_keeps_other_files(tmp_path):
  tok = tokenizer.train_wordpiece(['ab cd', 'ab cd'], 15)
  (tmp_path / 'tok.partial').mkdir()
  (tmp_path / 'tok.partial' / 'tokenizer.json').write_text('{half')  # What a killed save leaves.
  tok.save(str(tmp_path / 'tok'), {'training.json': '{}'})
  assert sorted(os.listdir(tmp_path)) == ['tok']
  want = ['tokenizer.json', 'tokenizer_config.json', 'training.json', 'vocab.txt']
  assert sorted(os.listdir(tmp_path / 'tok')) == want
  # Into a directory that exists (an export): file by file, other files kept.
  (tmp_path / 'export').mkdir()
  (tmp_path / 'export' / 'params.bin').write_bytes(b'x')
  (tmp_path / 'export' / 'tokenizer.json').write_text('old')
  tok.save(str(tmp_path / 'export'))
  assert sorted(os.listdir(tmp_path)) == ['export', 'tok']
  assert sorted(os.listdir(tmp_path / 'export')) == [
    'params.bin',
    'tokenizer.json',
    'tokenizer_config.json',
    'vocab.txt',
  ]
  assert tokenizer.load(str(tmp_path / 'export')).vocab_size == tok.vocab_size == 13


def test_train_tokenizer_cli_refuses_a_corpus_without_text(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import train_tokenizer

  (tmp_path / 'blank.txt').write_text('\n  \n\t\n')
  out = tmp_path / 'out'
  assert train_tokenizer.main(['--input', f'text:{tmp_path}/blank.txt', '--out', str(out)]) == 2
  assert (
    capsys.readouterr().err.strip() == f"error: --input='text:{tmp_path}/blank.txt': no text to train a tokenizer on"
  )
  assert sorted(os.listdir(tmp_path)) == ['blank.txt']
