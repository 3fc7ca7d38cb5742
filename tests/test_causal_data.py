"""Causal LM data: documents + end-of-text cut into shifted rows, separate documents, SFT weights, per-process shares."""

import json

import numpy as np
import pytest

from jaxlm import tokenizer
from jaxlm.data import causal, pretrain
from jaxlm.errors import UsageError

DOCS = ['hello world', 'ab', 'the end of it all here', 'Ünïcode — 日本語 🙂 at last.']


@pytest.fixture(scope='module')
def bpe():
  from jaxlm.data.builtin import stdlib_documents

  return tokenizer.train_bpe(stdlib_documents()[:300], 400)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """text:... of DOCS (one per line), and text:... of 120 numbered documents."""
  d = tmp_path_factory.mktemp('causal')
  (d / 'docs.txt').write_text('\n'.join(DOCS) + '\n', encoding='utf-8')
  (d / 'many.txt').write_text(''.join(f'document {i} says {"la " * (i % 7)}and ends\n' for i in range(120)))
  return f'text:{d}/docs.txt', f'text:{d}/many.txt'


def _rows(ds) -> list[dict]:
  return [{k: v[0] for k, v in b.items()} for b in pretrain.Iterator(ds)]


def test_rows_are_the_documents_and_eos_shifted_by_one(bpe, corpus):
  T = 8
  stream = [t for ids in bpe.encode_plain(DOCS) for t in [*ids, bpe.eos_id]]
  rows = _rows(causal.causal_dataset(corpus[0], bpe, seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False))
  assert len(stream) % (T + 1) > 1 and len(rows) == -(-len(stream) // (T + 1))
  for i, r in enumerate(rows):
    assert sorted(r) == ['input_ids', 'loss_weights', 'targets']
    assert r['input_ids'].dtype == r['targets'].dtype == np.int32 and r['loss_weights'].dtype == np.float32
    chunk = stream[i * (T + 1) : (i + 1) * (T + 1)]
    n = len(chunk)
    padded = chunk + [bpe.pad_id] * (T + 1 - n)
    assert r['input_ids'].tolist() == padded[:-1] and r['targets'].tolist() == padded[1:]
    assert r['loss_weights'].tolist() == [1.0] * (n - 1) + [0.0] * (T + 1 - n)  # The cross-document target counts.
  assert n < T + 1  # The last row is padded, and its padding weighs nothing.
  tokens = np.concatenate([[r['input_ids'][0], *r['targets'][r['loss_weights'] > 0]] for r in rows])
  assert tokens.tolist() == stream and bpe.decode(stream) == ''.join(DOCS)  # Every token; EOS between documents.


def test_separate_documents_restart_segments_and_positions(bpe, corpus):
  T = 8
  ids = bpe.encode_plain(DOCS)
  eos = bpe.eos_id
  rows = _rows(causal.causal_dataset(corpus[0], bpe, seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False,
                                     separate_documents=True))  # fmt: skip
  plain = _rows(causal.causal_dataset(corpus[0], bpe, seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False))
  assert [r['input_ids'].tolist() for r in rows] == [r['input_ids'].tolist() for r in plain]  # The same packing.
  # Python's account of every input token: (document, position in its piece of the row).
  stream = [(d, t) for d, doc in enumerate(ids) for t in [*doc, eos]]
  for i, r in enumerate(rows):
    chunk = stream[i * (T + 1) : (i + 1) * (T + 1)]
    inputs = chunk[:T]
    segs, pos, weights = [], [], []
    for j, (d, t) in enumerate(inputs):
      new = j == 0 or inputs[j - 1][0] != d
      segs.append(1 if j == 0 else segs[-1] + new)
      pos.append(0 if new else pos[-1] + 1)
      weights.append(float(j + 1 < len(chunk) and t != eos))  # No target across documents, none on padding.
    fill = [0] * (T - len(inputs))
    assert r['segment_ids'].tolist() == segs + fill and r['position_ids'].tolist() == pos + fill
    assert r['loss_weights'].tolist() == weights + [0.0] * len(fill)
    assert r['segment_ids'].dtype == r['position_ids'].dtype == np.int32
  # Known rows: the first holds 'hello world' (6 tokens) + EOS and 'ab' (1 token); 'ab' predicts its EOS.
  assert len(ids[0]) == 6 and len(ids[1]) == 1
  assert rows[0]['segment_ids'].tolist() == [1] * 7 + [2] and rows[0]['position_ids'].tolist() == [*range(7), 0]
  assert rows[0]['loss_weights'].tolist() == [1.0] * 6 + [0.0, 1.0] and rows[0]['targets'][-1] == eos
  assert rows[-1]['segment_ids'][-1] == 0 and rows[-1]['loss_weights'][-1] == 0.0


def test_processes_share_the_global_batches_of_one(bpe, corpus):
  G, T = 4, 16
  args = dict(seq_len=T, global_batch_size=G, seed=7, shuffle_buffer=50, separate_documents=True)
  it = pretrain.Iterator(causal.causal_dataset(corpus[1], bpe, **args))
  one = [next(it) for _ in range(5)]
  again = pretrain.Iterator(causal.causal_dataset(corpus[1], bpe, **args))
  assert all(np.array_equal(b['input_ids'], next(again)['input_ids']) for b in one)  # The seed decides.
  its = [pretrain.Iterator(causal.causal_dataset(corpus[1], bpe, process_index=i, process_count=2, **args))
         for i in range(2)]  # fmt: skip
  for b in one:
    mine = [next(it) for it in its]
    assert all(m['input_ids'].shape == (G // 2, T) for m in mine)
    for k in b:  # Global row j is row j // 2 of process j % 2.
      assert np.array_equal(b[k], np.stack([mine[j % 2][k][j // 2] for j in range(G)]))
  other = next(pretrain.Iterator(causal.causal_dataset(corpus[1], bpe, **{**args, 'seed': 8})))
  assert not np.array_equal(other['input_ids'], one[0]['input_ids'])


def test_eval_batches_cover_the_set_once_with_zero_weight_padding(bpe, corpus):
  T, G = 16, 6
  rows = _rows(causal.causal_dataset(corpus[1], bpe, seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False,
                                     key='data.eval'))  # fmt: skip
  assert len(rows) % G  # The last global batch needs padding rows.
  shares = [causal.eval_batches(corpus[1], bpe, seq_len=T, global_batch_size=G, process_index=i, process_count=2)
            for i in range(2)]  # fmt: skip
  assert len(shares[0]) == len(shares[1]) == -(-len(rows) // G)
  got = [r for b0, b1 in zip(*shares) for part in (b0, b1) for r in _unstack(part)]
  for r, want in zip(got, rows):
    assert all(np.array_equal(r[k], want[k]) for k in want)
  assert all(not r['loss_weights'].any() and not r['input_ids'].any() for r in got[len(rows) :])
  segmented = causal.eval_batches(corpus[0], bpe, seq_len=T, global_batch_size=G, process_index=0, process_count=1,
                                  separate_documents=True)  # fmt: skip
  assert sorted(segmented[0]) == ['input_ids', 'loss_weights', 'position_ids', 'segment_ids', 'targets']
  assert segmented[0]['segment_ids'][-1].tolist() == [0] * T  # A padding row: segment 0 only.


def _unstack(batch: dict) -> list[dict]:
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch['input_ids']))]


@pytest.fixture(scope='module')
def sft_file(tmp_path_factory):
  d = tmp_path_factory.mktemp('sft')
  rows = [
    {'prompt': 'Q: what is 2+2?', 'response': ' A: 4'},
    {'prompt': 'Translate: chat', 'response': ' → cat, le chat 🐈 ' * 3},  # Cut at seq_len + 1 tokens.
    {'prompt': 'x ' * 40, 'response': ' never seen'},  # The prompt alone fills the row: no target, dropped.
    {'prompt': '', 'response': 'all response'},
  ]
  with open(d / 'train.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return d, rows


def test_sft_weighs_only_the_response_and_its_eos(bpe, sft_file):
  T = 16
  d, recs = sft_file
  spec = f'jsonl:{d}/*.jsonl'
  rows = _rows(causal.sft_dataset(spec, bpe, seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False))
  kept = [r for r in recs if len(bpe.encode_plain([r['prompt']])[0]) <= T]
  assert len(rows) == len(kept) == 3
  for r, rec in zip(rows, kept):
    assert sorted(r) == ['input_ids', 'loss_weights', 'targets']
    [p, a] = bpe.encode_plain([rec['prompt'], rec['response']])
    x = [*p, *a, bpe.eos_id][: T + 1]
    padded = x + [bpe.pad_id] * (T + 1 - len(x))
    assert r['input_ids'].tolist() == padded[:-1] and r['targets'].tolist() == padded[1:]
    # Target j (at position j - 1) weighs 1 when it is a response token or the EOS, not a prompt token or padding.
    assert r['loss_weights'].tolist() == [float(len(p) <= j < len(x)) for j in range(1, T + 1)]
  assert rows[0]['targets'][np.flatnonzero(rows[0]['loss_weights'])[-1]] == bpe.eos_id  # The last target is EOS.
  assert rows[1]['loss_weights'][-1] == 1.0 and bpe.eos_id not in rows[1]['targets'].tolist()  # Cut: no EOS.
  assert rows[2]['loss_weights'].tolist()[:4] == [1.0] * 4  # No prompt: every target is the response's.
  shares = [causal.sft_eval_batches(spec, bpe, seq_len=T, global_batch_size=4, process_index=i, process_count=2)
            for i in range(2)]  # fmt: skip
  got = [r for b0, b1 in zip(*shares) for part in (b0, b1) for r in _unstack(part)]
  assert len(got) == 4 and not got[3]['loss_weights'].any()
  for r, want in zip(got, rows):
    assert all(np.array_equal(r[k], want[k]) for k in want)


def test_errors_name_the_file_the_field_or_the_tokenizer(bpe, sft_file, corpus, tmp_path):
  d, _ = sft_file
  spec = f'jsonl:{d}/*.jsonl'
  with pytest.raises(UsageError) as e:
    causal.sft_dataset(spec, bpe, seq_len=16, global_batch_size=1, response_field='answer')
  assert str(e.value) == f"{d}/train.jsonl:1: no field 'answer' (the record has ['prompt', 'response'])"
  (tmp_path / 'late.jsonl').write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
  with pytest.raises(UsageError) as e:  # Found by the first read, here the check that the set is not empty.
    causal.sft_dataset(f'jsonl:{tmp_path}/late.jsonl', bpe, seq_len=16, global_batch_size=1, repeat=False)
  assert str(e.value) == f"{tmp_path}/late.jsonl:2: no field 'response' (the record has ['prompt'])"
  (tmp_path / 'long.jsonl').write_text(json.dumps({'prompt': 'x ' * 40, 'response': 'y'}) + '\n')
  with pytest.raises(UsageError) as e:
    causal.sft_dataset(f'jsonl:{tmp_path}/long.jsonl', bpe, seq_len=16, global_batch_size=1)
  assert str(e.value) == (f"data.train='jsonl:{tmp_path}/long.jsonl': no 'prompt' / 'response' example with a"
                          ' response token within seq_len=16')  # fmt: skip
  with pytest.raises(UsageError) as e:
    causal.sft_dataset('builtin:stdlib', bpe, seq_len=16, global_batch_size=1)
  assert 'prompt / response records' in str(e.value)
  (tmp_path / 'blank.txt').write_text('\n \n')
  with pytest.raises(UsageError) as e:
    causal.causal_dataset(f'text:{tmp_path}/blank.txt', bpe, seq_len=16, global_batch_size=1)
  assert str(e.value) == f"data.train='text:{tmp_path}/blank.txt': no tokens; is the corpus empty?"
  wordpiece = tokenizer.train_wordpiece(DOCS, 40)
  with pytest.raises(UsageError) as e:
    causal.causal_dataset(corpus[0], wordpiece, seq_len=16, global_batch_size=1)
  assert str(e.value).startswith('trained: the tokenizer has no end-of-text token')
  with pytest.raises(UsageError) as e:
    causal.causal_dataset(corpus[0], bpe, seq_len=16, global_batch_size=3, process_count=2)
  assert str(e.value) == 'global_batch_size=3 is not a multiple of the 2 processes'


CHATS = [
  [{'role': 'user', 'content': 'what follows one?'}, {'role': 'assistant', 'content': 'two'}],
  [{'role': 'system', 'content': 'Count.'}, {'role': 'user', 'content': 'one'}, {'role': 'assistant', 'content': 'two'},
   {'role': 'user', 'content': 'and then?'}, {'role': 'assistant', 'content': 'three, then caf\u00e9 \U0001f642'}],
]  # fmt: skip


@pytest.fixture(scope='module')
def chat_tok(bpe, tmp_path_factory):
  """`bpe` (a copy) with ChatML's two special tokens and the CHATML template, saved for transformers too."""
  from conftest import CHATML

  path = tmp_path_factory.mktemp('chat_tok')
  bpe.save(str(path))
  tok = tokenizer.load(str(path))
  tok.backend.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  tok.chat_template = CHATML
  tok.save(str(path))
  return tok, str(path)


def test_conversations_are_tokenized_as_transformers_does_and_weigh_the_assistant_turns(chat_tok, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import transformers

  tok, path = chat_tok
  hf = transformers.AutoTokenizer.from_pretrained(path)
  with open(tmp_path / 'chats.jsonl', 'w') as f:
    f.writelines(json.dumps({'messages': c, 'n': i}) + '\n' for i, c in enumerate(CHATS))
  (tmp_path / 'pq').mkdir()
  pq.write_table(pa.table({'messages': CHATS, 'n': [0, 1]}), tmp_path / 'pq' / 'chats.parquet')  # list<struct>.
  T = 96
  kw = dict(seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False, messages_field='messages')
  for spec in (f'jsonl:{tmp_path}/chats.jsonl', f'parquet:{tmp_path}/pq/*.parquet'):
    rows = _rows(causal.sft_dataset(spec, tok, **kw))
    assert len(rows) == 2
    for conv, r in zip(CHATS, rows):
      want = hf.apply_chat_template(conv, tokenize=True, return_dict=False)
      assert len(want) <= T + 1
      padded = want + [tok.pad_id] * (T + 1 - len(want))
      assert r['input_ids'].tolist() == padded[:-1] and r['targets'].tolist() == padded[1:]
      # The weighted targets are the assistant's words and the template's end of each of its turns, nothing else.
      turns = [m['content'] + '<|im_end|>\n' for m in conv if m['role'] == 'assistant']
      assert hf.decode(r['targets'][r['loss_weights'] > 0]) == ''.join(turns)
  # Cut at seq_len + 1 tokens: the second conversation keeps the weights of what is left of it.
  n = len(hf.apply_chat_template(CHATS[1], tokenize=True, return_dict=False))
  short = _rows(causal.sft_dataset(f'jsonl:{tmp_path}/chats.jsonl', tok, **{**kw, 'seq_len': n - 4}))
  assert short[1]['input_ids'].tolist() == rows[1]['input_ids'].tolist()[: n - 4]
  assert short[1]['loss_weights'].tolist() == rows[1]['loss_weights'].tolist()[: n - 4]
  with pytest.raises(UsageError, match=r"no 'messages' conversation with an assistant token within seq_len=8"):
    causal.sft_dataset(f'jsonl:{tmp_path}/chats.jsonl', tok, **{**kw, 'seq_len': 8})


# Roles as words, the assistant's turns ended by </s>.
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% else %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"


def test_a_conversation_that_cannot_be_read_or_cut_is_one_error(chat_tok, tmp_path):
  from jaxlm import chat

  tok, _ = chat_tok
  kw = dict(seq_len=64, global_batch_size=1, shuffle_buffer=0, repeat=False, messages_field='messages')
  (tmp_path / 'bad.jsonl').write_text(json.dumps({'messages': 'not a conversation'}) + '\n')
  with pytest.raises(UsageError, match=r"data.train: the conversation 'not a conversation': not JSON"):
    causal.sft_dataset(f'jsonl:{tmp_path}/bad.jsonl', tok, **kw)
  (tmp_path / 'role.jsonl').write_text(json.dumps({'messages': [{'role': 'user', 'text': 'hi'}]}) + '\n')
  with pytest.raises(UsageError, match=r'message 0: expected \{"role": str, "content": str\}'):
    causal.sft_dataset(f'jsonl:{tmp_path}/role.jsonl', tok, **kw)
  # A template that writes the last turn otherwise than the earlier ones cannot tell the turns apart.
  rewrites = (
    "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
  )
  with pytest.raises(UsageError, match='conversation 1, message 2: the chat template renders the conversation up to'):
    chat.assistant_spans(rewrites, CHATS[1], where='conversation 1')
  text, spans = chat.assistant_spans(PLAIN, CHATS[0])  # trim_blocks drops the newline after a block tag.
  assert text == 'user: what follows one?assistant: two</s>' and [text[a:b] for a, b in spans] == ['two</s>']


def test_sft_batches_are_cut_to_length_buckets_the_same_on_every_process(bpe, tmp_path):
  T, buckets = 16, (4, 8, 12, 16)
  recs = [{'prompt': 'Q: 2+2?', 'response': ' 4'}, {'prompt': 'Q: 3+3?', 'response': ' 6'},
          {'prompt': 'Translate: chat', 'response': ' cat, le chat \U0001f408' * 3}, {'prompt': 'a', 'response': ' b'}]  # fmt: skip
  (tmp_path / 'sft.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  spec = f'jsonl:{tmp_path}/sft.jsonl'
  kw = dict(seq_len=T, shuffle_buffer=0, repeat=False)
  rows = _rows(causal.sft_dataset(spec, bpe, global_batch_size=1, **kw))  # Uncut, one a batch.
  need = [int(np.flatnonzero(r['loss_weights'])[-1]) + 1 for r in rows]
  assert len(rows) == 4 and max(need[:2]) <= 12 and need[2] == T
  shares = [list(pretrain.Iterator(causal.sft_dataset(spec, bpe, global_batch_size=2, buckets=buckets,
                                                      process_index=i, process_count=2, **kw))) for i in range(2)]  # fmt: skip
  for i, batches in enumerate(shares):  # Process i holds row i of each global batch of 2.
    assert len(batches) == 2
    for g, batch in enumerate(batches):
      cut = min(b for b in buckets if b >= max(need[2 * g : 2 * g + 2]))
      assert batch['input_ids'].shape == (1, cut)
      for k in batch:  # Cut after the weighted targets: nothing the loss reads is lost.
        np.testing.assert_array_equal(batch[k][0], rows[2 * g + i][k][:cut])
      assert batch['loss_weights'].sum() == rows[2 * g + i]['loss_weights'].sum()
  assert shares[0][0]['input_ids'].shape[1] < T == shares[0][1]['input_ids'].shape[1]
  # Evaluation: sorted by length (the sums do not care), each global batch cut to its own bucket.
  kw = dict(seq_len=T, global_batch_size=2, process_index=0, process_count=1)
  whole, cut = causal.sft_eval_batches(spec, bpe, **kw), causal.sft_eval_batches(spec, bpe, buckets=buckets, **kw)
  assert [b['input_ids'].shape[1] for b in whole] == [T, T]
  n = sorted(need)
  assert [b['input_ids'].shape[1] for b in cut] == [min(b for b in buckets if b >= max(n[j : j + 2])) for j in (0, 2)]
  assert sum(b['loss_weights'].sum() for b in cut) == sum(b['loss_weights'].sum() for b in whole)


def test_packed_examples_are_the_examples_whole_apart_and_each_once(bpe, chat_tok, tmp_path):
  T = 64
  words = ['one', 'two', 'three', 'four', 'five', 'six']
  recs = [{'prompt': f'Q: what follows {w}?', 'response': f' {words[(i + 1) % 6]}' * (1 + i % 3)}
          for i, w in enumerate(words * 3)]  # fmt: skip
  recs.append({'prompt': 'x ' * 40, 'response': ' never seen'})  # Cut before its response: dropped, packed or not.
  (tmp_path / 'sft.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
  spec = f'jsonl:{tmp_path}/sft.jsonl'
  kw = dict(seq_len=T, global_batch_size=1, shuffle_buffer=0, repeat=False)
  alone = _rows(causal.sft_dataset(spec, bpe, **kw))
  packed = _rows(causal.sft_dataset(spec, bpe, pack=True, **kw))
  assert len(alone) == 18 and len(packed) < len(alone) / 2  # Fewer rows, far less padding.
  seen = []
  for r in packed:
    assert sorted(r) == ['input_ids', 'loss_weights', 'position_ids', 'segment_ids', 'targets']
    seg = r['segment_ids']
    n = int((seg > 0).sum())
    assert seg[:n].tolist() == sorted(seg[:n].tolist()) and not seg[n:].any()  # Segments 1, 2, ..., then padding.
    assert not r['loss_weights'][n:].any() and (r['input_ids'][n:] == bpe.pad_id).all()
    for s in range(1, int(seg.max()) + 1):
      at = np.flatnonzero(seg == s)
      assert r['position_ids'][at].tolist() == list(range(len(at)))  # From 0 in each example.
      seen.append({k: r[k][at].tolist() for k in ('input_ids', 'targets', 'loss_weights')})
  # Every example once, whole: the positions up to its last weighted target, as it is alone in a row.
  want = []
  for a in alone:
    n = int(np.flatnonzero(a['loss_weights'])[-1]) + 1
    want.append({k: a[k][:n].tolist() for k in ('input_ids', 'targets', 'loss_weights')})
  assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, want))
  again = _rows(causal.sft_dataset(spec, bpe, pack=True, **kw))  # The same examples, the same rows.
  assert len(again) == len(packed) and all(np.array_equal(x[k], y[k]) for x, y in zip(again, packed) for k in x)
  # Conversations pack the same way; the evaluation keeps one example a row.
  tok, _ = chat_tok
  convs = [[{'role': 'user', 'content': f'what follows {w}?'}, {'role': 'assistant', 'content': w}] for w in words]
  (tmp_path / 'chats.jsonl').write_text(''.join(json.dumps({'messages': c}) + '\n' for c in convs))
  chats = f'jsonl:{tmp_path}/chats.jsonl'
  rows = _rows(causal.sft_dataset(chats, tok, messages_field='messages', pack=True, **{**kw, 'seq_len': 128}))
  assert len(rows) < len(convs) and sum(int(r['segment_ids'].max()) for r in rows) == len(convs)
  evals = causal.sft_eval_batches(spec, bpe, seq_len=T, global_batch_size=4, process_index=0, process_count=1)
  assert 'segment_ids' not in evals[0]
