"""metrics.jsonl, TensorBoard and the console progress line (jaxlm/report.py)."""

import json
import math
import time

from jaxlm import report


def test_metrics_jsonl_is_json_and_a_short_last_interval_is_not_timed_alone(tmp_path):
  r = report.Reporter(str(tmp_path), total_steps=21, tokens_per_step=1000, flops_per_step=1e9, peak_tflops=1.0)
  r.start(0)
  time.sleep(0.2)
  r.write(10, {'loss': 1.0})
  time.sleep(0.2)
  r.write(20, {'loss': float('nan'), 'grad_norm': float('inf')})
  last = r.write(21, {'loss': 2.0})  # One step after the last log: timed together with the interval before.
  r.close()
  strict = lambda c: (_ for _ in ()).throw(ValueError(c))  # noqa: E731 (NaN / Infinity are not JSON)
  rows = [json.loads(line, parse_constant=strict) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows[1]['loss'] is None and rows[1]['grad_norm'] is None and rows[2]['loss'] == 2.0
  assert math.isclose(last['step_time_s'], 0.4 / 11, rel_tol=0.5), last  # Not the ~0 s of step 21 alone.
