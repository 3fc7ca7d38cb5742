"""Causal LMs through the trainer (tasks/causal.py): pretraining trains and evaluates perplexity, the same losses on
a 2x2x2 mesh as on one device, exact resume, SFT with LoRA on prompt / response pairs, `jaxlm.load` of the run as
a Generator, and the Hugging Face export in transformers. One tiny GPT run on one device, shared by the module."""

import contextlib
import io
import json
import math
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import _write_jsonl, assert_same_params, config_file, logged, save_random_causal_lm, saved_arrays
from flax import nnx

import jaxlm
from jaxlm import checkpoint, decoder, export, generate, hf_causal, losses, quant, steps, store, tokenizer, trainer
from jaxlm.data import pretrain
from jaxlm.errors import UsageError

# configs/quickstart_causal.py shrunk: 12 steps of 8 rows of 32 tokens, a checkpoint every 6 steps. The constant
# schedule after 2 warmup steps makes the step independent of num_train_steps (resumes share its compile).
TINY = {
  'num_train_steps': 12, 'checkpoint_every_steps': 6, 'log_every_steps': 1, 'eval_every_steps': 12,
  'global_batch_size': 8, 'data.seq_len': 32, 'model.max_position_embeddings': 64, 'warmup_steps': 2,
  'lr_schedule': 'constant', 'learning_rate': 3e-3, 'data.shuffle_buffer': 64, 'sample_prompts': '',
  'data.train_tokenizer_vocab': 0,
}  # fmt: skip
ONE = jax.devices()[:1]


def _config(files, overrides=None):
  return config_file('quickstart_causal', {**TINY, 'data.tokenizer': files['bpe'], 'data.train': files['train'],
                                           'data.eval': files['eval'], **(overrides or {})})  # fmt: skip


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A 500-token byte-level BPE, 120 documents of the builtin corpus to train on, 6 others to evaluate on, and
  a JSONL file of prompt / response pairs."""
  d = tmp_path_factory.mktemp('causal_files')
  docs = [t.replace('\n', ' ')[:300] for t, _ in zip(pretrain.iter_texts('builtin:stdlib'), range(126))]
  (d / 'train.txt').write_text(''.join(t + '\n' for t in docs[:120]))
  (d / 'eval.txt').write_text(''.join(t + '\n' for t in docs[120:]))
  tokenizer.train_bpe(docs, 500).save(str(d / 'bpe'))
  words = ['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight']
  pairs = [{'prompt': f'Q: what follows {w}? A:', 'response': f' {words[(i + 1) % 8]}'} for i, w in enumerate(words)]
  _write_jsonl(d / 'sft.jsonl', pairs * 4)
  chats = [[{'role': 'user', 'content': f'what follows {w}?'}, {'role': 'assistant', 'content': words[(i + 1) % 8]}]
           for i, w in enumerate(words)]  # fmt: skip
  _write_jsonl(d / 'chats.jsonl', [{'messages': c} for c in chats] * 4)
  (d / 'chat.jinja').write_text(CHAT_TEMPLATE)
  return {'bpe': str(d / 'bpe'), 'train': f'text:{d}/train.txt', 'eval': f'text:{d}/eval.txt',
          'sft': f'jsonl:{d}/sft.jsonl', 'chats': f'jsonl:{d}/chats.jsonl', 'chat_template': str(d / 'chat.jinja')}  # fmt: skip


# Roles as words; each assistant turn ends with the tokenizer's end-of-text token, which also ends generation.
CHAT_TEMPLATE = (
  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
  "{% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


SAMPLE_PROMPTS = ('def ', 'Return the')


@pytest.fixture(scope='module')
def run(files, tmp_path_factory):
  """The tiny GPT trained 12 steps on one device, in this process: (workdir, last metrics, what it printed)."""
  workdir = tmp_path_factory.mktemp('causal_run')
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    last = trainer.train(_config(files, {'sample_prompts': '|'.join(SAMPLE_PROMPTS)}), str(workdir), devices=ONE)
  return workdir, last, printed.getvalue()


def test_check_config_names_the_bad_key(files, tmp_path):
  wordpiece = tmp_path / 'wordpiece'
  tokenizer.wordpiece_tokenizer(list(tokenizer.SPECIAL_TOKENS) + list('abcdefgh')).save(str(wordpiece))
  bad = [
    ({'data.tokenizer': str(wordpiece)}, f'data.tokenizer={str(wordpiece)!r}: a wordpiece vocabulary'),
    ({'model.preset': 'tiny'}, "model.preset='tiny' is an encoder; task='causal_lm' trains a decoder"),
    ({'task': 'mlm'}, "model.preset='gpt2-tiny' is a decoder; task='mlm' trains an encoder"),
    ({'model.attention_dropout': 0.1}, 'model.attention_dropout=0.1: decoders have no attention dropout'),
    ({'task': 'sft', 'model.init_from': '/m'}, f'data.train={files["train"]!r}: supervised fine-tuning reads'),
    ({'task': 'sft', 'data.train': files['sft'], 'data.eval': '', 'data.tokenizer': ''}, 'model.init_from is empty'),
    (
      {
        'task': 'sft',
        'model.init_from': '/m',
        'data.train': files['sft'],
        'data.eval': '',
        'data.separate_documents': True,
      },
      'data.separate_documents=True is for pretraining',
    ),  # fmt: skip
    ({'data.nsp': True}, 'data.nsp=True is for masked-LM pretraining'),
    ({'data.pack_examples': True}, "data.pack_examples=True packs fine-tuning examples (task=sft); task='causal_lm'"),
    ({'data.messages_field': 'messages'}, "data.messages_field='messages': conversations are fine-tuning data for"),
    (
      {
        'task': 'sft',
        'model.init_from': '/m',
        'data.train': files['chats'],
        'data.eval': '',
        'data.messages_field': 'messages',
      },
      f'the tokenizer ({files["bpe"]}/tokenizer.json) has no chat template',
    ),
    ({'data.chat_template': '/no/such.jinja'}, "data.chat_template='/no/such.jinja': no such file"),
  ]
  for overrides, message in bad:
    with pytest.raises(UsageError) as e:
      trainer.train(_config(files, overrides), str(tmp_path / 'run'))
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  enc = config_file('quickstart', {'sample_prompts': 'hello'})
  with pytest.raises(UsageError, match='sample_prompts=.*only a decoder'):
    trainer.check_config(enc, 8)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_pretraining_trains_and_evaluates_perplexity(run):
  workdir, last, _ = run
  curve = logged(workdir)
  assert sorted(curve) == list(range(1, 13)) and curve[12] < curve[1] - 0.5, curve
  assert last['eval_perplexity'] == pytest.approx(math.exp(last['eval_loss']), rel=1e-6)
  assert last['eval_loss'] < math.log(500)  # Better than uniform over the vocabulary.
  meta = json.loads((workdir / 'model_config.json').read_text())
  assert meta['family'] == 'gpt2' and meta['vocab_size'] == 500 and meta['eos_token_id'] == 0
  assert json.loads((workdir / 'eval_results.json').read_text())['step'] == 12


def test_the_loss_curve_on_a_2x2x2_mesh_is_that_of_one_device(run, files, tmp_path):
  workdir, *_ = run
  config = _config(files, {'num_train_steps': 6, 'eval_every_steps': 0, 'mesh.data': 2, 'mesh.fsdp': 2,
                           'mesh.tensor': 2})  # fmt: skip
  trainer.train(config, str(tmp_path))
  got, want = logged(tmp_path), logged(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=0, atol=1e-5)


def test_resume_is_exact(run, files, tmp_path):
  workdir, *_ = run
  resumed = tmp_path / 'run'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '12')  # Back to the checkpoint of step 6, then 6 more steps.
  trainer.train(_config(files, {'eval_every_steps': 0}), str(resumed), devices=ONE)
  assert_same_params(saved_arrays(resumed, 12), saved_arrays(workdir, 12))


def test_sft_with_lora_trains_adapters_only_and_weighs_only_the_response(run, files, tmp_path):
  workdir, *_ = run
  config = _config(files, {'task': 'sft', 'model.init_from': str(workdir), 'data.tokenizer': '', 'data.train':
                           files['sft'], 'data.eval': files['sft'], 'finetune.mode': 'lora', 'num_train_steps': 4,
                           'checkpoint_every_steps': 4, 'eval_every_steps': 4})  # fmt: skip
  sft = trainer.setup(config, str(tmp_path), devices=ONE)
  state, start, it, ckpt = trainer.restore_or_init(sft)
  last = trainer.loop(sft, state, start, it, ckpt)
  assert 'eval_perplexity' in last
  saved = saved_arrays(tmp_path, 4)
  assert_same_params(saved, saved_arrays(workdir, 12))  # Every weight of the decoder frozen, bitwise.
  assert set(saved['adapters']) == {'q', 'k', 'v', 'o', 'wi', 'wo'}
  assert any(np.abs(ab['b']).max() > 0 for ab in saved['adapters'].values())  # The adapters trained.
  # The loss reads the response's targets only: changing a prompt token's target changes nothing.
  batch = next(iter(pretrain.Iterator(sft.task.train_dataset(0))))
  loss = lambda b: float(sft.task.loss_fn(None)(steps.forward(sft.graphdef, sft.init, b), b)[0])  # noqa: E731
  # The batch is cut to a length bucket (data.bucket_lengths): its loss is that of the batch padded to seq_len.
  T = batch['input_ids'].shape[1]
  assert T in sft.task.batch_lengths() and T < 32
  padded = {k: np.pad(v, ((0, 0), (0, 32 - T)), constant_values=0) for k, v in batch.items()}
  np.testing.assert_allclose(loss(padded), loss(batch), rtol=1e-6)
  w = batch['loss_weights'][0]
  prompt_pos, response_pos = int(np.flatnonzero(w == 0)[0]), int(np.flatnonzero(w > 0)[0])
  for pos, changes in ((prompt_pos, False), (response_pos, True)):
    other = {**batch, 'targets': batch['targets'].copy()}
    other['targets'][0, pos] = (other['targets'][0, pos] + 7) % 500
    assert (loss(other) != loss(batch)) == changes, pos


def test_packed_sft_rows_give_every_example_its_loss_alone(run, files, tmp_path):
  workdir, *_ = run
  config = _config(files, {'task': 'sft', 'model.init_from': str(workdir), 'data.tokenizer': '', 'data.eval': '',
                           'data.train': files['sft'], 'data.pack_examples': True, 'data.bucket_lengths': 'none',
                           'data.seq_len': 64})  # fmt: skip
  sft = trainer.setup(config, str(tmp_path), devices=ONE)
  packed = next(iter(pretrain.Iterator(sft.task.train_dataset(0))))
  B, T = packed['input_ids'].shape
  # The same examples one a row, at positions from 0, as sft_rows makes them (no segment or position ids).
  alone = {k: np.zeros((0, T), packed[k].dtype) for k in ('input_ids', 'targets', 'loss_weights')}
  for r in range(B):
    for s in range(1, int(packed['segment_ids'][r].max()) + 1):
      at = np.flatnonzero(packed['segment_ids'][r] == s)
      for k in alone:
        alone[k] = np.concatenate([alone[k], np.pad(packed[k][r, at], (0, T - len(at)))[None]])
  assert len(alone['input_ids']) > B  # Several examples a row.
  unit = {'lm': 1.0}  # Sums, not means.

  def per_example(batch, pieces):  # The summed NLL of each example: its weights alone.
    out = steps.forward(sft.graphdef, sft.init, batch)
    nll = []
    for row, where in pieces:
      w = np.zeros_like(batch['loss_weights'])
      w[row, where] = batch['loss_weights'][row, where]
      nll.append(float(losses.causal_lm_loss(out, {**batch, 'loss_weights': w}, unit)[0]))
    return np.array(nll)

  where = [
    (r, packed['segment_ids'][r] == s) for r in range(B) for s in range(1, int(packed['segment_ids'][r].max()) + 1)
  ]
  got = per_example(packed, where)
  want = per_example(alone, [(i, slice(None)) for i in range(len(alone['input_ids']))])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Without its segment and position ids the packed row mixes its examples: other losses.
  mixed = per_example({k: packed[k] for k in alone}, where)
  assert np.abs(mixed - want).max() > 1e-2


def test_jaxlm_load_gives_a_generator_whose_greedy_output_is_decoding_by_hand(run):
  workdir, *_ = run
  gen = jaxlm.load(str(workdir), scan_layers=False)
  assert isinstance(gen, generate.Generator) and gen.cfg.family == 'gpt2'
  prompts = [gen.tokenizer.encode_plain(['def ', 'Return the'])[i] for i in range(2)]
  got = gen.generate_ids(prompts, max_new_tokens=6, stop_ids=[])
  forward = jax.jit(lambda p, ids: decoder.apply(gen.graphdef, p, ids)['logits'])
  for prompt, new in zip(prompts, got):
    ids = list(prompt)
    for _ in range(6):
      row = np.zeros((1, 32), np.int32)  # Causal: the padding after the last token changes none of its logits.
      row[0, : len(ids)] = ids
      ids.append(int(np.argmax(np.asarray(forward(gen.params, row))[0, len(ids) - 1, :500])))
    assert new == ids[len(prompt) :]
  # The run ended by printing the same model's greedy continuations, one line each (JSON strings).
  lines = [line for line in run[2].splitlines() if line.startswith('sample: ')]
  texts = gen.generate(list(SAMPLE_PROMPTS), max_new_tokens=32)
  assert lines == [f'sample: {json.dumps(p)} -> {json.dumps(t)}' for p, t in zip(SAMPLE_PROMPTS, texts)]


def test_exports_load_back_and_in_transformers_with_the_same_logits(run, tmp_path):
  import transformers

  workdir, *_ = run
  assert export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'jx')]) == 0
  graphdef, params, tok_dir, _ = store.load_model(str(tmp_path / 'jx'))
  assert_same_params({'params': store.nested(params)}, saved_arrays(workdir, 12))
  assert export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  text = 'Return the number of items in the container.'
  ids = tokenizer.load(tok_dir).encode_plain([text])[0]
  assert hf_tok(text)['input_ids'] == ids
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits.numpy()
  got = np.asarray(decoder.apply(graphdef, params, np.asarray([ids], np.int32))['logits'])[..., :500]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_hugging_face_export_in_16_bits_is_half_the_size_and_transformers_loads_it_so(run, tmp_path, capsys):
  import os

  import transformers
  from safetensors.numpy import load_file

  workdir, *_ = run
  f32, b16 = tmp_path / 'f32', tmp_path / 'bf16'
  assert export.main(['--checkpoint', str(workdir), '--out', str(f32), '--format', 'hf']) == 0
  assert export.main(['--checkpoint', str(workdir), '--out', str(b16), '--format', 'hf', '--dtype', 'bfloat16']) == 0
  assert 'hf, bfloat16' in capsys.readouterr().out
  a, b = load_file(str(f32 / 'model.safetensors')), load_file(str(b16 / 'model.safetensors'))
  assert sorted(a) == sorted(b)
  for k in a:  # Each tensor rounded to bfloat16, nothing else.
    assert a[k].dtype == np.float32 and b[k].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(b[k], a[k].astype(jax.numpy.bfloat16), err_msg=k)
  assert os.path.getsize(b16 / 'model.safetensors') < 0.55 * os.path.getsize(f32 / 'model.safetensors')
  assert json.load(open(b16 / 'config.json'))['dtype'] == 'bfloat16'
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(b16)).eval()
  assert hf.dtype == torch.bfloat16  # The type the directory names.
  ids = torch.arange(3, 40)[None]
  with torch.no_grad():
    want = transformers.AutoModelForCausalLM.from_pretrained(str(f32)).eval()(ids).logits.numpy()
    got = hf.float()(ids).logits.numpy()
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # bfloat16 weights: close, not equal.
  back = jaxlm.load(str(b16))  # jaxlm reads it back in float32.
  assert jax.tree.leaves(back.params)[0].dtype == np.float32
  assert export.main(['--checkpoint', str(workdir), '--out', str(tmp_path / 'jx'), '--dtype', 'float16']) == 2
  assert '--dtype float16: applies to --format hf' in capsys.readouterr().err
  assert not (tmp_path / 'jx').exists()


def _du(path) -> int:
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def test_int8_export_of_a_causal_run_is_smaller_and_loads_trains_and_exports_back(run, tmp_path):
  workdir, *_ = run
  f_dir, q_dir, hf_dir = tmp_path / 'float', tmp_path / 'int8', tmp_path / 'hf'
  assert export.main(['--checkpoint', str(workdir), '--out', str(f_dir)]) == 0
  assert export.main(['--checkpoint', str(workdir), '--out', str(q_dir), '--quantize', 'int8']) == 0
  assert json.loads((q_dir / 'model_config.json').read_text())['quantization'] == 'int8'
  raw_f, raw_q = (checkpoint.read_arrays(d / 'params')['layers'] for d in (f_dir, q_dir))
  for k in ('q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'wi_kernel', 'wo_kernel'):
    assert raw_f[k].dtype == np.float32 and raw_q[k].dtype == np.int8 and raw_q[f'{k}_scale'].dtype == np.float32
  # The layers' kernels are 393K of the 471K parameters; embeddings, norms and biases stay float32.
  assert _du(q_dir / 'params') < 0.45 * _du(f_dir / 'params')

  f_gen, q_gen = jaxlm.load(str(f_dir)), jaxlm.load(str(q_dir))
  assert isinstance(q_gen, generate.Generator) and q_gen.cfg.quantization == 'int8'
  assert dict(nnx.to_flat_state(q_gen.params))[('layers', 'q_kernel')].get_value().dtype == np.int8
  prompts = [q_gen.tokenizer.encode_plain([p])[0] for p in SAMPLE_PROMPTS]
  want = f_gen.generate_ids(prompts, max_new_tokens=16, stop_ids=[])
  # Token for token: along these paths the float model's smallest top-two logit gap (0.13) is 250 times the
  # largest change int8 makes to a logit (5e-4; trained kernels of std ~0.02 quantize finely).
  assert q_gen.generate_ids(prompts, max_new_tokens=16, stop_ids=[]) == want
  texts = ['Return the number of items in the container.', 'def read(path): return open(path).read()']
  ppl_f, ppl_q = f_gen.perplexity(texts), q_gen.perplexity(texts)
  np.testing.assert_allclose(ppl_q, ppl_f, rtol=1e-2)

  # A run started from the int8 export trains float kernels: the dequantized ones.
  graphdef, params, new = store.load_for_init(str(q_dir))
  assert nnx.merge(graphdef, params).cfg.quantization == 'none' and new == []
  assert checkpoint.is_array_tree_equal(params, quant.dequantize(q_gen.graphdef, q_gen.params)[1])
  # Written for transformers: float tensors, the int8 model's logits.
  assert export.main(['--checkpoint', str(q_dir), '--out', str(hf_dir), '--format', 'hf']) == 0
  back = jaxlm.load(str(hf_dir))
  assert back.cfg.quantization == 'none'
  ids = np.asarray([prompts[0] + want[0]], np.int32)
  np.testing.assert_allclose(np.asarray(decoder.apply(back.graphdef, back.params, ids)['logits'])[..., :500],
                             np.asarray(decoder.apply(q_gen.graphdef, q_gen.params, ids)['logits'])[..., :500],
                             atol=1e-4, rtol=1e-4)  # fmt: skip
  with pytest.raises(UsageError, match='model.quantization=.int4.: expected one of'):
    decoder.DecoderConfig(quantization='int4')


def test_the_causal_lm_loss_is_the_mean_weighted_next_token_nll():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
  w = (rng.random((2, 5)) > 0.3).astype(np.float32)
  loss, _ = losses.causal_lm_loss({'logits': logits}, {'targets': targets, 'loss_weights': w})
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * w).sum() / w.sum()
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_init_from_reads_a_hugging_face_gpt2_directory(tmp_path):
  path = save_random_causal_lm('gpt2', str(tmp_path), vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
  # A run's overrides: the encoder's head fields are left out for a decoder, the execution knobs set.
  graphdef, params, new = store.load_for_init(path, mlm_head=False, num_labels=0, vocab_multiple=128, remat='full')
  cfg = nnx.merge(graphdef, params).cfg
  assert cfg.family == 'gpt2' and cfg.padded_vocab_size == 384 and cfg.remat == 'full' and new == []
  _, want, _ = hf_causal.load(path)
  np.testing.assert_array_equal(params['layers']['q_kernel'][...], want['layers']['q_kernel'][...])


def test_a_chat_fine_tune_of_our_own_run_chats_predicts_and_exports_its_template(run, files, tmp_path, capsys):
  """Pretrained here, fine-tuned on conversations through a template of the user's (data.chat_template): the run
  keeps the template, so jaxlm.load chats, predict --mode chat answers, and transformers renders the export alike."""
  import transformers

  from jaxlm import predict

  workdir, *_ = run
  sft = tmp_path / 'sft'
  config = _config(files, {'task': 'sft', 'model.init_from': str(workdir), 'data.tokenizer': '', 'data.train':
                           files['chats'], 'data.eval': files['chats'], 'data.messages_field': 'messages',
                           'data.chat_template': files['chat_template'], 'data.pack_examples': True, 'num_train_steps': 4,
                           'checkpoint_every_steps': 4, 'eval_every_steps': 4})  # fmt: skip
  last = trainer.train(config, str(sft), devices=ONE)
  assert math.isfinite(last['eval_perplexity'])
  assert tokenizer.load(str(sft / 'tokenizer')).chat_template == CHAT_TEMPLATE
  gen = jaxlm.load(str(sft))
  convs = [[{'role': 'user', 'content': 'what follows two?'}], [{'role': 'user', 'content': 'what follows six?'}]]
  ids = gen.chat_ids(convs)
  assert gen.tokenizer.decode(ids[0]) == 'user: what follows two?\nassistant:'
  replies = gen.chat(convs, max_new_tokens=6)
  assert replies == [gen.tokenizer.decode(r) for r in gen.generate_ids(ids, max_new_tokens=6)]

  src, out = tmp_path / 'questions.txt', tmp_path / 'answers.jsonl'
  src.write_text('what follows two?\nwhat follows six?\n')
  assert predict.main(['--checkpoint', str(sft), '--input', str(src), '--output', str(out), '--mode', 'chat',
                       '--max_new_tokens', '6']) == 0  # fmt: skip
  assert [json.loads(line)['generated'] for line in out.read_text().splitlines()] == replies

  assert export.main(['--checkpoint', str(sft), '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 0
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  assert [hf_tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in convs] == ids
