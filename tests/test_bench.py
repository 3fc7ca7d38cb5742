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


def test_bench_data_mode_reports_throughput(tmp_path):
  out = tmp_path / 'data.json'
  cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--mode=data', '--data_seconds=1',
         '--train_tokens_per_s=1000', f'--json={out}']  # fmt: skip
  res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['text_tokens_per_s_per_core'] > 0 and r['tfrecord_tokens_per_s_per_core'] > 0
  assert r['ratio_text_to_train'] > 0 and 'per core' in res.stdout
