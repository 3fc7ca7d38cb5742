"""Orbax checkpoints on disk (jaxlm/checkpoint.py and the trainer's resume): exact resume, other meshes, sizes and
process counts, damaged steps, the workdir lock, in this process; SIGTERM / SIGINT, SIGKILL, a full disk, a second
run and two processes, each in processes of its own."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import jax
import numpy as np
import pytest
from conftest import (
  assert_same_params,
  cli,
  cli_ok,
  finish,
  logged,
  saved_arrays,
  start_cli,
  start_two_processes,
  tiny_config,
  tiny_flags,
)
from flax import nnx

import jaxlm
from jaxlm import checkpoint, export, model, optim, sharding, tokenizer, trainer
from jaxlm.data import pretrain
from jaxlm.errors import UsageError
from jaxlm.lock import WorkdirLock


def _train(vocab_dir, workdir, overrides=None):
  """`python -m jaxlm.train` of the tiny run on 1 device; its stdout."""
  return cli_ok('jaxlm.train', *tiny_flags(vocab_dir, workdir, overrides)).stdout


def _start(vocab_dir, workdir, overrides, **popen):
  return start_cli('jaxlm.train', *tiny_flags(vocab_dir, workdir, overrides), **popen)


# ----------------------------------------------------------------------------- in this process


@pytest.fixture(scope='module')
def half(vocab_dir, tmp_path_factory):
  """The first 6 steps of `straight`, saved at steps 3 and 6 (copied by the tests that resume it)."""
  workdir = tmp_path_factory.mktemp('half')
  trainer.train(tiny_config(vocab_dir, {'num_train_steps': 6}), str(workdir))
  return workdir


def test_resume_is_exact(vocab_dir, straight, half, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(half, workdir)
  capsys.readouterr()
  trainer.train(tiny_config(vocab_dir), str(workdir))
  assert 'resumed from the checkpoint of step 6' in capsys.readouterr().out
  assert logged(workdir) == logged(straight)  # Steps 1-6 from the first run, 7-12 after the restart.
  assert_same_params(saved_arrays(workdir, 12), saved_arrays(straight, 12))
  ck = checkpoint.Checkpointer(str(straight))
  assert ck.steps() == [12, 9, 6]  # Saved every 3 steps, the newest 3 kept.
  ck.close()
  trainer.train(tiny_config(vocab_dir), str(workdir))
  assert 'nothing to do: the checkpoint is at step 12' in capsys.readouterr().out


def test_resume_on_another_mesh_continues_the_curve(vocab_dir, straight, half, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(half, workdir)  # Saved on mesh data=8; resumed on data=2, fsdp=2, tensor=2.
  trainer.train(tiny_config(vocab_dir, {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}), str(workdir))
  got, want = logged(workdir), logged(straight)
  np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], rtol=2e-4)


def test_a_resume_of_another_size_is_refused_and_changes_nothing(vocab_dir, straight, tmp_path, capfd):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  before = {f: (workdir / f).read_bytes() for f in ('config.json', 'model_config.json')}
  capfd.readouterr()
  with pytest.raises(UsageError) as e:
    trainer.train(tiny_config(vocab_dir, {'model.preset': 'mini'}), str(workdir))
  assert re.match(r'.*/checkpoints/12: parameter params/\S+ has shape \(128', str(e.value)) and '\n' not in str(e.value)
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Event loop' not in err, err[-3000:]
  assert {f: (workdir / f).read_bytes() for f in before} == before
  assert not (workdir / 'checkpoints_damaged').exists() and not (workdir / '.lock').exists()


def test_init_from_a_jaxlm_run(vocab_dir, straight, tmp_path, capsys):
  config = tiny_config(vocab_dir, {'num_train_steps': 2, 'model.init_from': str(straight), 'data.tokenizer': ''})
  trainer.train(config, str(tmp_path))
  assert f'init from {straight}' in capsys.readouterr().out
  first = logged(tmp_path)[1]
  assert first < logged(straight)[1] - 0.3  # Starts where the other run ended, not from random weights.


# ----------------------------------------------------------------------------- processes: signals, a kill, a full disk


def _saved_steps(workdir):
  ckdir = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []


def _logged_lines(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return len(open(path).readlines()) if os.path.exists(path) else 0


@pytest.fixture(scope='module')
def interrupted(vocab_dir, tmp_path_factory):
  """The tiny run for 2,000 steps on 1 device, in three processes at once: one gets SIGTERM after 3 logged
  steps, one SIGINT (what Ctrl-C sends), and one that saves every step SIGKILL once it saved step 4 (so the
  kill lands in or near a save). {signal name: (workdir, exit code, stdout, stderr)}."""
  started = {}
  for sig, every, ready in (
    (signal.SIGTERM, 1000, lambda w: _logged_lines(w) >= 3),
    (signal.SIGINT, 1000, lambda w: _logged_lines(w) >= 3),
    (signal.SIGKILL, 1, lambda w: (_saved_steps(w) or [0])[-1] >= 4),
  ):  # fmt: skip
    workdir = tmp_path_factory.mktemp(sig.name)
    started[sig.name] = (workdir, sig, ready, _start(vocab_dir, workdir, {'num_train_steps': 2000,
                                                                          'checkpoint_every_steps': every}))  # fmt: skip
  waiting, deadline = dict(started), time.time() + 300
  while waiting and time.time() < deadline:
    for name, (workdir, sig, ready, proc) in list(waiting.items()):
      if ready(workdir) or proc.poll() is not None:
        proc.send_signal(sig)
        del waiting[name]
    time.sleep(0.02)
  done = {}
  for name, (workdir, _, _, proc) in started.items():
    out, err = proc.communicate(timeout=300)
    done[name] = (workdir, proc.returncode, out, err)
  return done


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT'])
def test_sigterm_saves_and_resumes(interrupted, vocab_dir, straight_cli, name):
  workdir, code, out, err = interrupted[name]
  assert code == (130 if name == 'SIGINT' else 0), err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert f'{name}: saved the checkpoint of step' in out
  saved = int(out.split(f'{name}: saved the checkpoint of step ')[1].split(';')[0])
  assert 3 <= saved < 2000 and os.path.isdir(os.path.join(workdir, 'checkpoints', str(saved)))
  if saved < 12 and name == 'SIGTERM':  # The same save either way: resumed once.
    _train(vocab_dir, workdir, {'checkpoint_every_steps': 1000})
    assert_same_params(saved_arrays(workdir, 12), saved_arrays(straight_cli, 12))


def test_sigkill_during_saves_and_a_damaged_latest_step(interrupted, vocab_dir, straight_cli):
  workdir, code, _, _ = interrupted['SIGKILL']
  assert code == -signal.SIGKILL
  done = _saved_steps(workdir)
  assert len(done) >= 2 and done[-1] < 12, done
  # Damage the newest finalised step: the one before it must be used, with a warning.
  newest = os.path.join(workdir, 'checkpoints', str(done[-1]), 'state')
  for dirpath, _, files in os.walk(newest):
    for f in files:
      if 'manifest' in f or f.endswith(('.ocdbt', 'zarray')) or 'd' == os.path.basename(dirpath):
        with open(os.path.join(dirpath, f), 'wb') as fh:
          fh.write(b'garbage')
  res = cli_ok('jaxlm.train', *tiny_flags(vocab_dir, workdir, {'checkpoint_every_steps': 1}))
  warned = [line for line in res.stderr.splitlines() if f'checkpoint {done[-1]}' in line]
  assert len(warned) == 1 and 'could not be read' in warned[0], res.stderr[-3000:]
  assert f'resumed from the checkpoint of step {done[-2]}' in res.stdout
  assert_same_params(saved_arrays(workdir, 12), saved_arrays(straight_cli, 12))
  # Moved aside, whole, where Orbax does not look: never retried.
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', str(done[-1]), 'state'))


def _last_step(workdir):
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().split('\n')[:-1]  # Complete lines only.
  return json.loads(lines[-1])['step'] if lines else 0


def test_two_processes_train_as_one_resume_exactly_and_stop_together(vocab_dir, tmp_path, capsys):
  # Dropout off: its masks are not the same for one process and for two (a known difference).
  run = {'model.hidden_dropout': 0.0, 'model.attention_dropout': 0.0, 'checkpoint_every_steps': 1000}
  two = {**run, 'mesh.data': 2, 'mesh.fsdp': 2}
  # One process (this one, 8 devices) and two processes (gloo, 2 devices each) train the same 6 steps.
  trainer.train(tiny_config(vocab_dir, {**run, 'num_train_steps': 6}), str(tmp_path / 'one'))
  workdir = tmp_path / 'two'
  outs = finish(start_two_processes(tiny_flags(vocab_dir, workdir, {**two, 'num_train_steps': 6})))
  assert '2 process(es), 4 cpu devices' in outs[0]
  assert len(os.listdir(workdir / 'tensorboard')) == 1  # One event file: process 0 writes it.
  got, want = logged(workdir), logged(tmp_path / 'one')
  assert sorted(got) == sorted(want) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-4)
  saved6 = checkpoint.checksum(saved_arrays(workdir, 6))
  # Two processes resume it, the input position of step 6 exactly; process 1 alone gets SIGTERM mid-run.
  procs = start_two_processes(tiny_flags(vocab_dir, workdir, {**two, 'num_train_steps': 2000}))
  deadline = time.time() + 120
  while time.time() < deadline and _last_step(workdir) < 9 and all(p.poll() is None for p in procs):
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  outs = finish(procs)
  for out in outs:
    assert f'resumed from the checkpoint of step 6 (checksum {saved6:08x})' in out, out[-2000:]
    assert 'was saved by' not in out
  stopped = [int(re.search(r'SIGTERM: saved the checkpoint of step (\d+)', out).group(1)) for out in outs]
  s = stopped[0]
  assert stopped == [s, s] and 9 <= s < 2000, stopped  # Both saved the same step.
  ckdir = workdir / 'checkpoints'
  assert {'process_0.index', 'process_1.index'} <= set(os.listdir(ckdir / 'data' / str(s)))
  assert json.load(open(ckdir / str(s) / 'meta' / 'metadata'))['process_count'] == 2
  saved = checkpoint.checksum(saved_arrays(workdir, s))
  # One process takes over: the arrays onto its mesh, the input stream restarted (another process count).
  capsys.readouterr()
  trainer.train(tiny_config(vocab_dir, {**run, 'num_train_steps': s + 2}), str(workdir))
  out = capsys.readouterr().out
  assert f'resumed from the checkpoint of step {s} (checksum {saved:08x})' in out
  assert f'step {s} was saved by 2 process(es) and this run has 1' in out and f'data seed {s}' in out
  assert max(logged(workdir)) == s + 2 and (ckdir / str(s + 2) / 'state').is_dir()


def _state(cfg, mesh, tx):
  graphdef, abstract = model.abstract(cfg)
  abstract_state = jax.eval_shape(lambda p: optim.init_state(p, tx), abstract)
  sh = sharding.state_shardings(abstract_state, mesh)
  return abstract_state, sh


def test_restore_onto_other_meshes_and_refuse_other_sizes(tmp_path):
  cfg = model.preset('tiny', vocab_size=512, max_position_embeddings=32)
  tx = optim.make_optimizer('adamw', 1e-3)
  abstract_state, sh8 = _state(cfg, sharding.make_mesh(8), tx)
  state = jax.jit(lambda: optim.init_state(model.init(cfg, 3)[1], tx), out_shardings=sh8)()
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, state, {'note': 'data=8'})
  ck.wait()
  for mesh in (sharding.make_mesh(1, 4, 2), sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    _, sh = _state(cfg, mesh, tx)
    restored, meta, step = ck.restore(abstract_state, sh)
    assert step == 1 and meta == {'note': 'data=8'}
    assert checkpoint.is_array_tree_equal(restored, state)
    assert restored['params']['layers']['wi_kernel'][...].sharding.mesh.shape == mesh.shape
  other = cfg.replace(vocab_size=640)
  abstract_other, sh_other = _state(other, sharding.make_mesh(8), tx)
  with pytest.raises(UsageError, match=r'embeddings.*word.* has shape \(512, 128\) in the checkpoint but \(640, 128\)'):
    ck.restore(abstract_other, sh_other)
  ck.close()


def _truncate_largest(step_dir):
  """Cuts the largest array file of a saved step in half: what a disk or copy that gave out leaves."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state')) for f in fs]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def test_a_damaged_step_is_moved_aside_and_load_falls_back(vocab_dir, tmp_path, capfd):
  cfg = model.preset('tiny', vocab_size=tokenizer.load(vocab_dir).vocab_size, max_position_embeddings=32)
  tx = optim.make_optimizer('adamw', 1e-3)
  mesh = sharding.make_mesh(8)
  abstract_state, sh = _state(cfg, mesh, tx)
  states = [jax.jit(lambda s=s: optim.init_state(model.init(cfg, s)[1], tx), out_shardings=sh)() for s in (1, 2)]
  shutil.copytree(vocab_dir, tmp_path / 'tokenizer')
  ck = checkpoint.Checkpointer(str(tmp_path))
  for step, state in zip((1, 2), states):
    ck.save(step, state, {'model': dataclasses.asdict(cfg), 'config': {}})
  ck.close()
  ckdir = tmp_path / 'checkpoints'
  _truncate_largest(ckdir / '2')
  capfd.readouterr()
  # Export and load pass over it with one warning, and leave the workdir as it is.
  assert export.main(['--checkpoint', str(tmp_path), '--out', str(tmp_path / 'export')]) == 0
  loaded = jaxlm.load(str(tmp_path))
  assert checkpoint.is_array_tree_equal(loaded.params, states[0]['params'])
  warned = [line for line in capfd.readouterr().err.splitlines() if 'checkpoints/2' in line]
  assert len(warned) == 2 and all(w.startswith('warning: ') and w.endswith('using step 1') for w in warned), warned
  assert (ckdir / '2' / 'state').is_dir() and not (tmp_path / 'checkpoints_damaged').exists()
  # Training moves it aside (one warning line), resumes from step 1, and saves step 2 again.
  ck = checkpoint.Checkpointer(str(tmp_path))
  restored, _, step = ck.restore(abstract_state, sh)
  assert step == 1 and checkpoint.is_array_tree_equal(restored, states[0])
  warned = capfd.readouterr().err.strip().splitlines()
  assert len(warned) == 1 and warned[0].startswith('warning: checkpoint 2 could not be read'), warned
  assert f'moved to {tmp_path}/checkpoints_damaged/2,' in warned[0]
  assert (tmp_path / 'checkpoints_damaged' / '2' / 'state').is_dir() and ck.steps() == [1]
  ck.save(2, states[1], {'model': dataclasses.asdict(cfg), 'config': {}})
  ck.wait()
  assert ck.steps() == [2, 1]
  ck.close()
  # Damaged again: the second copy goes next to the first.
  _truncate_largest(ckdir / '2')
  ck = checkpoint.Checkpointer(str(tmp_path))
  assert ck.restore(abstract_state, sh)[2] == 1
  ck.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints_damaged')) == ['2', '2.1']
  # A step of another optimizer is refused by name, not taken for a damaged one.
  other_tx = optim.make_optimizer('adafactor', 1e-3)
  abstract_other, sh_other = _state(cfg, mesh, other_tx)
  ck = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(UsageError, match=r'checkpoints/1: the checkpoint has no opt_state/'):
    ck.restore(abstract_other, sh_other)
  assert ck.steps() == [1]


def test_workdir_lock(tmp_path, capfd):
  lock = tmp_path / '.lock'
  holder = subprocess.Popen(['sleep', '300'])
  try:
    lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': holder.pid, 'since': 'noon'}))
    with pytest.raises(
      UsageError, match=rf'^{re.escape(str(tmp_path))} is in use by pid {holder.pid} on host .* since noon; '
    ):
      with WorkdirLock(str(tmp_path)):
        pass
    assert json.loads(lock.read_text())['pid'] == holder.pid  # Left to its holder.
  finally:
    holder.kill()
    holder.wait()
  # Its process has ended (and was reaped): the lock is taken over with a warning, and released after.
  capfd.readouterr()
  with WorkdirLock(str(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'warning: {lock}: pid {holder.pid} ') and 'taking over' in err[0]
  assert not lock.exists()
  with pytest.raises(RuntimeError):  # Released when the run fails, too.
    with WorkdirLock(str(tmp_path)):
      raise RuntimeError
  assert not lock.exists()


def test_a_full_disk_during_a_save_is_one_error_and_loses_nothing(vocab_dir, straight_cli, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(straight_cli, workdir)

  # Files stop growing at 2 MB, so the arrays of a checkpoint (7 MB) cannot be written: a real failed write.
  # SIGXFSZ ignored: a write past the limit then fails (EFBIG) instead of killing the process.
  small_disk = (
    '-c', 'import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);'
    ' resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20));'
    ' os.execv(sys.executable, [sys.executable, *sys.argv[1:]])',
  )  # fmt: skip
  res = cli('jaxlm.train', *tiny_flags(vocab_dir, workdir, {'num_train_steps': 14}), prefix=small_disk)
  assert res.returncode == 1, res.stderr[-3000:]
  assert 'Traceback' not in res.stderr and 'Event loop' not in res.stderr, res.stderr[-3000:]
  errors = [line for line in res.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, res.stderr[-3000:]
  assert 'checkpoint of step 14' in errors[0] and 'no space left' in errors[0] and 'step 12' in errors[0]
  # The steps saved before are intact; the half-written one is never taken for a step and is cleaned up.
  assert_same_params(saved_arrays(workdir, 12), saved_arrays(straight_cli, 12))
  ck = checkpoint.Checkpointer(str(workdir))
  assert ck.steps() == [12, 9, 6]
  ck.close()
  deadline = time.time() + 60  # Orbax deletes unfinished saves in the background when a manager starts.
  while time.time() < deadline and len(os.listdir(workdir / 'checkpoints')) > 5:
    time.sleep(0.1)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['12', '6', '9', 'best', 'data']


# ----------------------------------------------------------------------------- loading a run, other filesystems


def test_load_and_export_a_training_run(straight, tmp_path):
  import torch  # lazy: the other tests of this module run without PyTorch loaded
  import transformers

  text = 'Return the [MASK] of the list.'
  by_workdir = jaxlm.load(str(straight))
  by_step = jaxlm.load(os.path.join(straight, 'checkpoints', '12'))
  assert checkpoint.is_array_tree_equal(by_workdir.params, by_step.params)
  saved = saved_arrays(straight, 12)['params']
  for path, var in nnx.to_flat_state(by_workdir.params):
    node = saved
    for k in path:
      node = node[k]
    np.testing.assert_array_equal(var.get_value(), node)  # Exactly the training state's parameters.
  top = by_workdir.fill_mask(text, top_k=5)
  assert export.main(['--checkpoint', str(straight), '--out', str(tmp_path / 'j')]) == 0
  assert jaxlm.load(str(tmp_path / 'j')).fill_mask(text, top_k=5) == top
  assert export.main(['--checkpoint', str(straight), '--out', str(tmp_path / 'h'), '--format', 'hf']) == 0
  hf_model, info = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / 'h'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'h'))
  batch = tok([text], return_tensors='pt')
  with torch.no_grad():
    logits = hf_model.eval()(**batch).logits[0]
  pos = int((batch['input_ids'][0] == tok.mask_token_id).nonzero()[0])
  probs = torch.softmax(logits[pos], -1)
  assert [int(i) for i in probs.topk(5).indices] == [r['token'] for r in top]
  np.testing.assert_allclose([float(probs[r['token']]) for r in top], [r['score'] for r in top], atol=1e-5)
  assert export.main(['--checkpoint', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'x')]) == 2


@pytest.fixture
def ram_workdir(monkeypatch):
  """A workdir on TensorFlow's in-memory filesystem, through epath's tf.io.gfile backend (the one it uses
  for gs:// when TensorFlow is installed): nothing here may go through os.path, open or shutil."""
  from etils.epath import backend, gpath, register

  monkeypatch.setattr(gpath, '_URI_PREFIXES', (*gpath._URI_PREFIXES, 'ram://'))
  monkeypatch.setattr(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {'ram'})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, 'ram://', '/ram/')
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'ram', backend.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, 'ram://', gpath.PosixGPath)
  return f'ram://{uuid.uuid4().hex}/run'


def test_workdir_files_on_a_remote_filesystem(ram_workdir):
  import tensorflow as tf
  from etils import epath

  from jaxlm import config as config_lib
  from jaxlm import report, store
  from jaxlm.data import vocab

  gfile = tf.io.gfile
  assert not os.path.exists('ram:')  # A local directory named after the scheme would mean a wrong path.
  # The tokenizer a run trains is saved into the workdir, and the next start loads it from there.
  config = config_lib.base()
  config.data.train_tokenizer_vocab = 300
  tok = vocab.for_run(config, ram_workdir)
  assert gfile.exists(f'{ram_workdir}/tokenizer/tokenizer.json') and gfile.exists(f'{ram_workdir}/tokenizer/vocab.txt')
  config.data.train_tokenizer_vocab = 0  # Training again would fail: it must be read back.
  again = vocab.for_run(config, ram_workdir)
  assert again.source == f'{ram_workdir}/tokenizer/tokenizer.json' and again.encode(['a b'], 8) == tok.encode(
    ['a b'], 8
  )
  assert tokenizer.load(f'{ram_workdir}/tokenizer/tokenizer.json').vocab_size == tok.vocab_size
  # metrics.jsonl and TensorBoard events.
  reporter = report.Reporter(ram_workdir, 10, 64, 1e9, 1.0)
  reporter.start(0)
  for step in (1, 2):
    reporter.write(step, {'loss': 3.0 - step})
  reporter.close()
  with gfile.GFile(f'{ram_workdir}/metrics.jsonl') as f:
    assert [json.loads(line)['loss'] for line in f] == [2.0, 1.0]
  assert gfile.listdir(f'{ram_workdir}/tensorboard')
  # Iterator positions: written, found, restored and pruned in checkpoints/data.
  ck = checkpoint.Checkpointer.__new__(checkpoint.Checkpointer)  # Without Orbax managers (no arrays here).
  ck.directory = checkpoint.workdir_path(ram_workdir) / 'checkpoints'
  ck.data_dir = ck.directory / 'data'
  assert str(ck.data_dir) == f'{ram_workdir}/checkpoints/data'
  it = pretrain.Iterator(tf.data.Dataset.range(100).map(lambda i: {'x': i}))
  for step in (3, 5):
    next(it)
    it.save(str(ck._data_path(step)))
  assert epath.Path(f'{ck._data_path(5)}.index').exists()
  resumed = pretrain.Iterator(tf.data.Dataset.range(100).map(lambda i: {'x': i}))
  resumed.restore(str(ck._data_path(5)))
  assert next(resumed)['x'] == 2
  checkpoint.prune_data(ck.data_dir, [5])
  assert gfile.listdir(str(ck.data_dir)) in (['5'], ['5/'])
  # A workdir's newest finished step, for jaxlm.load and export.
  for d in ('checkpoints/5/state', 'checkpoints/7'):  # 7: a save that never finished.
    gfile.makedirs(f'{ram_workdir}/{d}')
  assert store.is_jaxlm_dir(ram_workdir) and not store.is_jaxlm_dir(f'{ram_workdir}/tokenizer')
  for path in (ram_workdir, f'{ram_workdir}/checkpoints/5'):
    step_dirs, workdir = store.step_dirs(path)
    assert [str(d) for d in step_dirs] == [f'{ram_workdir}/checkpoints/5'] and str(workdir) == ram_workdir
  assert not os.path.exists('ram:')
