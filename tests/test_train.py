"""python -m jaxlm.train end to end: quickstart, meshes, two real processes, accumulation, bad configs."""

import json
import os
import runpy
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import losses, model, optim, steps, tokenizer, trainer
from jaxlm.data import pretrain
from jaxlm.errors import UsageError
from jaxlm.tasks import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, devices=8, timeout=600, env=None):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', **(env or {})}
  return subprocess.run(
    [sys.executable, '-m', 'jaxlm.train', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def vocab_dir(tmp_path_factory):
  """A small WordPiece vocabulary trained on the builtin corpus, shared by the runs below."""
  out = str(tmp_path_factory.mktemp('vocab'))
  tokenizer.train_wordpiece(pretrain.iter_texts('builtin:stdlib'), 2000).save(out)
  return out


def _small_run_flags(vocab_dir, steps=6):
  return [
    '--config', os.path.join(ROOT, 'configs', 'quickstart.py'), f'--config.data.tokenizer={vocab_dir}',
    f'--config.num_train_steps={steps}', '--config.log_every_steps=1', '--config.eval_every_steps=0',
    '--config.global_batch_size=8', '--config.data.seq_len=32', '--config.data.max_predictions=5',
    '--config.model.hidden_dropout=0.0', '--config.model.attention_dropout=0.0', '--config.data.shuffle_buffer=64',
  ]  # fmt: skip


def test_quickstart_runs_end_to_end(tmp_path):
  workdir = str(tmp_path / 'qs')
  res = _run(
    ['--config', 'configs/quickstart.py', '--workdir', workdir, '--config.num_train_steps=40',
     '--config.log_every_steps=10', '--config.eval_every_steps=40', '--config.data.train_tokenizer_vocab=3000',
     '--config.profile_start_step=5', '--config.profile_num_steps=2'],
    devices=1,
  )  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  rows = _metrics(workdir)
  for key in ('step', 'loss', 'mlm_accuracy', 'learning_rate', 'grad_norm', 'tokens_per_s'):
    assert key in rows[0], key
  assert rows[-1]['step'] == 40 and 'eval_loss' in rows[-1]
  assert rows[-2]['loss'] < rows[0]['loss'] - 0.5  # The MLM loss is falling.
  assert 'tok/s' in res.stdout and 'MFU' in res.stdout and 'ETA' in res.stdout
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['num_train_steps'] == 40
  assert tokenizer.load(os.path.join(workdir, 'tokenizer')).vocab_size > 1000
  traces = [f for _, _, fs in os.walk(os.path.join(workdir, 'profile')) for f in fs]
  assert any(f.endswith('.xplane.pb') for f in traces), traces


@pytest.mark.parametrize('name', sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py')))
def test_shipped_configs_validate_and_document_their_command(name):
  mod = runpy.run_path(os.path.join(ROOT, 'configs', f'{name}.py'))
  assert f'python -m jaxlm.train --config configs/{name}.py' in mod['__doc__']
  c = mod['get_config']()
  glue.resolve(c)  # finetune_glue: the task's TFDS sources.
  if not c.data.train:
    with pytest.raises(UsageError, match='data.train'):
      trainer.check_config(c, 8)
    c.data.train = 'text:/corpus/*.txt'
  if c.task != 'mlm':
    with pytest.raises(UsageError, match='model.init_from'):
      trainer.check_config(c, 8)
    c.model.init_from = '/models/bert'
  trainer.check_config(c, 8)


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--config.learning_rat=0.1', 'learning_rat'),
    ('--config.mesh.data=3', 'mesh.data*mesh.fsdp*mesh.tensor = 3*1*1 = 3, but there are 8 devices'),
    ('--config.global_batch_size=12', 'global_batch_size=12 is not divisible by the data-parallel size'),
    ('--config.optimizer.name=sgd', "optimizer.name='sgd'"),
    ('--config.data.seq_len=1024', 'data.seq_len=1024 exceeds model.max_position_embeddings=128'),
    ('--config.learning_rate=nan', 'learning_rate=nan: must be a finite number'),
    ('--config.data.max_predictions=127', 'data.max_predictions=127 exceeds the maskable tokens of data.seq_len=128'),
    ('--config.warmup_ratio=1.5', 'warmup_ratio=1.5: must be between 0 and 1'),
  ],
)
def test_bad_config_is_one_line_and_exit_2(flag, message, tmp_path):
  res = _run(['--config', 'configs/quickstart.py', '--workdir', str(tmp_path), flag])
  assert res.returncode == 2, res.stderr[-2000:]
  lines = [ln for ln in res.stderr.splitlines() if ln.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
  assert 'Traceback' not in res.stderr
  assert not os.path.exists(tmp_path / 'tokenizer')  # Stopped before any work: no vocabulary trained.


def test_config_file_and_workdir_problems_are_one_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory\n')
  syntax = tmp_path / 'syntax.py'
  syntax.write_text('def get_config(:\n')
  cases = [
    (['--config', str(tmp_path / 'missing.py'), '--workdir', str(tmp_path / 'w')], 'No such file or directory'),
    (['--config', str(syntax), '--workdir', str(tmp_path / 'w')], f'{syntax}:1: SyntaxError'),
    (['--config', 'configs/quickstart.py', '--workdir', str(a_file / 'run')], f'--workdir {a_file / "run"}: cannot'),
    (['--config', 'configs/quickstart.py', '--workdir', str(a_file)], f'--workdir {a_file}: cannot create it'),
  ]
  for args, message in cases:
    res = _run(args, devices=1)
    assert res.returncode == 2, (args, res.stderr[-2000:])
    assert 'Traceback' not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (args, res.stderr[-2000:])
  assert a_file.read_text() == 'not a directory\n'


def test_warmup_ratio_scales_with_the_run():
  c = config_lib.finetuning()
  for n, want in ((200, 20), (1000, 100), (7, 1)):
    c.num_train_steps = n
    assert optim.warmup_steps(c) == want
  c.warmup_steps = 30  # Steps, when given, win over the ratio.
  assert optim.warmup_steps(c) == 30
  schedule = optim.make_schedule(2e-5, optim.warmup_steps(config_lib.finetuning()), 2000)
  assert float(schedule(200)) == pytest.approx(2e-5) and float(schedule(1100)) == pytest.approx(1e-5)


def test_unknown_key_in_a_config_file(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(
    'from jaxlm.config import base\n\ndef get_config():\n  c = base()\n  c.num_train_step = 5\n  return c\n'
  )
  c = runpy.run_path(str(bad))['get_config']()
  with pytest.raises(UsageError, match="unknown config key 'num_train_step'"):
    config_lib.validate(c, 8)
  res = _run(['--config', str(bad), '--workdir', str(tmp_path / 'w')])
  assert res.returncode == 2 and "error: unknown config key 'num_train_step'" in res.stderr, res.stderr[-2000:]


def test_loss_curve_matches_across_meshes(vocab_dir, tmp_path):
  curves = {}
  for name, mesh, devices in [('1dev', (1, 1, 1), 1), ('data8', (8, 1, 1), 8), ('fsdp8', (1, 8, 1), 8),
                              ('2x2x2', (2, 2, 2), 8)]:  # fmt: skip
    workdir = str(tmp_path / name)
    flags = _small_run_flags(vocab_dir) + [f'--config.mesh.data={mesh[0]}', f'--config.mesh.fsdp={mesh[1]}',
                                           f'--config.mesh.tensor={mesh[2]}', '--workdir', workdir]  # fmt: skip
    res = _run(flags, devices=devices)
    assert res.returncode == 0, res.stderr[-3000:]
    curves[name] = [r['loss'] for r in _metrics(workdir)]
  ref = np.array(curves['1dev'])
  assert len(ref) == 6 and ref[-1] < ref[0]
  for name, curve in curves.items():
    np.testing.assert_allclose(curve, ref, rtol=2e-4, err_msg=name)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(vocab_dir, tmp_path):
  single = str(tmp_path / 'single')
  res = _run(
    _small_run_flags(vocab_dir) + ['--config.mesh.data=2', '--config.mesh.fsdp=2', '--workdir', single], devices=4
  )
  assert res.returncode == 0, res.stderr[-3000:]
  multi = str(tmp_path / 'multi')
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'jaxlm.train',
        *_small_run_flags(vocab_dir),
        '--config.mesh.data=2',
        '--config.mesh.fsdp=2',
        '--workdir',
        multi,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 process(es), 4 cpu devices' in outs[0][0]
  assert len(os.listdir(os.path.join(multi, 'tensorboard'))) == 1  # One event file: process 0 writes it.
  np.testing.assert_allclose([r['loss'] for r in _metrics(multi)], [r['loss'] for r in _metrics(single)], rtol=2e-4)


def _tiny_state(opt='adamw', lr=1e-2):
  cfg = model.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, nsp_head=True)  # fmt: skip
  graphdef, params = model.init(cfg)
  tx = optim.make_optimizer(opt, lr)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 64, (8, 16)).astype(np.int32)
  pos = np.sort(rng.choice(np.arange(1, 15), (8, 3)), -1).astype(np.int32)
  w = np.ones((8, 3), np.float32)
  w[2, 1:] = 0  # Uneven weights: the microbatches hold different numbers of predictions.
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids),
           'masked_positions': pos, 'masked_ids': np.take_along_axis(ids, pos, -1), 'masked_weights': w,
           'nsp_labels': rng.integers(0, 2, (8,)).astype(np.int32)}  # fmt: skip
  return graphdef, params, tx, batch


def test_gradient_accumulation_equals_one_big_batch():
  graphdef, params, tx, batch = _tiny_state()
  out = {}
  for k in (1, 4):
    step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss, grad_accum_steps=k))
    out[k] = step(optim.init_state(params, tx), batch, jax.random.key(0))
  for key in ('loss', 'mlm_accuracy', 'nsp_loss', 'grad_norm'):
    np.testing.assert_allclose(out[4][1][key], out[1][1][key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(out[4][0]['params']), jax.tree.leaves(out[1][0]['params'])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('opt', ['adamw', 'adafactor', 'lamb'])
def test_optimizers_learn(opt):
  # Adafactor and LAMB scale each step by the parameter's norm, so they want a larger rate.
  graphdef, params, tx, batch = _tiny_state(opt, lr=1e-2 if opt == 'adamw' else 0.1)
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss))
  state = optim.init_state(params, tx)
  curve = []
  for i in range(15):
    state, m = step(state, batch, jax.random.key(i))
    curve.append(float(m['loss']))
  assert curve[-1] < 0.7 * curve[0], curve


def test_schedule_warms_up_then_decays():
  lin = optim.make_schedule(1e-3, 10, 110, 'linear')
  cos = optim.make_schedule(1e-3, 10, 110, 'cosine')
  np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10, 60, 110)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
  np.testing.assert_allclose([float(cos(s)) for s in (5, 10, 60, 110)], [5e-4, 1e-3, 5e-4, 0], atol=1e-9)
  assert float(cos(35)) > float(lin(35))  # Cosine stays higher early in the decay.
  with pytest.raises(UsageError, match='schedule=.step.'):
    optim.make_schedule(1e-3, 10, 110, 'step')


def test_updates_follow_the_clipped_gradient():
  import optax

  params = {'w': np.zeros(4, np.float32)}
  grads = [{'w': np.array([30.0, -40.0, 0.0, 0.0], np.float32)}, {'w': np.array([0.1, 0.0, 0.0, 0.2], np.float32)}]

  def run(tx, gs):
    state, out = tx.init(params), []
    for g in gs:
      u, state = tx.update(g, state, params)
      out.append(np.asarray(u['w']))
    return out

  clipped = [jax.tree.map(lambda x: x * min(1.0, 1.0 / float(np.linalg.norm(g['w']))), g) for g in grads]
  ours = run(optim.make_optimizer('adamw', 1e-2, weight_decay=0.0, clip_norm=1.0), grads)
  plain = optax.adamw(1e-2, 0.9, 0.999, 1e-6, weight_decay=0.0)
  for a, b in zip(ours, run(plain, clipped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert not np.allclose(ours[1], run(plain, grads)[1], rtol=1e-3)  # Unclipped, the second step differs.


def test_weight_decay_skips_biases_and_layernorm():
  _, params = model.init(model.preset('tiny', vocab_size=64))
  mask = {'/'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(optim.decay_mask(params))}
  assert mask['layers/wi_kernel'] and mask['embeddings/word']
  assert not mask['layers/wi_bias'] and not mask['layers/attn_ln_scale'] and not mask['embeddings/ln_bias']
  assert not mask['mlm/bias']


def test_nan_loss_stops_the_run_clearly(vocab_dir, tmp_path):
  res = _run(_small_run_flags(vocab_dir, steps=30) + ['--workdir', str(tmp_path), '--config.learning_rate=1e9',
                                                      '--config.clip_grad_norm=0.0'], devices=1)  # fmt: skip
  assert res.returncode == 1, res.stderr[-2000:]
  assert 'the loss is nan' in res.stderr or 'the loss is inf' in res.stderr, res.stderr[-2000:]


def test_nan_skip_policy_leaves_bad_updates_out(vocab_dir, tmp_path):
  res = _run(_small_run_flags(vocab_dir, steps=12) + ['--workdir', str(tmp_path), '--config.learning_rate=1e9',
                                                      '--config.clip_grad_norm=0.0', '--config.nan_policy=skip'],
             devices=1)  # fmt: skip
  assert res.returncode == 0, res.stderr[-2000:]
  rows = _metrics(str(tmp_path))
  assert rows[-1]['step'] == 12 and rows[-1]['skipped_steps'] > 0
  assert [r['skipped_steps'] for r in rows] == sorted(r['skipped_steps'] for r in rows)  # A running count.
  import orbax.checkpoint as ocp

  state = ocp.StandardCheckpointer().restore(os.path.join(str(tmp_path), 'checkpoints', '12', 'state'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))  # Never a NaN state on disk.


def test_metrics_jsonl_is_json_and_a_short_last_interval_is_not_timed_alone(tmp_path):
  import math
  import time

  from jaxlm import report

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
