"""End to end against PyTorch, process start to exit: `tools/bench.py --mode finetune-e2e | predict-e2e`.

finetune-e2e: `python -m jaxlm.train --config configs/finetune_files.py` from MiniLM on the ragged
set (bench_data.py), evaluated on its test split at the end, against `tools/bench_torch.py
finetune` (transformers + PyTorch, each batch padded to its longest example) with the same steps,
batch, truncation, schedule, AdamW, clipping, dropout and seed: read from the jaxlm config with
--jaxlm_args applied. --group_by_length adds PyTorch with transformers' LengthGroupedSampler.
predict-e2e: `python -m jaxlm.predict` over the test split against `tools/bench_torch.py predict`
on the same model: MiniLM with a new head (by default), or --checkpoint (a jaxlm run, exported to
Hugging Face for PyTorch unless --torch_checkpoint names its own).

Every command is a fresh process timed from its start to its exit: imports, loading, compiling,
reading the data, evaluating and saving all count. The train loop is timed between the line each
process prints before its first step and the one after its last. The commands alternate over
--rounds (A B A B: the machine's drift falls on both) and each result keeps its fastest round.
Each jaxlm process gets a fresh, empty JAXLM_COMPILATION_CACHE directory (--jaxlm_cache fresh; a
first run on a machine); predict-e2e runs jaxlm twice per round, the second (`jaxlm_rerun`) on
the directory the first one filled. --jaxlm_env sets more variables, e.g. JAXLM_COMPILATION_CACHE=0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import bench_data

from jaxlm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'finetune_files.py')
TORCH = os.path.join(ROOT, 'tools', 'bench_torch.py')
TORCH_LOOP_START, TORCH_LOOP_END = r'^train loop: start', r'^train loop: done'  # bench_torch.py prints them.
JAXLM_LOOP_START = r'^fine-tuning \('  # trainer.restore_or_init's last line before the first step.


@dataclasses.dataclass
class Process:
  """A finished command: wall seconds, stdout lines with the second each arrived, stderr, peak memory."""

  cmd: list[str]
  wall_s: float
  lines: list[tuple[float, str]]
  stderr: str
  peak_rss_gib: float

  def at(self, pattern: str) -> float:
    """Seconds from the start to the first stdout line matching `pattern`."""
    for t, line in self.lines:
      if re.search(pattern, line):
        return t
    raise SystemExit(f'bench: {shlex.join(self.cmd[:4])} ... printed no line matching {pattern!r}')

  def last_json(self) -> dict:
    return json.loads(self.lines[-1][1])


def run_process(cmd: list[str], env: dict) -> Process:
  """Runs `cmd` from the repository root; its stdout is read line by line as it comes."""
  with tempfile.TemporaryFile('w+') as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    lines = [(time.perf_counter() - t0, line.rstrip('\n')) for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)  # This child's own peak memory, not the largest of all children.
    wall_s = time.perf_counter() - t0
    err.seek(0)
    stderr = err.read()
  code = os.waitstatus_to_exitcode(status)
  if code:
    sys.stderr.write('\n'.join(line for _, line in lines[-20:]) + '\n' + stderr[-5000:])
    raise SystemExit(f'bench: {shlex.join(cmd)} failed (exit {code})')
  return Process(cmd, wall_s, lines, stderr, usage.ru_maxrss / 2**20)


def _env(args, cache: str | None = None, jaxlm: bool = False) -> dict:
  """The environment of one command: this repository's jaxlm first on the path, unbuffered output; for jaxlm,
  the compilation cache directory and --jaxlm_env."""
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  if jaxlm:
    if cache:
      env.pop('JAX_COMPILATION_CACHE_DIR', None)  # JAX's own variable would win over jaxlm's.
      env['JAXLM_COMPILATION_CACHE'] = cache
    env.update(kv.split('=', 1) for kv in args.jaxlm_env)
  return env


def _cache_dir(args, tmp: str) -> str | None:
  """A compilation cache directory for the next jaxlm process: a fresh one, this bench's shared one, or None
  (--jaxlm_cache default: the user's)."""
  if args.jaxlm_cache == 'default':
    return None
  return tempfile.mkdtemp(prefix='xla-', dir=tmp) if args.jaxlm_cache == 'fresh' else os.path.join(tmp, 'xla')


def _best(runs: dict[str, list[dict]]) -> dict:
  """Each result's fastest round (end to end), with every round's examples/s."""
  return {n: {**max(rs, key=lambda r: r['examples_per_s']), 'runs': [r['examples_per_s'] for r in rs]}
          for n, rs in runs.items()}  # fmt: skip


# ----------------------------------------------------------------------------- fine-tuning


def jaxlm_overrides(args, data: str) -> list[str]:
  """The flags of `python -m jaxlm.train` for this bench: the data, MiniLM, the shapes, one evaluation at the end."""
  s = args.steps
  return [f'--config.model.init_from={args.model_dir}', f'--config.data.train=jsonl:{data}/train.jsonl',
          f'--config.data.eval=jsonl:{data}/test.jsonl', f'--config.num_train_steps={s}',
          f'--config.global_batch_size={args.batch}', f'--config.data.seq_len={args.seq}',
          f'--config.eval_every_steps={s}', f'--config.checkpoint_every_steps={s}',
          *shlex.split(args.jaxlm_args)]  # fmt: skip


def torch_hyperparameters(args, data: str) -> dict:
  """What the PyTorch side must match, from the jaxlm config exactly as `python -m jaxlm.train` would parse it."""
  from absl import flags  # lazy: only the fine-tuning mode reads a config
  from ml_collections import config_flags

  argv = ['bench', f'--config={CONFIG}', *(a for a in jaxlm_overrides(args, data) if a.startswith('--config'))]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
    c = fv.config
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:  # An unknown key, a bad value.
    raise UsageError(f'--jaxlm_args={args.jaxlm_args!r}: {e}') from None
  plain = {'optimizer.name': c.optimizer.name, 'lr_schedule': c.lr_schedule, 'finetune.mode': c.finetune.mode,
           'grad_accum_steps': c.grad_accum_steps}  # fmt: skip
  if plain != {'optimizer.name': 'adamw', 'lr_schedule': 'linear', 'finetune.mode': 'full', 'grad_accum_steps': 1}:
    raise SystemExit(f'bench: the PyTorch side runs full AdamW, a linear schedule, no accumulation; not {plain}')
  o = c.optimizer
  warmup = c.warmup_steps if c.warmup_steps > 0 else round(c.warmup_ratio * c.num_train_steps)  # optim.warmup_steps
  return {
    'steps': c.num_train_steps, 'batch': c.global_batch_size, 'seq_len': c.data.seq_len, 'seed': c.seed,
    'lr': c.learning_rate, 'warmup_steps': warmup,
    'weight_decay': c.weight_decay, 'b1': o.b1, 'b2': o.b2, 'eps': o.eps, 'clip': c.clip_grad_norm or 0.0,
    'hidden_dropout': c.model.hidden_dropout, 'attention_dropout': c.model.attention_dropout,
    'log_every': c.log_every_steps,
  }  # fmt: skip


def _train_figures(framework: str, p: Process, start: float, end: float, examples: int, **extra) -> dict:
  loop_s = end - start
  return {'framework': framework, 'wall_s': p.wall_s, 'examples_per_s': examples / p.wall_s, 'train_loop_s': loop_s,
          'train_examples_per_s': examples / loop_s, 'startup_s': start, 'after_loop_s': p.wall_s - end,
          'peak_rss_gib': p.peak_rss_gib, **extra}  # fmt: skip


def jaxlm_finetune(args, data: str, workdir: str, cache: str | None, hp: dict) -> dict:
  """One `python -m jaxlm.train` run: its figures, test accuracy and mean padded batch length."""
  cmd = [sys.executable, '-m', 'jaxlm.train', '--config', CONFIG, '--workdir', workdir, *jaxlm_overrides(args, data)]
  p = run_process(cmd, _env(args, cache, jaxlm=True))
  end = p.at(rf'^step\s+{hp["steps"]}/{hp["steps"]}\b')  # The last step's log line, before the evaluation.
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    accuracy = json.load(f)['accuracy']
  rows = [r for r in bench_data.read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'step_time_s' in r]
  # The tokens the logged steps count, per example: the padded batch length.
  batch_len = sum(r['tokens_per_s'] * r['step_time_s'] for r in rows) / len(rows) / hp['batch'] if rows else None
  loss = rows[-1]['loss'] if rows else None
  return _train_figures('jaxlm', p, p.at(JAXLM_LOOP_START), end, hp['steps'] * hp['batch'], accuracy=accuracy,
                        loss=loss, batch_len=batch_len, command=shlex.join(cmd))  # fmt: skip


def torch_finetune(args, data: str, out: str, hp: dict, grouped: bool) -> dict:
  """One `tools/bench_torch.py finetune` run: its figures, test accuracy and mean padded batch length."""
  cmd = [sys.executable, TORCH, 'finetune', '--model', args.model_dir, '--train', f'{data}/train.jsonl',
         '--test', f'{data}/test.jsonl', '--out', out, '--threads', str(args.torch_threads),
         *(f'--{k}={v}' for k, v in hp.items()), *(['--group_by_length'] if grouped else [])]  # fmt: skip
  p = run_process(cmd, _env(args))
  r = p.last_json()
  return _train_figures('torch', p, p.at(TORCH_LOOP_START), p.at(TORCH_LOOP_END), hp['steps'] * hp['batch'], **r,
                        command=shlex.join(cmd))  # fmt: skip


def run_finetune(args, data: str, tmp: str) -> tuple[dict, dict, dict]:
  """(results, ratios, config additions) of finetune-e2e."""
  hp = torch_hyperparameters(args, data)
  runs = {}
  for i in range(args.rounds):
    keep = args.keep if args.keep and i == args.rounds - 1 else None  # The last round's runs are kept.
    workdir = os.path.join(keep or tmp, 'jaxlm' if keep else f'jaxlm-{i}')
    runs.setdefault('jaxlm', []).append(jaxlm_finetune(args, data, workdir, _cache_dir(args, tmp), hp))
    for name in ('torch', 'torch_grouped') if args.group_by_length else ('torch',):
      out = os.path.join(keep or tmp, name if keep else f'{name}-{i}')
      runs.setdefault(name, []).append(torch_finetune(args, data, out, hp, name == 'torch_grouped'))
  results = _best(runs)
  ratios = {}
  for name in results:
    if name.startswith('torch'):
      ratios[f'jaxlm/{name}'] = results['jaxlm']['examples_per_s'] / results[name]['examples_per_s']
      ratios[f'jaxlm/{name} train loop'] = (
        results['jaxlm']['train_examples_per_s'] / results[name]['train_examples_per_s']
      )
  return results, ratios, {'torch_hyperparameters': hp}


# ----------------------------------------------------------------------------- predict


def _is_hf(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory (a jaxlm run has a config.json of its own, without model_type)."""
  try:
    with open(os.path.join(path, 'config.json')) as f:
      return 'model_type' in json.load(f)
  except (OSError, ValueError):
    return False


def _models(args, data: str, tmp: str) -> dict:
  """{checkpoint: jaxlm's, torch_checkpoint: PyTorch's Hugging Face directory, about: where they come from}:
  --checkpoint / --torch_checkpoint, the jaxlm one exported for PyTorch, or MiniLM with a new head for the data's
  labels (made here, untimed)."""
  if args.checkpoint and (args.torch_checkpoint or _is_hf(args.checkpoint)):
    return {'checkpoint': args.checkpoint, 'torch_checkpoint': args.torch_checkpoint or args.checkpoint,
            'about': 'given'}  # fmt: skip
  if args.checkpoint:
    out = os.path.join(tmp, 'hf')
    run_process([sys.executable, '-m', 'jaxlm.export', '--checkpoint', args.checkpoint, '--out', out, '--format', 'hf'],
                _env(args))  # fmt: skip
    return {'checkpoint': args.checkpoint, 'torch_checkpoint': out, 'about': 'exported by python -m jaxlm.export'}
  labels = sorted({r['label'] for r in bench_data.read_jsonl(os.path.join(data, 'train.jsonl'))})
  out = os.path.join(tmp, 'minilm-head')
  run_process([sys.executable, TORCH, 'with-head', '--model', args.model_dir, '--labels', ','.join(labels),
               '--out', out], _env(args))  # fmt: skip
  return {'checkpoint': out, 'torch_checkpoint': out, 'about': f'{args.model_dir} with a new head for {labels}'}


def _predict_figures(framework: str, p: Process, n: int, predict_s: float, cmd: list[str]) -> dict:
  return {'framework': framework, 'wall_s': p.wall_s, 'examples_per_s': n / p.wall_s, 'predict_s': predict_s,
          'predict_examples_per_s': n / predict_s, 'startup_s': p.wall_s - predict_s, 'peak_rss_gib': p.peak_rss_gib,
          'command': shlex.join(cmd)}  # fmt: skip


def _agreement(test: str, outputs: dict[str, str]) -> dict:
  """How far the predict outputs of jaxlm and PyTorch agree (the share of equal labels, the largest probability
  difference), and each one's accuracy on the test labels."""
  truth = [r['label'] for r in bench_data.read_jsonl(test)]
  ra, rb = (bench_data.read_jsonl(path) for path in outputs.values())  # jaxlm's, PyTorch's
  if not len(ra) == len(rb) == len(truth):
    raise SystemExit(f'bench: {len(truth)} test examples, but {len(ra)} jaxlm and {len(rb)} PyTorch predictions')
  diff = max(abs(x['probabilities'][k] - y['probabilities'][k]) for x, y in zip(ra, rb) for k in x['probabilities'])
  accuracy = {name: sum(r['label'] == t for r, t in zip(rs, truth)) / len(truth) for name, rs in zip(outputs, (ra, rb))}
  return {'same_label': sum(x['label'] == y['label'] for x, y in zip(ra, rb)) / len(truth),
          'max_probability_diff': diff, 'accuracy': accuracy}  # fmt: skip


def run_predict(args, data: str, tmp: str) -> tuple[dict, dict, dict]:
  """(results, ratios, config additions) of predict-e2e."""
  models = _models(args, data, tmp)
  test = os.path.join(data, 'test.jsonl')
  n = len(bench_data.read_jsonl(test))
  out = {name: os.path.join(tmp, f'{name}.jsonl') for name in ('jaxlm', 'torch')}
  runs = {}
  for _ in range(args.rounds):
    cache = _cache_dir(args, tmp)
    for name in ('jaxlm', 'jaxlm_rerun'):
      cmd = [sys.executable, '-m', 'jaxlm.predict', '--checkpoint', models['checkpoint'], '--input', test, '--output',
             out['jaxlm'], '--batch_size', str(args.batch), '--max_length', str(args.seq)]  # fmt: skip
      p = run_process(cmd, _env(args, cache, jaxlm=True))
      # predict's own last line: "N examples in S s: ..." (loading excluded, compiling included).
      seconds = float(re.search(r'(\d+) examples in ([\d.]+)s', p.stderr).group(2))
      runs.setdefault(name, []).append(_predict_figures('jaxlm', p, n, seconds, cmd))
    cmd = [sys.executable, TORCH, 'predict', '--model', models['torch_checkpoint'], '--input', test,
           '--output', out['torch'], '--batch', str(args.batch), '--seq_len', str(args.seq),
           '--threads', str(args.torch_threads)]  # fmt: skip
    p = run_process(cmd, _env(args))
    r = p.last_json()
    runs.setdefault('torch', []).append({**_predict_figures('torch', p, n, r['loop_s'], cmd), **r})
  results = _best(runs)
  ratios = {f'{name}/torch': results[name]['examples_per_s'] / results['torch']['examples_per_s']
            for name in ('jaxlm', 'jaxlm_rerun')}  # fmt: skip
  return results, ratios, {'models': models, 'agreement': _agreement(test, out)}


def line(name: str, r: dict) -> str:
  """One end-to-end result, human-readable."""
  s = f'{name:14s} {r["examples_per_s"]:9.1f} examples/s end to end ({r["wall_s"]:.1f} s'
  if 'train_loop_s' in r:
    s += f'; train loop {r["train_loop_s"]:.1f} s: {r["train_examples_per_s"]:.1f} examples/s'
    s += f'; accuracy {r["accuracy"]:.3f}' + (f'; padded batch length {r["batch_len"]:.1f}' if r['batch_len'] else '')
  else:
    s += f'; start-up {r["startup_s"]:.1f} s, predicting {r["predict_s"]:.1f} s: {r["predict_examples_per_s"]:.1f}/s'
  return s + f')  peak RSS {r["peak_rss_gib"]:.2f} GiB'


def run(args) -> tuple[dict, dict, dict]:
  """Runs finetune-e2e or predict-e2e on --data (or a ragged set made now); (results, ratios, config additions)."""
  for name in ('data', 'jaxlm', 'torch', 'torch_grouped') if args.keep else ():
    if os.path.exists(os.path.join(args.keep, name)):
      raise SystemExit(f'bench: --keep {args.keep}: {name}/ is there already; name a new directory')
  with tempfile.TemporaryDirectory(prefix='jaxlm-bench-e2e-') as tmp:
    data = args.data or os.path.join(args.keep or tmp, 'data')
    if not args.data:
      bench_data.make_ragged(data, args.train_examples, args.test_examples, args.data_seed)
    stats = {split: bench_data.split_stats(os.path.join(data, f'{split}.jsonl'), args.model_dir, args.batch)
             for split in ('train', 'test')}  # fmt: skip
    run_mode = run_finetune if args.mode == 'finetune-e2e' else run_predict
    results, ratios, extra = run_mode(args, data, tmp)
  where = data if args.data or args.keep else 'made for this run (make_ragged, --data_seed), then removed'
  return results, ratios, {'data': where, 'data_stats': stats, **extra}
