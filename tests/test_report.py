"""metrics.jsonl, TensorBoard, the console progress line and Weights & Biases (jaxlm/report.py); the W&B runs
are offline, read back from the files they wrote."""

import json
import math
import struct
import sys
import time

import pytest
from conftest import tiny_config
from tensorboard.util import tensor_util

from jaxlm import report, trainer
from jaxlm.errors import UsageError


def test_metrics_jsonl_is_json_and_a_short_last_interval_is_not_timed_alone(tmp_path):
  r = report.Reporter(str(tmp_path), total_steps=21, tokens_per_step=1000, flops_per_step=1e9, peak_tflops=1.0)
  r.start(0)
  time.sleep(0.2)
  written = {10: r.write(10, {'loss': 1.0})}
  time.sleep(0.2)
  written[20] = r.write(20, {'loss': float('nan'), 'grad_norm': float('inf')})
  written[21] = last = r.write(
    21, {'loss': 2.0}
  )  # One step after the last log: timed together with the interval before.
  r.close()
  strict = lambda c: (_ for _ in ()).throw(ValueError(c))  # noqa: E731 (NaN / Infinity are not JSON)
  rows = [json.loads(line, parse_constant=strict) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows[1]['loss'] is None and rows[1]['grad_norm'] is None and rows[2]['loss'] == 2.0
  assert math.isclose(last['step_time_s'], 0.4 / 11, rel_tol=0.5), last  # Not the ~0 s of step 21 alone.
  # TensorBoard holds the same scalars at the same steps, NaN and Inf kept as floats.
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  board = {
    (e.step, tag): float(tensor_util.make_ndarray(e.tensor_proto))
    for tag in events.Tags()['tensors']
    for e in events.Tensors(tag)
  }
  want = {(step, k): v for step, row in written.items() for k, v in row.items()}
  assert board.keys() == want.keys() and len(want) > 6
  for key, value in want.items():
    assert board[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
  assert math.isnan(board[20, 'loss']) and board[20, 'grad_norm'] == math.inf


# ----------------------------------------------------------------------------- Weights & Biases


def _wandb_records(path):
  """The records of a W&B transaction log (run-<id>.wandb): a 7-byte header, then LevelDB-log records in
  32 KiB blocks (checksum, length, type: 1 full, 2 first, 3 middle, 4 last), each a wandb Record protobuf."""
  from wandb.proto import wandb_internal_pb2

  data, block = path.read_bytes(), 32768
  assert data[:4] == b':W&B', path
  pos, chunks = 7, b''
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # A block's tail too short for a record header is padding.
      pos += block - pos % block
      continue
    _, n, kind = struct.unpack('<IHB', data[pos : pos + 7])
    chunks, pos = chunks + data[pos + 7 : pos + 7 + n], pos + 7 + n
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      chunks = b''
      yield record


def _wandb_run(path) -> tuple[dict, dict, dict]:
  """(run record fields, config, {step: logged metrics}) of an offline run's .wandb file."""
  run, config, history = {}, {}, {}
  for r in _wandb_records(path):
    kind = r.WhichOneof('record_type')
    if kind == 'run':
      run = {'id': r.run.run_id, 'project': r.run.project, 'name': r.run.display_name, 'tags': list(r.run.tags)}
      config.update({u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != '_wandb'})
    elif kind == 'history':
      items = {u.key or '/'.join(u.nested_key): json.loads(u.value_json) for u in r.history.item}
      history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith('_')}
  return run, config, history


def test_wandb_logs_the_metrics_jsonl_rows_and_the_config_and_a_resume_continues_the_run(
  vocab_dir, tmp_path, monkeypatch
):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb_dir'))
  (tmp_path / 'wandb_dir').mkdir()
  workdir = tmp_path / 'run'
  keys = {'num_train_steps': 3, 'wandb.project': 'jaxlm-tests', 'wandb.tags': 'tiny, resumed'}
  trainer.train(tiny_config(vocab_dir, keys), str(workdir))
  trainer.train(tiny_config(vocab_dir, {**keys, 'num_train_steps': 5}), str(workdir))  # Resumes at step 3.

  run_id = (workdir / report.WANDB_RUN_ID).read_text().strip()
  files = sorted((tmp_path / 'wandb_dir' / 'wandb').glob('offline-run-*/run-*.wandb'))
  assert [f.name for f in files] == [f'run-{run_id}.wandb'] * 2  # Both processes logged to the same run.
  (first, config1, history1), (second, config2, history2) = map(_wandb_run, files)
  assert first == second == {'id': run_id, 'project': 'jaxlm-tests', 'name': 'run', 'tags': ['tiny', 'resumed']}
  assert config1['num_train_steps'] == 3 and config2['num_train_steps'] == 5
  assert config2 == json.loads((workdir / 'config.json').read_text())  # The whole resolved config.
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  jsonl = {r.pop('step'): r for r in rows}
  assert sorted(history1) == [1, 2, 3] and sorted(history2) == [4, 5]
  assert {**history1, **history2} == jsonl  # The same keys and values at the same steps.


def test_wandb_without_the_package_is_one_error_naming_the_extra(vocab_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # As in an environment without jaxlm[wandb].
  trainer.check_config(tiny_config(vocab_dir), 8)  # Off: wandb is not needed.
  with pytest.raises(UsageError) as e:
    trainer.check_config(tiny_config(vocab_dir, {'wandb.project': 'p'}), 8)
  assert str(e.value) == "wandb.project='p': the wandb package is not installed; pip install 'jaxlm[wandb]'"
