"""Generation and perplexity (generate.py) against transformers on the same random GPT-2 and Llama weights:
greedy output token for token, perplexity within 1e-4, one compile per shape, sampling controls; the int8 model
(quant.py) against the float one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CHATML, save_random_causal_lm
from flax import nnx

from jaxlm import decoder, generate, hf_causal, store

SHAPES = {
  'gpt2': ('gpt2', dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=96)),
  'llama': (
    'llama',
    dict(
      vocab_size=300,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=8,
      num_key_value_heads=2,
      max_position_embeddings=96,
      tie_word_embeddings=False,
    ),
  ),  # fmt: skip
}
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [250], [3, 3, 3, 3, 3]]


@pytest.fixture(scope='module', params=list(SHAPES))
def model(request, tmp_path_factory):
  family, kw = SHAPES[request.param]
  path = save_random_causal_lm(family, str(tmp_path_factory.mktemp(request.param)), seed=3, **kw)
  graphdef, params, _ = hf_causal.load(path)
  return path, generate.Generator(graphdef, params, tokenizer=None, batch_size=4)


def _hf_greedy(path, prompt, n, eos=None):
  """transformers' greedy continuation; `eos` 'config': the stop ids its config and generation config name."""
  import transformers

  m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  stops = {} if eos == 'config' else {'eos_token_id': eos}
  with torch.no_grad():
    out = m.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0,
                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **stops)  # fmt: skip
  return out[0, len(prompt) :].tolist()


def test_greedy_generation_equals_transformers_token_for_token(model):
  path, gen = model
  ours = gen.generate_ids(PROMPTS, max_new_tokens=12, stop_ids=[])
  for prompt, row in zip(PROMPTS, ours):
    assert row == _hf_greedy(path, prompt, 12)
  assert len({tuple(r) for r in ours}) > 1  # The prompts lead to different continuations.


def test_a_stop_token_ends_its_row_only(model):
  path, gen = model
  free = gen.generate_ids(PROMPTS, max_new_tokens=12, stop_ids=[])
  stop = free[1][4]  # A token the second prompt produces as its fifth.
  rows = gen.generate_ids(PROMPTS, max_new_tokens=12, stop_ids=[stop])
  for f, r in zip(free, rows):
    cut = f.index(stop) + 1 if stop in f else len(f)
    assert r == f[:cut]
  assert rows[1] == _hf_greedy(path, PROMPTS[1], 12, eos=stop)


def _first_new(row, start):
  """The index of the first token of `row` from `start` on that none before it is."""
  return next(i for i in range(start, len(row)) if row[i] not in row[:i])


def test_every_end_of_sequence_id_hugging_face_names_ends_a_row(tmp_path):
  """An instruct model ends a turn with a token of its own: config.json's eos_token_id is a list, and
  generation_config.json may name more. transformers' generate stops at any of them, and so does jaxlm; an export
  writes them all back, and a jaxlm model config keeps them."""
  import dataclasses
  import json
  import os

  from jaxlm import models

  family, kw = SHAPES['llama']
  path = save_random_causal_lm(family, str(tmp_path / 'hf'), seed=3, **kw)
  free = generate.Generator(*hf_causal.load(path)[:2], tokenizer=None).generate_ids([PROMPTS[1]], 12, stop_ids=[])[0]
  early = free[_first_new(free, 3)]
  late = free[_first_new(free, free.index(early) + 1)]
  assert 2 not in free[: free.index(late) + 1]
  for name, eos in (('config.json', [2, late]), ('generation_config.json', [2, late, early])):
    with open(os.path.join(path, name)) as f:
      hf = json.load(f)
    with open(os.path.join(path, name), 'w') as f:
      json.dump({**hf, 'eos_token_id': eos}, f)
  graphdef, params, _ = hf_causal.load(path)
  cfg = decoder.merge(graphdef, params).cfg
  assert (cfg.eos_token_id, cfg.stop_token_ids) == (2, (late, early))
  row = generate.Generator(graphdef, params, tokenizer=None).generate_ids([PROMPTS[1]], 12)[0]
  assert row == free[: free.index(early) + 1] == _hf_greedy(path, PROMPTS[1], 12, eos='config')
  assert len(row) < len(free)
  hf_causal.save(params, cfg, str(tmp_path / 'out'))
  assert json.load(open(tmp_path / 'out' / 'config.json'))['eos_token_id'] == [2, late, early]
  assert models.config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_one_compile_per_shape_not_per_token_or_prompt(model):
  _, gen = model
  generate._generate_fn.cache_clear()
  first = gen.generate_ids([[5, 6, 7]], max_new_tokens=6)
  fn = generate._generate_fn(gen.graphdef, gen.batch_size, 16, 6, False)
  assert fn._cache_size() == 1
  gen.generate_ids([[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [1, 2]], max_new_tokens=6)  # Same bucket (16), new lengths.
  gen.generate_ids([[5, 6, 7]], max_new_tokens=6, stop_ids=[1, 2, 3])  # Other stop tokens.
  assert fn._cache_size() == 1 and generate._generate_fn.cache_info().currsize == 1
  assert gen.generate_ids([[5, 6, 7]], max_new_tokens=6) == first


def test_sampling_is_seeded_and_its_controls_act(model):
  _, gen = model
  kw = dict(max_new_tokens=16, stop_ids=[])
  a = gen.generate_ids(PROMPTS, temperature=1.0, seed=1, **kw)
  assert a == gen.generate_ids(PROMPTS, temperature=1.0, seed=1, **kw)
  assert a != gen.generate_ids(PROMPTS, temperature=1.0, seed=2, **kw)
  greedy = gen.generate_ids(PROMPTS, **kw)
  assert gen.generate_ids(PROMPTS, temperature=1.0, top_k=1, seed=5, **kw) == greedy  # top-1 is argmax.
  assert gen.generate_ids(PROMPTS, temperature=1.0, top_p=1e-6, seed=5, **kw) == greedy  # So is the top-p nucleus.
  assert gen.generate_ids(PROMPTS, temperature=1e-4, seed=5, **kw) == greedy  # Nearly cold: the argmax.


def test_perplexity_equals_transformers(model, monkeypatch):
  import transformers

  path, gen = model
  texts = [[5, 6, 7, 8, 9, 10], list(range(20, 61)), [100, 200]]
  monkeypatch.setattr(gen, '_encode', lambda _: texts)  # Token ids in, as a tokenizer would give them.
  ours = gen.perplexity(['a', 'b', 'c'])
  m = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  for ids, p in zip(texts, ours):
    with torch.no_grad():
      loss = m(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    np.testing.assert_allclose(p, np.exp(loss), rtol=1e-4)


def test_int8_logits_stay_near_float_and_greedy_decoding_follows_the_float_model(model):
  """The int8 model of a Hugging Face directory quantized on loading: its kernels are int8 in memory, its logits
  (scanned and unrolled) within 5% (relative, Frobenius) of the float model's, its cached decode is its own
  whole-row argmax, and its greedy tokens are the float model's.

  Each kernel's rounding error is about 0.6% of its norm (a step of max|w| / 127 per output channel, uniform:
  step / sqrt(12)); 12 or 14 such kernels in a row of these random std-0.2 layers put the logits 1.7% (GPT-2) /
  2.5% (Llama) from float. Greedy decoding: all 4 rows x 12 tokens are the float model's here (CPU programs
  are deterministic, so this is no matter of chance); the test allows a row to part from the float one only
  where the float model's top two logits are within the logit error bound, and asks 3 of 4 rows to be equal."""
  path, gen = model
  qgraphdef, qparams, _, _ = store.load_model(path, quantization='int8')
  flat = dict(nnx.to_flat_state(qparams))
  kernels = [k for k in decoder.INT8_KERNELS if ('layers', k) in flat]
  assert len(kernels) == {'gpt2': 6, 'llama': 7}[gen.cfg.family]
  assert all(flat[('layers', k)].get_value().dtype == jnp.int8 for k in kernels)
  assert all(flat[('layers', f'{k}_scale')].get_value().dtype == jnp.float32 for k in kernels)
  q = generate.Generator(qgraphdef, qparams, tokenizer=None, batch_size=4)
  assert q.cfg.quantization == 'int8'
  got = q.generate_ids(PROMPTS, max_new_tokens=12, stop_ids=[])

  ids = np.zeros((4, 32), np.int32)  # Each prompt and its int8 continuation; causal: the padding changes nothing.
  for r, (prompt, row) in enumerate(zip(PROMPTS, got)):
    ids[r, : len(prompt) + 12] = prompt + row
  valid = np.arange(32)[None, :] < np.asarray([len(p) + 12 for p in PROMPTS])[:, None]
  f = np.asarray(jax.jit(lambda p, x: decoder.apply(gen.graphdef, p, x)['logits'])(gen.params, ids))
  for scan in (True, False):
    graphdef, _ = decoder.abstract(q.cfg.replace(scan_layers=scan))
    logits = np.asarray(jax.jit(lambda p, x: decoder.apply(graphdef, p, x)['logits'])(qparams, ids))
    rel = np.linalg.norm(logits[valid] - f[valid]) / np.linalg.norm(f[valid])
    assert rel < 5e-2, (scan, rel)
  bound = 2 * 5e-2 * np.sqrt(np.mean(np.square(f[valid])))  # Two logits, each off by about the bound on average.
  same = 0
  for r, (prompt, row) in enumerate(zip(PROMPTS, got)):
    steps = slice(len(prompt) - 1, len(prompt) + 11)
    assert logits[r, steps].argmax(-1).tolist() == row  # Cached decoding is the whole-row forward's argmax.
    # The float model's greedy pick after each int8 prefix: up to the first difference, its own greedy output.
    f_pick = f[r, steps].argmax(-1)
    parted = np.flatnonzero(f_pick != np.asarray(row))
    if not len(parted):
      same += 1
      continue
    j = parted[0]
    assert f[r, steps][j, f_pick[j]] - f[r, steps][j, row[j]] < bound, (r, j)  # A near-tie of the float model.
  assert same >= 3, got


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
  """A random GPT-2 with a real byte-level BPE tokenizer (trained here) in one Hugging Face directory."""
  from jaxlm import tokenizer
  from jaxlm.data import sources

  path = str(tmp_path_factory.mktemp('gpt2_bpe'))
  tok = tokenizer.train_bpe(list(sources.BUILTIN['stdlib']())[:200], 400)
  save_random_causal_lm('gpt2', path, seed=4, vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
  tok.save(path)
  return path


def test_load_generates_text_like_transformers_and_predict_streams_it(gpt2_dir, tmp_path, capsys):
  import json

  import transformers

  import jaxlm
  from jaxlm import predict

  gen = jaxlm.load(gpt2_dir)
  assert isinstance(gen, generate.Generator)
  prompts = ['def read(path):', 'The module', 'Return the']
  texts = gen.generate(prompts, max_new_tokens=8)
  tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  for prompt, text in zip(prompts, texts):
    ids = tok(prompt)['input_ids']
    assert text == tok.decode(_hf_greedy(gpt2_dir, ids, 8, eos=tok.eos_token_id), skip_special_tokens=True)
  assert len(texts[0]) > 5
  cut = texts[0][2:5]  # A stop string: the text ends before it.
  assert gen.generate(prompts[:1], max_new_tokens=8, stop=[cut])[0] == texts[0][: texts[0].index(cut)]

  src, out = tmp_path / 'prompts.txt', tmp_path / 'out.jsonl'
  src.write_text('\n'.join(prompts) + '\n')
  args = ['--checkpoint', gpt2_dir, '--input', str(src), '--output', str(out), '--mode', 'generate']
  assert predict.main([*args, '--max_new_tokens', '8', '--batch_size', '2']) == 0
  assert [json.loads(line)['generated'] for line in out.read_text().splitlines()] == texts
  before = out.read_text()
  assert predict.main([*args[:-1], 'classify']) == 2
  assert 'needs an encoder; this is a causal LM' in capsys.readouterr().err
  assert out.read_text() == before  # A refused run leaves the earlier output.


def test_load_and_predict_quantize_a_hugging_face_causal_lm_on_loading(gpt2_dir, tmp_path):
  import json

  import jaxlm
  from jaxlm import predict

  gen = jaxlm.load(gpt2_dir, quantize='int8')
  assert isinstance(gen, generate.Generator) and gen.cfg.quantization == 'int8'
  assert dict(nnx.to_flat_state(gen.params))[('layers', 'wi_kernel')].get_value().dtype == jnp.int8
  assert jaxlm.load(gpt2_dir, quantization='int8').cfg.quantization == 'int8'  # The config field, as for BERT.
  prompts = ['def read(path):', 'The module']
  texts = gen.generate(prompts, max_new_tokens=8)
  src, out = tmp_path / 'prompts.txt', tmp_path / 'out.jsonl'
  src.write_text('\n'.join(prompts) + '\n')
  args = ['--checkpoint', gpt2_dir, '--input', str(src), '--output', str(out), '--mode', 'generate']
  assert predict.main([*args, '--max_new_tokens', '8', '--quantize', 'int8']) == 0
  assert [json.loads(line)['generated'] for line in out.read_text().splitlines()] == texts


CONVERSATIONS = [
  [{'role': 'user', 'content': 'def read(path):'}],
  [{'role': 'system', 'content': 'Answer in Python.'}, {'role': 'user', 'content': ' Return the module '},
   {'role': 'assistant', 'content': 'import os'}, {'role': 'user', 'content': 'The path, caf\u00e9?'}],
]  # fmt: skip


@pytest.fixture(scope='module')
def chat_dir(gpt2_dir, tmp_path_factory):
  """gpt2_dir's model and tokenizer with ChatML's two special tokens and CHATML, saved by jaxlm's Tokenizer."""
  from jaxlm import tokenizer

  path = str(tmp_path_factory.mktemp('chat'))
  tok = tokenizer.load(gpt2_dir)
  tok.backend.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  tok.chat_template = CHATML
  save_random_causal_lm('gpt2', path, seed=5, vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=96)
  tok.save(path)
  return path


def test_chat_prompts_and_replies_equal_transformers_apply_chat_template(chat_dir, gpt2_dir, tmp_path):
  import transformers

  import jaxlm
  from jaxlm import tokenizer
  from jaxlm.errors import UsageError

  gen = jaxlm.load(chat_dir)
  assert gen.tokenizer.chat_template == CHATML
  hf_tok = transformers.AutoTokenizer.from_pretrained(chat_dir)  # Reads the template jaxlm wrote.
  end = hf_tok.convert_tokens_to_ids('<|im_end|>')
  for prompt in (True, False):
    want = [
      hf_tok.apply_chat_template(c, add_generation_prompt=prompt, tokenize=True, return_dict=False)
      for c in CONVERSATIONS
    ]
    assert gen.chat_ids(CONVERSATIONS, add_generation_prompt=prompt) == want
  ids = gen.chat_ids(CONVERSATIONS)
  assert ids[0][0] == hf_tok.convert_tokens_to_ids('<|im_start|>') and ids[0].count(end) == 2  # Special, not text.
  assert gen.chat_ids(CONVERSATIONS[:1], persona='a pirate') == [
    hf_tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, persona='a pirate', return_dict=False)
  ]
  replies = gen.chat(CONVERSATIONS, max_new_tokens=8, stop=['<|im_end|>'])
  for prompt, reply in zip(ids, replies):
    assert reply == hf_tok.decode(_hf_greedy(chat_dir, prompt, 8, eos=end), skip_special_tokens=True)
  assert any(replies)

  # The template travels: a saved copy and transformers' own save (chat_template.jinja) load with it.
  gen.tokenizer.save(str(tmp_path / 'ours'))
  hf_tok.save_pretrained(str(tmp_path / 'theirs'))
  assert tokenizer.load(str(tmp_path / 'ours')).chat_template == CHATML
  assert tokenizer.load(str(tmp_path / 'theirs')).chat_template == CHATML

  bad = [
    ([[{'role': 'tool', 'content': 'x'}]], r'conversation 0: the chat template refused it: roles are .* not tool'),
    ([CONVERSATIONS[0], [{'role': 'user'}]], r'conversation 1, message 0: expected \{"role": str, "content": str\}'),
    (CONVERSATIONS[0], 'expected a list of conversations'),
  ]
  for convs, match in bad:
    with pytest.raises(UsageError, match=match):
      gen.chat(convs, max_new_tokens=4)
  with pytest.raises(UsageError, match='the tokenizer has no chat template'):
    jaxlm.load(gpt2_dir).chat(CONVERSATIONS)


def test_predict_chat_answers_each_conversation_and_names_a_bad_line(chat_dir, gpt2_dir, tmp_path, capsys):
  import json

  import jaxlm
  from jaxlm import predict

  src, out = tmp_path / 'chats.jsonl', tmp_path / 'replies.jsonl'
  rows = [{'messages': CONVERSATIONS[1]}, {'messages': 'def read(path):'}, {'messages': CONVERSATIONS[0]}]
  src.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  args = ['--checkpoint', chat_dir, '--input', str(src), '--output', str(out), '--mode', 'chat',
          '--text_field', 'messages', '--max_new_tokens', '8', '--stop', '<|im_end|>', '--batch_size', '2']  # fmt: skip
  assert predict.main([*args, '--system', 'Be brief.']) == 0
  system = [{'role': 'system', 'content': 'Be brief.'}]
  gen = jaxlm.load(chat_dir)
  want = gen.chat(
    [CONVERSATIONS[1], system + CONVERSATIONS[0], system + CONVERSATIONS[0]], max_new_tokens=8, stop=['<|im_end|>']
  )
  assert [json.loads(line)['generated'] for line in out.read_text().splitlines()] == want

  # A Parquet list column of conversations, read by the default --text_field of chat (messages).
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'messages': [CONVERSATIONS[1], CONVERSATIONS[0]]}), tmp_path / 'chats.parquet')
  pq_args = ['--checkpoint', chat_dir, '--input', str(tmp_path / 'chats.parquet'), '--output', str(tmp_path / 'pq.jsonl'),
             '--mode', 'chat', '--max_new_tokens', '8', '--stop', '<|im_end|>', '--batch_size', '2']  # fmt: skip
  assert predict.main(pq_args) == 0
  pq_want = gen.chat([CONVERSATIONS[1], CONVERSATIONS[0]], max_new_tokens=8, stop=['<|im_end|>'])
  assert [json.loads(line)['generated'] for line in (tmp_path / 'pq.jsonl').read_text().splitlines()] == pq_want

  before = out.read_text()
  src.write_text(json.dumps(rows[0]) + '\n' + json.dumps({'messages': [{'content': 'no role'}]}) + '\n')
  assert predict.main(args) == 2
  assert f'{src}:2, message 0: expected {{"role": str, "content": str}}' in capsys.readouterr().err
  assert predict.main([*args[:1], gpt2_dir, *args[2:]]) == 2
  assert '--mode chat needs a chat template' in capsys.readouterr().err
  assert out.read_text() == before  # Refused runs leave the earlier output.


def test_scores_of_texts_and_continuations_equal_transformers_and_predict_writes_them(gpt2_dir, tmp_path, capsys):
  """Generator.score: each text's summed next-token NLL, or a continuation's given its text (what multiple-choice
  tasks compare), against transformers' log-softmax on the same ids; `predict --mode score` writes the same
  and the perplexity over every token; a row too long for the model is one error naming its line."""
  import json

  import transformers

  import jaxlm
  from jaxlm import predict

  gen = jaxlm.load(gpt2_dir)
  hf_tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  m = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()

  def hf_logprob(ids, first):  # Summed log-probability of ids[first:], each given the ids before it.
    with torch.no_grad():
      logp = torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))

  texts = ['Return the number of items.', 'def read(path):', 'An exception raised when a file is not found, and more.']
  tails = [' It is an int.', '\n  return open(path).read()', ' Always.']
  got = gen.score(texts)
  for text, g in zip(texts, got):
    ids = hf_tok(text).input_ids
    assert g['tokens'] == len(ids) - 1
    np.testing.assert_allclose(-g['nll'], hf_logprob(ids, 1), rtol=1e-4)
  assert gen.perplexity(texts) == pytest.approx([np.exp(g['nll'] / g['tokens']) for g in got], rel=1e-12)
  cont = gen.score(texts, tails)
  for text, tail, g in zip(texts, tails, cont):
    head = hf_tok(text).input_ids
    ids = head + hf_tok(tail, add_special_tokens=False).input_ids
    assert g['tokens'] == len(ids) - len(head)
    np.testing.assert_allclose(-g['nll'], hf_logprob(ids, len(head)), rtol=1e-4)
  with pytest.raises(jaxlm.UsageError, match='text 1: nothing to score'):
    gen.score(['a b', ''], ['c', ''])

  src, out = tmp_path / 'in.jsonl', tmp_path / 'scores.jsonl'
  src.write_text(''.join(json.dumps({'text': t, 'ending': e}) + '\n' for t, e in zip(texts, tails)))
  args = ['--checkpoint', gpt2_dir, '--input', str(src), '--output', str(out), '--mode', 'score', '--batch_size', '2']
  assert predict.main(args) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['tokens'] for r in rows] == [g['tokens'] for g in got]  # Other batches (2 rows): other sums' rounding.
  np.testing.assert_allclose([r['nll'] for r in rows], [g['nll'] for g in got], rtol=1e-6)
  assert rows[0]['perplexity'] == pytest.approx(np.exp(got[0]['nll'] / got[0]['tokens']), rel=1e-12)
  total = np.exp(sum(r['nll'] for r in rows) / sum(r['tokens'] for r in rows))
  assert f'perplexity {total:.4f} over {sum(g["tokens"] for g in got)} tokens of 3 inputs' in capsys.readouterr().err
  assert predict.main([*args, '--text_pair_field', 'ending']) == 0
  np.testing.assert_allclose([json.loads(line)['nll'] for line in out.read_text().splitlines()],
                             [g['nll'] for g in cont], rtol=1e-6)  # fmt: skip
  before = out.read_text()
  src.write_text(json.dumps({'text': 'short'}) + '\n' + json.dumps({'text': ' word' * 80}) + '\n')
  assert predict.main(args) == 2
  err = capsys.readouterr().err
  assert f'{src}:2: ' in err and ' tokens exceed max_position_embeddings=64' in err, err[-500:]
  assert out.read_text() == before  # The refused run left the earlier output.


def test_chat_render_equals_transformers_render_on_tools_reasoning_json_and_variables():
  """What a large instruct template reads beyond roles and content: `tools` (defined, None), a date variable with
  a default, a message's reasoning under the name the template reads, `items` and `tojson(indent=...)`."""
  from transformers.utils.chat_template_utils import render_jinja_template

  from jaxlm import chat

  template = """{{- bos_token }}
{%- if tools is defined %}tools: {{ tools | tojson }}{% endif %}
{%- if not date_string is defined %}{% set date_string = '26 Jul 2024' %}{% endif %}
Today: {{ date_string }}
{%- for m in messages %}
  {%- if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
  {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}
  {%- for k, v in m | items %}{% if k == 'meta' %}{{ v | tojson(indent=2) }}{% endif %}{% endfor %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""
  conv = [{'role': 'system', 'content': ' Be brief. '}, {'role': 'user', 'content': 'h\u00e9llo <b>', 'meta': {'a': [1, '\u00e9<']}},
          {'role': 'assistant', 'content': 'hi', 'reasoning': 'thought'}, {'role': 'user', 'content': 'bye'}]  # fmt: skip
  for prompt in (True, False):
    for kw in ({}, {'date_string': '7 Dec 2026'}):
      [want] = render_jinja_template([conv], chat_template=template, add_generation_prompt=prompt,
                                     bos_token='<s>', eos_token='<|eot_id|>', **kw)[0]  # fmt: skip
      got = chat.render(template, conv, {'bos': '<s>', 'eos': '<|eot_id|>', 'pad': None}, prompt, **kw)
      assert got == want and '<think>thought</think>' in got and '\u00e9<' in got
