"""tools/bench.py runs end to end on a tiny shape and reports every figure (no timing asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_reports_all_figures(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--preset=tiny', '--seq=32', '--batch=4',
         '--max_predictions=4', '--steps=1', '--warmup=0', '--compare', 'torch', f'--json={out}']  # fmt: skip
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''}
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'tokens/s' in res.stdout and 'MFU' in res.stdout and 'ratio' in res.stdout
  r = json.loads(out.read_text())
  j = r['jaxlm']
  for key in ('tokens_per_s', 'model_tflops', 'mfu', 'compile_s', 'peak_rss_gib', 'peak_tflops'):
    assert j[key] > 0, key
  assert r['torch']['tokens_per_s'] > 0 and r['ratio_tokens_per_s'] > 0
  assert j['loss'] == j['loss']  # Not NaN.
  # The jaxlm worker runs as `python -m jaxlm.train` does (huge pages where the host allows them,
  # jaxlm/hostenv.py), PyTorch with its default allocator; the tiny stack is unrolled.
  from jaxlm import hostenv

  assert j['hugepages'] == (hostenv.hugepage_env() is not None) and r['torch']['hugepages'] is False
  assert j['scan_layers'] is False


def test_bench_data_mode_reports_throughput(tmp_path):
  out = tmp_path / 'data.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--mode=data', '--data_seconds=1',
         '--train_tokens_per_s=1000', f'--json={out}']  # fmt: skip
  res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['text_tokens_per_s_per_core'] > 0 and r['tfrecord_tokens_per_s_per_core'] > 0
  assert r['ratio_text_to_train'] > 0 and 'per core' in res.stdout


def _compare(tmp_path, mode):
  out = tmp_path / f'{mode}.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), f'--mode={mode}', '--seq=16', '--batch=2',
         '--steps=1', '--warmup=1', '--repeats=1', f'--json={out}']  # fmt: skip
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''}
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])  # The last line is the JSON summary.
  assert summary == json.loads(out.read_text())
  assert summary['mode'] == mode and summary['seq'] == 16 and summary['batch'] == 2
  return summary, res.stdout


def test_bench_finetune_mode_compares_with_torch(tmp_path):
  r, stdout = _compare(tmp_path, 'finetune')
  assert r['jaxlm_examples_per_s'] > 0 and r['torch_examples_per_s'] > 0 and r['ratio'] > 0
  assert r['jaxlm']['compile_s'] > 0 and r['jaxlm']['loss'] == r['jaxlm']['loss'] and r['torch']['loss'] > 0
  assert 'examples/s' in stdout and 'ratio' in stdout


def test_bench_infer_mode_compares_dtypes_with_torch(tmp_path):
  r, stdout = _compare(tmp_path, 'infer')
  assert r['torch_float32_examples_per_s'] > 0
  for name in ('float32', 'bfloat16', 'int8'):
    assert r[f'jaxlm_{name}_examples_per_s'] > 0 and r[f'ratio_{name}'] > 0
    assert r['jaxlm'][name]['compile_s'] > 0
  assert 'int8' in stdout
