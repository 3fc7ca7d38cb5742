"""Causal-LM workers of tools/bench.py: generation with a key/value cache, jaxlm against transformers.

  python tools/bench.py --mode generate --rounds 2   # GPT-2-small shape cut to 4 layers, 8 prompts, 128 new tokens

Both sides run the same GPT-2 shape (--layers, default 4, of GPT-2 small: hidden 768, 12 heads,
vocabulary 50,257) with random weights, on the same batch of 8 prompts of different lengths
(12 to 64 tokens; --seq is the number of new tokens). jaxlm runs `Generator.generate_ids`
(generate.py: left-padded prompts, one jitted prefill + while-loop decode); transformers runs
`GPT2LMHeadModel.generate(do_sample=False)` on the left-padded batch with its attention mask, its
default attention (SDPA) and key/value cache. No stop token: every row makes all --seq tokens.
The unit is new tokens per second, the prefill included; the compile is not (warmup calls).
"""

from __future__ import annotations

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
