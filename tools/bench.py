"""Training-step benchmark: tokens/s, model TFLOP/s, MFU, compile time and peak memory.

  python tools/bench.py                          # L=4 H=512 A=8, seq 128, batch 16, float32
  python tools/bench.py --compare torch          # also transformers' PyTorch BertForMaskedLM
  python tools/bench.py --preset base --dtype bfloat16 --batch 256   # on a TPU / GPU
  python tools/bench.py --mode data --train_tokens_per_s 1205        # the input pipeline

Each framework runs in its own subprocess (so peak memory and threads are its own) on the
same shapes, and the ratio is printed. MFU is model FLOPs per second over the chip's peak:
the published dense bf16 peak on TPU / GPU, and on CPU a dense float32 matmul measured in
the same run (the best this machine does, not a datasheet number).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _batch_numpy(args, vocab):
  import numpy as np

  rng = np.random.default_rng(0)
  B, T, P = args.batch, args.seq, args.max_predictions
  ids = rng.integers(1000, vocab, (B, T)).astype(np.int32)
  pos = np.sort(np.stack([rng.choice(np.arange(1, T - 1), P, replace=False) for _ in range(B)]), -1)
  return ids, pos.astype(np.int32), np.take_along_axis(ids, pos, -1)


def run_jax(args) -> dict:
  import jax
  import numpy as np

  from jaxlm import model, optim, perf, sharding, steps, tasks

  cfg = model.preset(args.preset, dtype=args.dtype, scan_layers=not args.unroll, remat=args.remat)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  if args.hidden:
    cfg = cfg.replace(
      hidden_size=args.hidden, num_heads=args.heads or args.hidden // 64, intermediate_size=4 * args.hidden
    )
  mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
  graphdef, abstract_params = model.abstract(cfg)
  shardings = sharding.param_shardings(abstract_params, mesh)
  _, params = model.init(cfg, 0, out_shardings=shardings)
  tx = optim.make_optimizer('adamw', 1e-4)
  state = jax.jit(lambda p: steps.init_state(p, tx))(params)
  ids, pos, labels = _batch_numpy(args, cfg.vocab_size)
  B, T = ids.shape
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
  batch = {
    'input_ids': put(ids), 'attention_mask': put(np.ones_like(ids)), 'token_type_ids': put(np.zeros_like(ids)),
    'masked_positions': put(pos), 'masked_ids': put(labels), 'masked_weights': put(np.ones(pos.shape, np.float32)),
  }  # fmt: skip
  step = jax.jit(steps.make_train_step(graphdef, tx, tasks.mlm_loss), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(0, impl=args.rng)).compile()
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = compiled(state, batch, jax.random.key(i, impl=args.rng))
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, metrics = compiled(state, batch, jax.random.key(100 + i, impl=args.rng))
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps
  flops = perf.train_flops_per_step(cfg, B, T, args.max_predictions)
  peak, peak_name = perf.peak_tflops()
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  tflops = flops / step_s / 1e12
  return {
    'framework': 'jaxlm', 'backend': dev.platform, 'devices': jax.device_count(),
    'tokens_per_s': B * T / step_s, 'step_s': step_s, 'model_tflops': tflops,
    'peak_tflops': peak, 'peak_name': peak_name, 'mfu': tflops / peak, 'compile_s': compile_s,
    'peak_device_gib': stats.get('peak_bytes_in_use', 0) / 2**30, 'peak_rss_gib': _peak_rss_gib(),
    'loss': float(metrics['loss']),
  }  # fmt: skip


def run_torch(args) -> dict:
  import torch
  from transformers import BertConfig, BertForMaskedLM

  from jaxlm import model

  torch.manual_seed(0)
  cfg = model.preset(args.preset)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  if args.hidden:
    cfg = cfg.replace(
      hidden_size=args.hidden, num_heads=args.heads or args.hidden // 64, intermediate_size=4 * args.hidden
    )
  hf_cfg = BertConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
  )  # fmt: skip
  m = BertForMaskedLM(hf_cfg).train()
  opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01)
  ids, pos, labels = _batch_numpy(args, cfg.vocab_size)
  ids_t = torch.from_numpy(ids).long()
  lab = torch.full(ids_t.shape, -100, dtype=torch.long)
  lab.scatter_(1, torch.from_numpy(pos).long(), torch.from_numpy(labels).long())

  def step():
    loss = m(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=lab).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(args.warmup):
    step()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  step_s = (time.perf_counter() - t0) / args.steps
  return {
    'framework': 'torch', 'backend': 'cpu', 'threads': torch.get_num_threads(),
    'tokens_per_s': ids.size / step_s, 'step_s': step_s, 'peak_rss_gib': _peak_rss_gib(),
    'loss': float(loss),
  }  # fmt: skip


_SHAPE_FLAGS = ('preset', 'layers', 'hidden', 'heads', 'seq', 'batch', 'max_predictions', 'dtype', 'remat',
  'steps', 'warmup', 'rng')  # fmt: skip


def run_data(args) -> dict:
  """Input throughput: raw text -> masked batches, and pre-tokenized TFRecords -> masked batches."""
  import tempfile

  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.data import pretrain
  from jaxlm.data.builtin import stdlib_documents

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import prepare_data

  root = tempfile.mkdtemp(prefix='jaxlm-bench-data-')
  docs = [d.replace('\n', ' ') for d in stdlib_documents()]
  for i in range(4):
    with open(os.path.join(root, f'part{i}.txt'), 'w') as f:
      f.write('\n'.join(docs[i::4]) + '\n')
  tok = tokenizer_lib.train_wordpiece(docs, 30522)
  tok.save(os.path.join(root, 'tok'))
  prepare_data.main(['--input', f'text:{root}/part*.txt', '--tokenizer', os.path.join(root, 'tok'),
                     '--out', os.path.join(root, 'rec')])  # fmt: skip
  out = {'cores': os.cpu_count()}
  for name, spec in (('text', f'text:{root}/part*.txt'), ('tfrecord', f'tfrecord:{root}/rec/*.tfrecord')):
    ds = pretrain.pretrain_dataset(
      spec, tok, seq_len=args.seq, max_predictions=args.max_predictions, global_batch_size=args.batch,
      shuffle_buffer=1000, repeat=True,
    )  # fmt: skip
    it = pretrain.Iterator(ds)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.data_seconds:
      n += next(it)['input_ids'].size
    tps = n / (time.perf_counter() - t0)
    out[f'{name}_tokens_per_s'] = tps
    out[f'{name}_tokens_per_s_per_core'] = tps / os.cpu_count()
  return out


def _worker(args, which: str) -> dict:
  """Runs one framework in a fresh interpreter on the same shapes; returns its result dict."""
  cmd = [sys.executable, os.path.abspath(__file__), '--_worker', which]
  cmd += [f'--{k}={getattr(args, k)}' for k in _SHAPE_FLAGS] + (['--unroll'] if args.unroll else [])
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode:
    sys.stderr.write(res.stderr)
    raise SystemExit(f'bench: the {which} worker failed (exit {res.returncode})')
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small', help='model preset (small = L4 H512 A8)')
  p.add_argument('--layers', type=int, default=0, help='override the number of layers')
  p.add_argument('--hidden', type=int, default=0, help='override the hidden size (heads = hidden/64)')
  p.add_argument('--heads', type=int, default=0, help='override the number of heads')
  p.add_argument('--seq', type=int, default=128, help='sequence length')
  p.add_argument('--batch', type=int, default=16, help='global batch size')
  p.add_argument('--max_predictions', type=int, default=20, help='masked positions per sequence')
  p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on TPU/GPU)')
  p.add_argument('--remat', default='none', help='rematerialisation policy')
  p.add_argument('--unroll', action='store_true', help='unroll the layers instead of lax.scan')
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument('--compare', choices=['torch'], help='also run the PyTorch baseline')
  p.add_argument('--rounds', type=int, default=1, help='alternate the frameworks this often; keep the best')
  p.add_argument('--rng', default='threefry2x32', help='PRNG implementation of the dropout keys')
  p.add_argument('--json', help='write the results here as JSON')
  p.add_argument('--mode', choices=['train', 'data'], default='train', help='time the train step or the input')
  p.add_argument('--data_seconds', type=float, default=20.0, help='data mode: seconds per source')
  p.add_argument(
    '--train_tokens_per_s',
    type=float,
    default=0.0,
    help='data mode: tokens/s the train step consumes (from train mode), for the ratio',
  )
  p.add_argument('--_worker', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker:
    print(json.dumps(run_jax(args) if args._worker == 'jax' else run_torch(args)))
    return 0
  if args.mode == 'data':
    d = run_data(args)
    consumed = args.train_tokens_per_s
    print(
      f'data   raw text -> masked batches   {d["text_tokens_per_s"]:12,.0f} tokens/s'
      f'  ({d["text_tokens_per_s_per_core"]:,.0f} per core, {d["cores"]} cores)'
    )
    print(
      f'data   TFRecords -> masked batches  {d["tfrecord_tokens_per_s"]:12,.0f} tokens/s'
      f'  ({d["tfrecord_tokens_per_s_per_core"]:,.0f} per core)'
    )
    if consumed:
      d['train_tokens_per_s'] = consumed
      d['ratio_text_to_train'] = d['text_tokens_per_s'] / consumed
      d['ratio_tfrecord_to_train'] = d['tfrecord_tokens_per_s'] / consumed
      print(
        f'ratio  input / train step: raw text {d["ratio_text_to_train"]:.0f}x, TFRecords {d["ratio_tfrecord_to_train"]:.0f}x'
        f' (train step: {consumed:,.0f} tokens/s)'
      )
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(d, f, indent=2)
    return 0
  # Alternate the frameworks over a few rounds and keep each one's best: this machine's
  # speed drifts, and alternating spreads the drift over both.
  runs = {'jaxlm': [], 'torch': []}
  for _ in range(args.rounds):
    runs['jaxlm'].append(_worker(args, 'jax'))
    if args.compare == 'torch':
      runs['torch'].append(_worker(args, 'torch'))
  best = {k: max(v, key=lambda r: r['tokens_per_s']) for k, v in runs.items() if v}
  results = {'args': vars(args), 'jaxlm': best['jaxlm']}
  results['rounds'] = {k: [r['tokens_per_s'] for r in v] for k, v in runs.items() if v}
  j = results['jaxlm']
  print(
    f'jaxlm  [{j["backend"]} x{j["devices"]}] {j["tokens_per_s"]:10.0f} tokens/s  {j["model_tflops"]:.3f} TFLOP/s'
    f'  MFU {j["mfu"]:.2f} (of {j["peak_tflops"]:.3f} TFLOP/s, {j["peak_name"]})'
    f'  compile {j["compile_s"]:.1f}s  peak RSS {j["peak_rss_gib"]:.2f} GiB'
    + (f'  peak device {j["peak_device_gib"]:.2f} GiB' if j['peak_device_gib'] else '')
  )
  if args.compare == 'torch':
    t = results['torch'] = best['torch']
    results['ratio_tokens_per_s'] = j['tokens_per_s'] / t['tokens_per_s']
    print(
      f'torch  [cpu, {t["threads"]} threads] {t["tokens_per_s"]:10.0f} tokens/s  peak RSS {t["peak_rss_gib"]:.2f} GiB'
    )
    print(f'ratio  jaxlm / torch tokens/s = {results["ratio_tokens_per_s"]:.2f}x')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
