"""Where training metrics go: WORKDIR/metrics.jsonl, TensorBoard (process 0) and a console line.

`Reporter.write(step, metrics)` appends one JSON object per log step and prints
`step  loss  tokens/s  MFU  ETA`. Only process 0 writes files.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
from clu import metric_writers
from etils import epath


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  h, rem = divmod(int(seconds), 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class Reporter:
  """Writes metrics for one run; `tokens_per_step` and `flops_per_step` turn step time into throughput,
  unless `count` reports each step's own (batches padded to different lengths)."""

  def __init__(self, workdir: str, total_steps: int, tokens_per_step: int, flops_per_step: float, peak_tflops: float):
    self.workdir, self.total_steps = workdir, total_steps
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_tflops
    self.is_main = jax.process_index() == 0
    self._writer = None
    self._last = None  # (step, time, tokens, flops) of the previous log.
    self._before_last = None  # (step, time, tokens, flops) of the log before it.
    self._counted = [0, 0.0]  # Tokens and FLOPs that `count` reported so far.
    if self.is_main:
      self._writer = metric_writers.SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))
      self._jsonl = epath.Path(workdir) / 'metrics.jsonl'  # Local or remote (gs://): appended to per log step.
      with self._jsonl.open('a'):
        pass

  def start(self, step: int, peak_tflops: float | None = None) -> None:
    """Starts the throughput clock at `step` (after the compile); `peak_tflops` replaces the peak if given."""
    self._last = (step, time.perf_counter(), *self._counted)
    if peak_tflops is not None:
      self.peak = peak_tflops

  def count(self, tokens: int, flops: float) -> None:
    """Adds one step's padded tokens and model FLOPs (for steps after `start`)."""
    self._counted[0] += tokens
    self._counted[1] += flops

  def write(self, step: int, metrics: dict, prefix: str = '') -> dict:
    """Logs `metrics` (floats) at `step`, adding throughput for train metrics; returns what was logged."""
    row = {f'{prefix}{k}': float(v) for k, v in metrics.items()}
    if not prefix and self._last is not None and step > self._last[0]:
      since = self._last
      if self._before_last is not None and step - since[0] < (since[0] - self._before_last[0]) / 2:
        since = self._before_last  # A short final interval is timed with the one before it: less noise.
      now, steps = time.perf_counter(), step - since[0]
      dt = (now - since[1]) / steps
      self._before_last, self._last = self._last, (step, now, *self._counted)
      tokens, flops = self._counted[0] - since[2], self._counted[1] - since[3]
      if not tokens:  # Every step the same shape.
        tokens, flops = self.tokens_per_step * steps, self.flops_per_step * steps
      row['tokens_per_s'] = tokens / steps / dt
      row['model_tflops'] = flops / steps / dt / 1e12
      row['mfu'] = row['model_tflops'] / self.peak if self.peak else float('nan')
      row['step_time_s'] = dt
      eta = (self.total_steps - step) * dt
      print(
        f'step {step:>7d}/{self.total_steps}  loss {row.get("loss", float("nan")):.4f}'
        f'  acc {row.get("mlm_accuracy", row.get("accuracy", float("nan"))):.3f}'
        f'  {row["tokens_per_s"]:,.0f} tok/s  MFU {row["mfu"]:.2f}  ETA {_fmt_eta(eta)}',
        flush=True,
      )
    elif prefix:
      print(f'step {step:>7d}  ' + '  '.join(f'{k} {v:.4f}' for k, v in row.items()), flush=True)
    if self.is_main:
      self._writer.write_scalars(step, row)
      # NaN / Inf are not JSON: they are written as null (TensorBoard keeps the float).
      finite = {k: v if math.isfinite(v) else None for k, v in row.items()}
      with self._jsonl.open('a') as f:
        f.write(json.dumps({'step': step, **finite}, allow_nan=False) + '\n')
    return row

  def close(self) -> None:
    if self.is_main:
      self._writer.flush()
      self._writer.close()
    sys.stdout.flush()
