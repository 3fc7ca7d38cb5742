"""tools/bench.py runs every mode end to end on a tiny shape: one result layout, every figure positive, the JSON
summary as the last line, and the jaxlm train step built by trainer.setup (no timing asserted)."""

import json
import math
import os
import subprocess
import sys

from jaxlm import hostenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Figures that must be positive wherever a result has them; the rate of each mode must be there.
FIGURES = ('examples_per_s', 'tokens_per_s', 'step_s', 'compile_s', 'model_tflops', 'peak_tflops', 'mfu',
           'peak_rss_gib', 'tokens_per_s_per_core')  # fmt: skip


def _bench(tmp_path, mode, *flags):
  """Runs the benchmark; checks the layout and the figures, returns (summary, stdout)."""
  out = tmp_path / f'{mode}.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), f'--mode={mode}', *flags, f'--json={out}']
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''}
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
  r, stdout = _bench(tmp_path, 'train', '--preset=tiny', '--seq=32', '--batch=4', '--max_predictions=4', '--steps=1',
                     '--warmup=0', '--compare', 'torch')  # fmt: skip
  assert set(r['results']) == {'jaxlm', 'torch'} and set(r['ratios']) == {'jaxlm/torch'}
  assert r['config']['seq'] == 32 and r['config']['batch'] == 4
  j, t = r['results']['jaxlm'], r['results']['torch']
  _assert_trainer_step(j, "jaxlm.config.pretraining('tiny')")
  o = j['overrides']
  assert (o['model.preset'], o['data.seq_len'], o['global_batch_size'], o['data.max_predictions']) == ('tiny', 32, 4, 4)
  assert o['data.train'] == 'builtin:stdlib' and os.path.isdir(o['data.tokenizer'])
  assert 'tokens/s' in stdout and 'MFU' in stdout
  # The jaxlm worker runs as `python -m jaxlm.train` does (huge pages where the host allows them,
  # jaxlm/hostenv.py), PyTorch with its default allocator; the tiny stack is unrolled.
  assert j['hugepages'] == (hostenv.hugepage_env() is not None) and t['hugepages'] is False
  assert j['scan_layers'] is False


def test_bench_data_mode_reports_throughput(tmp_path):
  r, stdout = _bench(tmp_path, 'data', '--data_seconds=1', '--train_tokens_per_s=1000')
  assert set(r['results']) == {'text', 'tfrecord'} and set(r['ratios']) == {'text/train_step', 'tfrecord/train_step'}
  assert 'per core' in stdout


def test_bench_finetune_mode_compares_with_torch(tmp_path):
  r, stdout = _bench(tmp_path, 'finetune', '--seq=16', '--batch=2', '--steps=1', '--warmup=1', '--repeats=1')
  assert set(r['results']) == {'jaxlm', 'torch'} and set(r['ratios']) == {'jaxlm/torch'}
  j = r['results']['jaxlm']
  _assert_trainer_step(j, 'jaxlm.config.finetuning()')
  o = j['overrides']
  assert (o['data.seq_len'], o['global_batch_size']) == (16, 2) and os.path.isdir(o['model.init_from'])
  assert 'examples/s' in stdout


def test_bench_infer_mode_compares_dtypes_with_torch(tmp_path):
  r, stdout = _bench(tmp_path, 'infer', '--seq=16', '--batch=2', '--steps=1', '--warmup=1', '--repeats=1')
  assert set(r['results']) == {'jaxlm_float32', 'jaxlm_bfloat16', 'jaxlm_int8', 'torch_float32'}
  for name in ('float32', 'bfloat16', 'int8'):
    assert r['ratios'][f'jaxlm_{name}/torch_float32'] > 0 and r['results'][f'jaxlm_{name}']['compile_s'] > 0
  assert 'int8' in stdout
