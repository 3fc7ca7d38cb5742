"""WordPiece training: deterministic across processes, BERT-shaped, saved by a run only when sound and matching."""

import json
import os
import subprocess
import sys

import pytest
from conftest import xla_flags

from jaxlm import tokenizer
from jaxlm.errors import UsageError

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


# ---- a training run's tokenizer: WORKDIR/tokenizer


def _config(spec, vocab=200, **data):
  from jaxlm import config as config_lib

  c = config_lib.base()
  c.data.train, c.data.train_tokenizer_vocab = spec, vocab
  c.data.update(data)
  return c


@pytest.fixture
def corpora(docs, tmp_path):
  """Two text corpora, text:.../a/*.txt and text:.../b/*.txt, of two files each."""
  for name, part in (('a', docs[:100]), ('b', docs[100:200])):
    (tmp_path / name).mkdir()
    for i in range(2):
      (tmp_path / name / f'part{i}.txt').write_text('\n'.join(part[i::2]) + '\n')
  return f'text:{tmp_path}/a/*.txt', f'text:{tmp_path}/b/*.txt'


def test_a_corpus_without_text_leaves_no_tokenizer(tmp_path):
  from jaxlm.data import vocab

  workdir = tmp_path / 'run'
  workdir.mkdir()
  for content in ('', '\n \n'):
    (tmp_path / 'empty.txt').write_text(content)
    spec = f'text:{tmp_path}/empty.txt'
    with pytest.raises(UsageError) as e:
      vocab.for_run(_config(spec), str(workdir))
    assert str(e.value) == f'data.train={spec!r}: no text to train a tokenizer on'
    assert os.listdir(workdir) == []


def test_a_saved_tokenizer_is_reused_only_for_the_same_data_and_settings(corpora, tmp_path, capsys):
  from jaxlm.data import vocab

  a, b = corpora
  workdir = tmp_path / 'run'
  saved = workdir / 'tokenizer'
  tok = vocab.for_run(_config(a), str(workdir))
  assert tok.vocab_size == 200 and sorted(os.listdir(workdir)) == ['tokenizer']
  record = json.loads((saved / 'training.json').read_text())
  assert record['data.train'] == a and record['data.train_tokenizer_vocab'] == 200 and record['data.lowercase']
  assert [f[0] for f in record['files']] == [str(tmp_path / 'a' / f'part{i}.txt') for i in range(2)]
  blob = (saved / 'tokenizer.json').read_bytes()
  capsys.readouterr()
  # The same settings: reused, and said so.
  again = vocab.for_run(_config(a), str(workdir))
  assert again.source == str(saved / 'tokenizer.json') and again.vocab_size == 200
  assert f'using the tokenizer in {saved}' in capsys.readouterr().out
  # A run that trains none takes it whatever its vocabulary size.
  assert vocab.for_run(_config(a, vocab=0), str(workdir)).vocab_size == 200
  # Other data or settings: one line naming the key, and the tokenizer is left alone.
  fix = f'use another workdir or delete {saved}'
  cases = [
    (_config(b), f'{saved} was trained on data.train={a!r} (vocab 200) but this run has data.train={b!r}: {fix}'),
    (_config(a, vocab=300), f'{saved} was trained with data.train_tokenizer_vocab=200 but this run has'
                            f' data.train_tokenizer_vocab=300: {fix}'),
    (_config(a, lowercase=False), f'{saved} was trained with data.lowercase=True but this run has'
                                  f' data.lowercase=False: {fix}'),
    (_config(a, text_docs='blank_line'), f"{saved} was trained with data.text_docs='line' but this run has"
                                         f" data.text_docs='blank_line': {fix}"),
  ]  # fmt: skip
  with open(tmp_path / 'a' / 'part1.txt', 'a') as f:
    f.write('one more document\n')
  cases.append((_config(a), f'{saved} was trained on data.train={a!r} but its files have changed since'
                            f' ({tmp_path}/a/part1.txt is new, gone, or of another size or time): {fix}'))  # fmt: skip
  for config, msg in cases:
    with pytest.raises(UsageError) as e:
      vocab.for_run(config, str(workdir))
    assert str(e.value) == msg
  assert (saved / 'tokenizer.json').read_bytes() == blob and sorted(os.listdir(workdir)) == ['tokenizer']
  # A tokenizer saved without a record (by an older run) is used, with a warning.
  os.remove(saved / 'training.json')
  assert vocab.for_run(_config(b), str(workdir)).vocab_size == 200
  assert f'warning: {saved} has no record' in capsys.readouterr().out


_TWO = """
import hashlib
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jaxlm import config
from jaxlm.data import vocab
from jaxlm.errors import UsageError
c = config.base()
c.data.train, c.data.train_tokenizer_vocab = sys.argv[3], 200
print('SHA', hashlib.sha256(vocab.for_run(c, sys.argv[5]).backend.to_str().encode()).hexdigest(), flush=True)
c.data.train = sys.argv[4]
try:
  vocab.for_run(c, sys.argv[6])
except UsageError as e:
  print('ERROR', e, flush=True)
"""


def test_processes_train_the_same_vocabulary_or_stop(corpora, tmp_path):
  import hashlib
  import socket

  a, _ = corpora
  (tmp_path / 'other.txt').write_text('zebra quartz jukebox\n' * 50)
  other = f'text:{tmp_path}/other.txt'
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}
  # Both processes train on `a` into one workdir; then process 1 alone reads other data: both stop.
  procs = [
    subprocess.Popen([sys.executable, '-c', _TWO, f'127.0.0.1:{port}', str(i), a, [a, other][i],
                      str(tmp_path / 'w1'), str(tmp_path / 'w2')],
                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(2)
  ]  # fmt: skip
  outs = [p.communicate(timeout=300) for p in procs]
  saved = hashlib.sha256(tokenizer.load(str(tmp_path / 'w1' / 'tokenizer')).backend.to_str().encode()).hexdigest()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    assert f'SHA {saved}' in out, out
    assert f'ERROR data.train={[a, other][i]!r}: the processes trained different vocabularies' in out, out
  assert os.listdir(tmp_path / 'w1') == ['tokenizer'] and not os.path.exists(tmp_path / 'w2' / 'tokenizer')


# ---- byte-level BPE (GPT-2 / Llama style)

_TRAIN_BPE = """
import sys
from jaxlm import tokenizer
texts = open(sys.argv[1], encoding='utf-8').read().split('\\n')
tokenizer.train_bpe(texts, 400).save(sys.argv[2])
"""

_UNICODE = 'Héllo wörld — 日本語 🙂\n\tdef f(x):  return x  # ünïcode'


@pytest.fixture(scope='module')
def bpe(docs):
  return tokenizer.train_bpe(docs, 400)


def test_bpe_training_is_byte_identical_in_a_fresh_process(docs, bpe, tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(docs), encoding='utf-8')
  env = {**os.environ, 'PYTHONHASHSEED': '3'}
  res = subprocess.run([sys.executable, '-c', _TRAIN_BPE, str(corpus), str(tmp_path / 'tok')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  bpe.save(str(tmp_path / 'here'))
  assert (tmp_path / 'tok' / 'tokenizer.json').read_bytes() == (tmp_path / 'here' / 'tokenizer.json').read_bytes()
  assert tokenizer.train_bpe(list(reversed(docs)), 400).backend.to_str() == bpe.backend.to_str()


def test_trained_bpe_is_a_gpt2_style_tokenizer(docs, bpe, tmp_path):
  import transformers

  assert (bpe.kind, bpe.vocab_size, bpe.eos_id, bpe.pad_id, bpe.bos_id, bpe.unk_id) == ('bpe', 400, 0, 0, None, None)
  assert bpe.id_to_token(0) == '<|endoftext|>' and bpe.id_to_token(1) == '!' and bpe.id_to_token(257) is not None
  assert (bpe.cls_id, bpe.sep_id, bpe.mask_id) == (None, None, None)
  [ids] = bpe.encode_plain([_UNICODE])
  assert bpe.decode(ids) == _UNICODE and 0 not in ids and max(ids) < 400
  # Text that spells the end-of-text token is text: only the caller puts id 0 in a stream.
  [spelled] = bpe.encode_plain(['a<|endoftext|>b'])
  assert 0 not in spelled and bpe.decode(spelled) == 'a<|endoftext|>b'
  assert bpe.encode([_UNICODE], 5) == [(ids[:5], [0] * 5)]  # No special tokens added, truncated.
  with pytest.raises(TypeError):
    bpe.encode_plain('one text')
  bpe.save(str(tmp_path / 'tok'))
  assert sorted(os.listdir(tmp_path / 'tok')) == ['tokenizer.json', 'tokenizer_config.json']
  again = tokenizer.load(str(tmp_path / 'tok'))
  assert (again.kind, again.eos_id, again.pad_id, again.bos_id) == ('bpe', 0, 0, None)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 0, None)
  for text in [*docs[:20], _UNICODE]:
    want = bpe.encode_plain([text])[0]
    assert hf(text)['input_ids'] == want and again.encode_plain([text])[0] == want
    assert hf.decode(want) == bpe.decode(want) == text
  with pytest.raises(UsageError) as e:
    tokenizer.train_bpe(docs, 256)
  assert str(e.value) == 'vocab_size=256: a byte-level BPE needs at least 257 tokens (the 256 bytes and <|endoftext|>)'


def test_gpt2_vocab_json_and_merges_txt_load_as_the_tokenizer_they_came_from(docs, bpe, tmp_path):
  """Older GPT-2 checkpoints hold vocab.json and merges.txt and no tokenizer.json: the same tokenizer as
  transformers' GPT2Tokenizer builds from them, special tokens whole, and a bad merges line named."""
  import transformers

  d = tmp_path / 'gpt2_files'
  d.mkdir()
  bpe.backend.model.save(str(d))
  assert sorted(os.listdir(d)) == ['merges.txt', 'vocab.json']
  tok = tokenizer.load(str(d))
  assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == ('bpe', 400, 0, 0, None)
  hf = transformers.GPT2Tokenizer.from_pretrained(str(d))
  for text in [*docs[:20], _UNICODE, ' a leading space', 'a<|endoftext|>b']:
    want = bpe.encode_plain([text])[0]
    assert tok.encode_plain([text])[0] == want and tok.decode(want) == text
    assert tok.backend.encode(text).ids == hf(text)['input_ids'] == bpe.backend.encode(text).ids
  assert tok.backend.encode('a<|endoftext|>').ids[-1] == 0  # What generation reads: the token whole.
  lines = (d / 'merges.txt').read_text().splitlines()
  (d / 'merges.txt').write_text('\n'.join([*lines[:3], 'a b c', *lines[3:]]) + '\n')
  with pytest.raises(UsageError, match=r'merges.txt:4: expected two symbols separated by a space'):
    tokenizer.load(str(d))


def _llama_style(docs):
  """A Llama-style BPE (SentencePiece spaces '▁', <unk> <s> </s> = ids 0-2, <s> before every text)."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  tok = HFTokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=['<unk>', '<s>', '</s>']))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
  return tok


def test_llama_style_bpe_loads_with_its_config_and_saves_for_transformers(docs, tmp_path):
  import transformers

  d = tmp_path / 'llama'
  d.mkdir()
  (d / 'tokenizer.json').write_text(_llama_style(docs).to_str())
  added = lambda t: {'__type': 'AddedToken', 'content': t, 'lstrip': False, 'rstrip': False}  # noqa: E731
  config = {'tokenizer_class': 'LlamaTokenizer', 'bos_token': added('<s>'), 'eos_token': added('</s>'),
            'unk_token': added('<unk>'), 'pad_token': None}  # fmt: skip
  (d / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = tokenizer.load(str(d))
  assert (tok.kind, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == ('bpe', 0, 1, 2, 2)
  text = 'Return the sorted list, plain.'
  [plain] = tok.encode_plain([text])
  assert tok.encode([text], 64)[0][0] == [1, *plain] and tok.decode(plain) == text
  tok.save(str(tmp_path / 'saved'))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'saved'))
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 2, 0)
  for t in [*docs[:10], text]:
    assert hf(t)['input_ids'] == tok.encode([t], 10_000)[0][0]
  # Without a config the usual names are found; a config naming a token outside the vocabulary is an error.
  os.remove(d / 'tokenizer_config.json')
  found = tokenizer.load(str(d))
  assert (found.bos_id, found.eos_id, found.pad_id) == (1, 2, 2)
  (d / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|eot_id|>'}))
  with pytest.raises(UsageError) as e:
    tokenizer.load(str(d))
  assert str(e.value) == f"{d}/tokenizer.json: eos_token '<|eot_id|>' of tokenizer_config.json is not in the vocabulary"


def test_train_tokenizer_cli_trains_bpe(docs, tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import train_tokenizer

  (tmp_path / 'corpus.txt').write_text('\n'.join(docs[:100]))
  out = tmp_path / 'out'
  assert train_tokenizer.main(['--input', f'text:{tmp_path}/corpus.txt', '--out', str(out), '--kind', 'bpe',
                               '--vocab_size', '300']) == 0  # fmt: skip
  tok = tokenizer.load(str(out))
  assert (tok.kind, tok.vocab_size, tok.eos_id) == ('bpe', 300, 0)
  (tmp_path / 'blank.txt').write_text('\n  \n')
  args = ['--input', f'text:{tmp_path}/blank.txt', '--out', str(tmp_path / 'none'), '--kind', 'bpe']
  assert train_tokenizer.main(args) == 2
  assert (
    capsys.readouterr().err.strip() == f"error: --input='text:{tmp_path}/blank.txt': no text to train a tokenizer on"
  )
  assert not os.path.exists(tmp_path / 'none')
