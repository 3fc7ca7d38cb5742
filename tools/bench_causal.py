"""Causal-LM workers of tools/bench.py: the training step and generation, jaxlm against transformers.

  python tools/bench.py --mode causal-train --rounds 2   # GPT-2-small shape cut to 4 layers, seq 128, batch 16
  python tools/bench.py --mode generate --rounds 2       # the same shape: 8 prompts, 128 new tokens each

Training: the jaxlm step is the one `python -m jaxlm.train` builds for task causal_lm (train_config, timed
by bench.jaxlm_train through trainer.setup,
on the builtin corpus packed into full rows, with a byte-level BPE filled up to GPT-2's 50,257 tokens);
transformers runs GPT2LMHeadModel with torch.optim.AdamW on full rows of random ids. No dropout on
either side. The unit is trained tokens per second.

Generation: both sides run the same GPT-2 shape (--layers, default 4, of GPT-2 small: hidden 768,
12 heads, vocabulary 50,257) with random weights, on the same batch of 8 prompts of different lengths
(12 to 64 tokens; --seq is the number of new tokens). jaxlm runs `Generator.generate_ids`
(generate.py: left-padded prompts, one jitted prefill + while-loop decode); transformers runs
`GPT2LMHeadModel.generate(do_sample=False)` on the left-padded batch with its attention mask, its
default attention (SDPA) and key/value cache. No stop token: every row makes all --seq tokens.
The unit is new tokens per second, the prefill included; the compile is not (warmup calls).
"""

from __future__ import annotations

import os
import resource
import time

import numpy as np

PROMPT_LENGTHS = (12, 19, 27, 33, 40, 48, 57, 64)


def _prompts(vocab: int) -> list[list[int]]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _gpt2_kw(args) -> dict:
  return dict(vocab_size=50257, n_embd=768, n_layer=args.layers or 4, n_head=12, n_positions=1024)


def _timed_generate(call, args) -> dict:
  for _ in range(max(args.warmup, 1)):  # The first call compiles (jaxlm) or warms the allocator (torch).
    call()
  rounds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    call()
    rounds.append(time.perf_counter() - t0)
  s = min(rounds)
  n = len(PROMPT_LENGTHS) * args.seq
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return {'tokens_per_s': n / s, 'step_s': s, 'rounds_step_s': rounds, 'new_tokens': n, 'peak_rss_gib': peak}


def jaxlm_generate(args) -> dict:
  import jax  # lazy: the worker's own framework

  from jaxlm import decoder, generate, hf_causal

  kw = _gpt2_kw(args)
  cfg = hf_causal.config_from_hf({'model_type': 'gpt2', **kw}, dtype=args.dtype)
  t0 = time.perf_counter()
  graphdef, params = decoder.init(cfg, seed=0)
  gen = generate.Generator(graphdef, params, tokenizer=None, batch_size=len(PROMPT_LENGTHS))
  prompts = _prompts(cfg.vocab_size)
  gen.generate_ids(prompts, max_new_tokens=args.seq, stop_ids=[])
  compile_s = time.perf_counter() - t0
  r = _timed_generate(lambda: gen.generate_ids(prompts, max_new_tokens=args.seq, stop_ids=[]), args)
  return {'jaxlm': {**r, 'framework': 'jaxlm', 'backend': jax.default_backend(), 'dtype': args.dtype,
                    'compile_s': compile_s}}  # fmt: skip


def torch_generate(args) -> dict:
  import torch  # lazy: the worker's own framework
  import transformers

  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[args.dtype]
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_gpt2_kw(args))).eval().to(dev, dtype)
  prompts = _prompts(50257)
  T = max(PROMPT_LENGTHS)
  ids = torch.zeros(len(prompts), T, dtype=torch.long)
  mask = torch.zeros(len(prompts), T, dtype=torch.long)
  for r, p in enumerate(prompts):  # Left padding, as generation with a batch of prompts needs.
    ids[r, T - len(p) :], mask[r, T - len(p) :] = torch.tensor(p), 1
  ids, mask = ids.to(dev), mask.to(dev)

  def call():
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.seq,
                           min_new_tokens=args.seq, pad_token_id=0)  # fmt: skip
    if dev.type == 'cuda':
      torch.cuda.synchronize()
    return out

  r = _timed_generate(call, args)
  return {'torch': {**r, 'framework': 'torch', 'backend': dev.type, 'dtype': args.dtype,
                    'threads': torch.get_num_threads(), 'attention': model.config._attn_implementation}}  # fmt: skip


# ----------------------------------------------------------------------------- training step


def _gpt2_tokenizer(out_dir: str, vocab: int) -> str:
  """A byte-level BPE trained on the builtin corpus, filled up with never-seen tokens to GPT-2's `vocab`
  rows (the corpus is too small for 50,257 merges): the embedding and LM head of GPT-2's shape."""
  from jaxlm import tokenizer  # lazy: the worker's own framework
  from jaxlm.data import sources

  tok = tokenizer.train_bpe(list(sources.BUILTIN['stdlib']()), vocab)
  missing = vocab - tok.vocab_size
  if missing > 0:
    tok.backend.add_tokens([f'<|unused{i}|>' for i in range(missing)])
  tok.save(out_dir)
  return out_dir


def train_config(args, tmp: str):
  """(recipe, overrides, config): the causal-LM training config `python -m jaxlm.train` would get for these
  flags (bench.jaxlm_train builds and times its step through trainer.setup, as for the MLM step)."""
  from jaxlm import config as config_lib  # lazy: the worker's own framework
  from jaxlm import decoder

  kw = _gpt2_kw(args)
  preset = f'gpt2-L{kw["n_layer"]}'
  decoder.PRESETS[preset] = decoder.preset('gpt2', num_layers=kw['n_layer'])
  overrides = {'task': 'causal_lm', 'model.preset': preset, 'model.dtype': args.dtype, 'model.remat': args.remat,
               'model.hidden_dropout': 0.0, 'model.attention_dropout': 0.0, 'global_batch_size': args.batch,
               'data.seq_len': args.seq, 'model.max_position_embeddings': kw['n_positions'],
               'data.train': 'builtin:stdlib', 'data.train_tokenizer_vocab': 0,
               'data.tokenizer': os.path.join(args.batches, 'tokenizer') if args.batches
               else _gpt2_tokenizer(os.path.join(tmp, 'tok'), kw['vocab_size'])}  # fmt: skip
  return 'jaxlm.config.base()', overrides, config_lib.base()


def torch_causal_train(args) -> dict:
  """transformers' GPT2LMHeadModel (same shape, random weights, no dropout) with torch.optim.AdamW, clipping
  at 1.0, on full rows of random ids (packed pretraining rows have no padding)."""
  import torch  # lazy: the worker's own framework
  import transformers

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  kw = _gpt2_kw(args)
  cfg = transformers.GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation='sdpa')
  m = transformers.GPT2LMHeadModel(cfg).float().to(dev).train()
  opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.from_numpy(np.random.default_rng(0).integers(0, kw['vocab_size'], (args.batch, args.seq))).to(dev)
  box = {}
  autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == 'bfloat16' else None

  def call():
    if autocast is not None:
      with autocast:
        box['loss'] = m(input_ids=ids, labels=ids).loss
    else:
      box['loss'] = m(input_ids=ids, labels=ids).loss
    box['loss'].backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  res = _timed_steps(call, args, lambda: float(box['loss']))
  return {'torch': {**res, 'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads(),
                    'attention': m.config._attn_implementation, 'loss': float(box['loss'])}}  # fmt: skip


def _timed_steps(call, args, sync) -> dict:
  for _ in range(args.warmup):
    call()
  sync()
  rounds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      call()
    sync()
    rounds.append((time.perf_counter() - t0) / args.steps)
  s = min(rounds)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return {'tokens_per_s': args.batch * args.seq / s, 'examples_per_s': args.batch / s, 'step_s': s,
          'rounds_step_s': rounds, 'peak_rss_gib': peak}  # fmt: skip
