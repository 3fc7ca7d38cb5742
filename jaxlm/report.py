"""Where training metrics go: WORKDIR/metrics.jsonl, TensorBoard (process 0), Weights & Biases
(process 0, when config.wandb.project is set) and a console line.

`Reporter.write(step, metrics)` appends one JSON object per log step, logs the same values at the
same step to the W&B run given (`start_wandb`), and prints `step  loss  tokens/s  MFU  ETA`.
Only process 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any

import jax
from etils import epath

from jaxlm import config as config_lib
from jaxlm.errors import UsageError
from jaxlm.tensorflow_setup import tf

WANDB_RUN_ID = 'wandb_run_id'  # WORKDIR file holding the id of the W&B run that a resumed training continues.


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  h, rem = divmod(int(seconds), 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class Reporter:
  """Writes metrics for one run; `tokens_per_step` and `flops_per_step` turn step time into throughput,
  unless `count` reports each step's own (batches padded to different lengths)."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    tokens_per_step: int,
    flops_per_step: float,
    peak_tflops: float,
    wandb_run: Any = None,
  ):
    self.workdir, self.total_steps = workdir, total_steps
    self._wandb = wandb_run  # A started wandb run (process 0), or None.
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_tflops
    self.is_main = jax.process_index() == 0
    self._writer = None
    self._last = None  # (step, time, tokens, flops) of the previous log.
    self._before_last = None  # (step, time, tokens, flops) of the log before it.
    self._counted = [0, 0.0]  # Tokens and FLOPs that `count` reported so far.
    if self.is_main:
      self._writer = tf.summary.create_file_writer(str(epath.Path(workdir) / 'tensorboard'))
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
      with self._writer.as_default():
        for key, value in row.items():
          tf.summary.scalar(key, value, step=step)
      # NaN / Inf are not JSON: they are written as null (TensorBoard keeps the float).
      finite = {k: v if math.isfinite(v) else None for k, v in row.items()}
      with self._jsonl.open('a') as f:
        f.write(json.dumps({'step': step, **finite}, allow_nan=False) + '\n')
    if self._wandb is not None:
      self._wandb.log(row, step=step)
    return row

  def close(self, failed: bool = False) -> None:
    """Flushes TensorBoard and finishes the W&B run (marked failed when the training raised)."""
    if self.is_main:
      self._writer.flush()
      self._writer.close()
    if self._wandb is not None:
      self._wandb.finish(exit_code=1 if failed else 0)
      self._wandb = None
    sys.stdout.flush()


def start_wandb(workdir: str, wandb_config, run_config: dict) -> Any:
  """Starts (or, on resume, continues) the W&B run of `workdir` from config.wandb, with `run_config` as
  its config: the run id is kept in WORKDIR/wandb_run_id. Local workdirs also hold W&B's files
  (WORKDIR/wandb) unless WANDB_DIR says otherwise. Call it on process 0 only."""
  import wandb  # lazy: an optional extra (jaxlm[wandb]), imported only when config.wandb.project is set

  id_file = epath.Path(workdir) / WANDB_RUN_ID
  run_id = id_file.read_text().strip() if id_file.exists() else ''
  if not run_id:
    run_id = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits.
    id_file.write_text(run_id + '\n')
  kw = {}
  if '://' not in workdir and not os.environ.get('WANDB_DIR'):
    kw['dir'] = workdir
  try:
    return wandb.init(
      project=wandb_config.project, entity=wandb_config.entity or None,
      name=wandb_config.name or epath.Path(workdir).name, tags=config_lib.wandb_tags(wandb_config.tags) or None,
      config=run_config, id=run_id, resume='allow', **kw,
    )  # fmt: skip
  except wandb.Error as e:  # Not logged in, no network, a project of someone else's: one line, exit code 2.
    why = ' '.join(str(e).split()) or type(e).__name__
    raise UsageError(f'wandb.project={wandb_config.project!r}: W&B could not start the run ({why})') from None
