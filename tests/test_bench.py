"""tools/bench.py runs every step mode end to end on a tiny shape: one result layout, every figure positive, the
JSON summary as the last line, and the jaxlm train step built by trainer.setup (no timing asserted). The end-to-end
modes' parts: the ragged set, timing a process by its lines, the PyTorch side following the jaxlm config. The
fine-tuning modes compared (tools/bench_peft.py) on a small BERT."""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from jaxlm import hostenv
from jaxlm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))  # The tools are scripts that import each other by name.
import bench  # noqa: E402
import bench_data  # noqa: E402
import bench_e2e  # noqa: E402
import bench_peft  # noqa: E402

# Figures that must be positive wherever a result has them; the rate of each mode must be there.
FIGURES = ('examples_per_s', 'tokens_per_s', 'step_s', 'compile_s', 'model_tflops', 'peak_tflops', 'mfu',
           'peak_rss_gib', 'tokens_per_s_per_core')  # fmt: skip


def _bench(tmp_path, mode, *flags, ratios=True):
  """Runs the benchmark; checks the layout and the figures, returns (summary, stdout)."""
  out = tmp_path / f'{mode}.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), f'--mode={mode}', *flags, f'--json={out}']
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': TEST_XLA_FLAGS}
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])  # The last line is the JSON summary.
  assert summary == json.loads(out.read_text())
  assert set(summary) == {'mode', 'config', 'results', 'ratios'} and summary['mode'] == mode
  unit = 'examples_per_s' if mode in ('finetune', 'infer') else 'tokens_per_s'
  for name, r in summary['results'].items():
    assert r[unit] > 0 and r['peak_rss_gib'] > 0, name
    for key in FIGURES:
      assert r.get(key, 1) > 0, (name, key)
    assert math.isfinite(r.get('loss', 0.0)), name
  if ratios:
    assert summary['ratios'] and all(v > 0 for v in summary['ratios'].values())
    assert 'ratio' in res.stdout
  return summary, res.stdout


def _assert_trainer_step(j, recipe):
  """The jaxlm step is the one python -m jaxlm.train runs: built by trainer.setup from a training config."""
  assert j['built_by'] == 'trainer.setup' and j['recipe'] == recipe
  for key in ('compile_s', 'model_tflops', 'mfu', 'peak_tflops'):
    assert j[key] > 0, key
  assert j['padding'] == 0.0  # Full-length batches, as PyTorch's.


def test_bench_reports_all_figures(tmp_path):
  # Without --compare torch (the PyTorch worker and the ratios: the finetune and infer modes' tests).
  r, stdout = _bench(tmp_path, 'train', '--preset=tiny', '--seq=32', '--batch=4', '--max_predictions=4', '--steps=1',
                     '--warmup=0', '--set=model.hidden_act=gelu_tanh', '--set=model.hidden_dropout=0.0',
                     ratios=False)  # fmt: skip
  assert set(r['results']) == {'jaxlm'} and not r['ratios']
  assert r['config']['seq'] == 32 and r['config']['batch'] == 4
  j = r['results']['jaxlm']
  _assert_trainer_step(j, "jaxlm.config.pretraining('tiny')")
  o = j['overrides']
  assert (o['model.preset'], o['data.seq_len'], o['global_batch_size'], o['data.max_predictions']) == ('tiny', 32, 4, 4)
  assert o['data.train'] == 'builtin:stdlib' and os.path.isdir(o['data.tokenizer'])
  assert (o['model.hidden_act'], o['model.hidden_dropout']) == ('gelu_tanh', 0.0)  # --set: typed, after the rest.
  assert 'tokens/s' in stdout and 'MFU' in stdout
  # The jaxlm worker runs as `python -m jaxlm.train` does (huge pages where the host allows them,
  # jaxlm/hostenv.py); the tiny stack is unrolled.
  assert j['hugepages'] == (hostenv.hugepage_env() is not None)
  assert j['scan_layers'] is False


def test_bench_set_names_the_key_it_cannot_set(capsys):
  for flag, why in (('model.nope=1', "no key 'model.nope'"), ('model.hidden_act', 'expected KEY=VALUE')):
    assert bench.main(['--mode=train', '--preset=tiny', f'--set={flag}']) == 2
    err = capsys.readouterr().err
    assert f'error: --set {flag}: ' in err and why in err, err


def test_bench_data_mode_reports_throughput(tmp_path):
  r, stdout = _bench(tmp_path, 'data', '--data_seconds=1', '--train_tokens_per_s=1000')
  assert set(r['results']) == {'text', 'tfrecord'} and set(r['ratios']) == {'text/train_step', 'tfrecord/train_step'}
  assert 'per core' in stdout


def test_bench_finetune_mode_compares_with_torch(tmp_path, hf_mlm_dir):
  # A small random BERT stands in for MiniLM (the figures' model): the same code, a quicker compile.
  r, stdout = _bench(tmp_path, 'finetune', '--seq=16', '--batch=2', '--steps=1', '--warmup=1', '--repeats=1',
                     f'--model_dir={hf_mlm_dir}')  # fmt: skip
  assert set(r['results']) == {'jaxlm', 'torch'} and set(r['ratios']) == {'jaxlm/torch'}
  j = r['results']['jaxlm']
  _assert_trainer_step(j, 'jaxlm.config.finetuning()')
  # PyTorch runs with its default allocator, jaxlm as python -m jaxlm.train does.
  assert r['results']['torch']['hugepages'] is False and j['hugepages'] == (hostenv.hugepage_env() is not None)
  o = j['overrides']
  assert (o['data.seq_len'], o['global_batch_size']) == (16, 2) and os.path.isdir(o['model.init_from'])
  assert 'examples/s' in stdout


def test_bench_infer_mode_compares_dtypes_with_torch(tmp_path, hf_mlm_dir):
  r, stdout = _bench(tmp_path, 'infer', '--seq=16', '--batch=2', '--steps=1', '--warmup=1', '--repeats=1',
                     f'--model_dir={hf_mlm_dir}')  # fmt: skip
  assert set(r['results']) == {'jaxlm_float32', 'jaxlm_bfloat16', 'jaxlm_int8', 'torch_float32'}
  for name in ('float32', 'bfloat16', 'int8'):
    assert r['ratios'][f'jaxlm_{name}/torch_float32'] > 0 and r['results'][f'jaxlm_{name}']['compile_s'] > 0
  assert 'int8' in stdout


# ----------------------------------------------------------------------------- the end-to-end modes' parts


def test_make_ragged_is_deterministic_balanced_and_ragged(tmp_path, minilm_dir):
  # The command line, in a process of its own (another hash seed), and the function here write the same files.
  out = tmp_path / 'cli'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--mode=make-ragged', f'--out={out}',
         '--train_examples=400', '--test_examples=80', f'--model_dir={minilm_dir}']  # fmt: skip
  res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary['mode'] == 'make-ragged' and set(summary['results']) == {'train', 'test'}
  stats = bench_data.make_ragged(str(tmp_path / 'here'), 400, 80, seed=0)
  other = bench_data.make_ragged(str(tmp_path / 'seed1'), 400, 80, seed=1)
  for split in ('train', 'test'):
    text = (out / f'{split}.jsonl').read_text()
    assert text == (tmp_path / 'here' / f'{split}.jsonl').read_text()
    assert text != (tmp_path / 'seed1' / f'{split}.jsonl').read_text()
  rows = {split: bench_data.read_jsonl(str(out / f'{split}.jsonl')) for split in ('train', 'test')}
  assert not {r['text'] for r in rows['train']} & {r['text'] for r in rows['test']}
  for split, n in (('train', 400), ('test', 80)):
    words = [len(r['text'].split()) for r in rows[split]]
    assert len(rows[split]) == n and min(words) >= 5 and max(words) <= 60
    assert stats[split]['labels'] == other[split]['labels'] == {label: n // 2 for label in bench_data.TOPICS}
    assert stats[split]['words']['mean'] < 25 < max(words)  # Mostly short, a few long: ragged.
    # Labels do not follow the file order: a shuffled split.
    assert {r['label'] for r in rows[split][: n // 4]} == set(bench_data.TOPICS)
    r = summary['results'][split]
    assert r['labels'] == stats[split]['labels'] and r['tokens']['max'] >= r['tokens']['p90'] > r['words']['p90']
    assert r['tokens_longest_of_32'] > r['tokens']['p90']  # What padding each batch to its longest costs.


def test_e2e_times_a_process_by_its_lines(tmp_path):
  script = 'import time\nprint("ready", flush=True)\ntime.sleep(0.3)\nprint("done", flush=True)\nprint("{\\"n\\": 1}")'
  p = bench_e2e.run_process([sys.executable, '-c', script], dict(os.environ))
  assert 0.3 <= p.at('^done') - p.at('^ready') <= p.wall_s and p.last_json() == {'n': 1}
  assert p.peak_rss_gib > 0
  with pytest.raises(SystemExit, match='printed no line'):
    p.at('^never')
  with pytest.raises(SystemExit, match='exit 3'):
    bench_e2e.run_process([sys.executable, '-c', 'raise SystemExit(3)'], dict(os.environ))


def test_torch_side_follows_the_jaxlm_config(minilm_dir):
  import bench_torch

  from jaxlm import optim

  args = argparse.Namespace(model_dir=minilm_dir, steps=50, batch=8, seq=64, jaxlm_args='')
  hp = bench_e2e.torch_hyperparameters(args, '/data')
  assert (hp['steps'], hp['batch'], hp['seq_len'], hp['lr'], hp['warmup_steps']) == (50, 8, 64, 2e-5, 5)
  assert (hp['clip'], hp['weight_decay'], hp['hidden_dropout'], hp['attention_dropout']) == (1.0, 0.01, 0.1, 0.1)
  # Overrides reach PyTorch as python -m jaxlm.train parses them.
  args.jaxlm_args = '--config.learning_rate=3e-5 --config.warmup_steps=7 --config.model.attention_dropout=0.0'
  hp = bench_e2e.torch_hyperparameters(args, '/data')
  assert (hp['lr'], hp['warmup_steps'], hp['attention_dropout']) == (3e-5, 7, 0.0)
  # PyTorch's learning rate is jaxlm's, step by step.
  jaxlm_lr = optim.make_schedule(hp['lr'], hp['warmup_steps'], hp['steps'])
  torch_factor = bench_torch._schedule(hp['warmup_steps'], hp['steps'])
  np.testing.assert_allclose([hp['lr'] * torch_factor(s) for s in range(50)], [jaxlm_lr(s) for s in range(50)],
                             rtol=1e-6, atol=1e-12)  # fmt: skip
  args.jaxlm_args = '--config.optimizer.name=lamb'
  with pytest.raises(SystemExit, match='lamb'):
    bench_e2e.torch_hyperparameters(args, '/data')
  for bad in ('--config.data.no_such_key=1', '--config.learning_rate=fast'):
    args.jaxlm_args = bad
    with pytest.raises(UsageError, match='--jaxlm_args'):
      bench_e2e.torch_hyperparameters(args, '/data')


def test_bench_peft_compares_modes_on_the_same_data(tmp_path, hf_mlm_dir, capsys):
  out = tmp_path / 'peft'
  flags = ['--out', str(out), '--model_dir', hf_mlm_dir, '--steps', '2', '--batch', '8', '--seq_len', '16', '--train_examples', '16',
           '--test_examples', '8', '--adapter_size', '16', '--modes', 'head,adapter']  # fmt: skip
  # Two of the four modes (each one compiles a step of its own; LoRA's and full fine-tuning's run elsewhere), on
  # one length bucket (16 tokens: one train and one eval program per mode).
  assert bench_peft.main(flags) == 0
  stdout = capsys.readouterr().out
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary == json.loads((out / 'summary.json').read_text())
  results = {r['mode']: r for r in summary['results']}
  assert list(results) == ['head', 'adapter']
  assert 0 < results['head']['trainable'] < results['adapter']['trainable'] < results['adapter']['total']
  assert results['adapter']['total'] > results['head']['total']  # The adapters are parameters of the model.
  assert all(0.0 <= r['test_accuracy'] <= 1.0 and r['seconds'] > 0 for r in results.values())
  assert '| `adapter` | 0.001 |' in stdout and summary['data']['test']['examples'] == 8
  assert bench_peft.main(flags) == 2  # --out is not empty now.
  assert 'error: --out' in capsys.readouterr().err
