"""python -m jaxlm.train (jaxlm/train.py): the quickstart command end to end, the shipped configs and their
commands, one error line and exit code 2 for a bad flag, config file or workdir, and two processes (gloo) that
train as one. The training itself, stage by stage in this process, is test_trainer.py's."""

import json
import os
import runpy

import numpy as np
import pytest
from conftest import cli_ok, finish, logged, start_cli, start_two_processes, tiny_config, tiny_flags

from jaxlm import config as config_lib
from jaxlm import tokenizer, train, trainer
from jaxlm.errors import UsageError
from jaxlm.tasks import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_end_to_end(tmp_path):
  workdir = tmp_path / 'qs'
  res = cli_ok(
    'jaxlm.train', '--config', 'configs/quickstart.py', '--workdir', workdir, '--config.num_train_steps=40',
    '--config.log_every_steps=10', '--config.eval_every_steps=40', '--config.data.train_tokenizer_vocab=3000',
    '--config.profile_start_step=5', '--config.profile_num_steps=2',
  )  # fmt: skip
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  for key in ('step', 'loss', 'mlm_accuracy', 'learning_rate', 'grad_norm', 'tokens_per_s'):
    assert key in rows[0], key
  assert rows[-1]['step'] == 40 and 'eval_loss' in rows[-1]
  assert rows[-2]['loss'] < rows[0]['loss'] - 0.5  # The MLM loss is falling.
  assert 'tok/s' in res.stdout and 'MFU' in res.stdout and 'ETA' in res.stdout
  assert os.listdir(workdir / 'tensorboard')
  assert json.load(open(workdir / 'config.json'))['num_train_steps'] == 40
  assert tokenizer.load(str(workdir / 'tokenizer')).vocab_size > 1000
  traces = [f for _, _, fs in os.walk(workdir / 'profile') for f in fs]
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


def test_flag_and_config_file_problems_are_one_line_and_exit_2(tmp_path):
  syntax = tmp_path / 'syntax.py'
  syntax.write_text('def get_config(:\n')
  unknown = tmp_path / 'unknown_key.py'
  unknown.write_text(
    'from jaxlm.config import base\n\ndef get_config():\n  c = base()\n  c.num_train_step = 5\n  return c\n'
  )
  with pytest.raises(UsageError, match="unknown config key 'num_train_step'"):
    config_lib.validate(runpy.run_path(str(unknown))['get_config'](), 8)
  quickstart = os.path.join(ROOT, 'configs', 'quickstart.py')
  cases = [  # (config, extra flag, what the one line says)
    (tmp_path / 'missing.py', (), 'No such file or directory'),
    (syntax, (), f'{syntax}:1: SyntaxError'),
    (quickstart, ('--config.learning_rat=0.1',), 'learning_rat'),  # A config key misspelt on the command line.
    (unknown, (), "error: unknown config key 'num_train_step'"),  # The library's UsageError, from a config file.
  ]
  # A process each (how the command line reports is the point), all started at once.
  procs = [
    start_cli('jaxlm.train', '--config', config, '--workdir', tmp_path / f'w{i}', *extra, devices=8)
    for i, (config, extra, _) in enumerate(cases)
  ]  # fmt: skip
  for (config, _, message), proc in zip(cases, procs):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, (config, err[-2000:])
    assert 'Traceback' not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (config, err[-2000:])
  assert os.listdir(tmp_path / 'w3') == []  # Stopped before any work: no vocabulary trained, the lock released.


def test_a_workdir_that_cannot_be_made_is_one_usage_error(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory\n')
  for workdir, message in ((a_file / 'run', f'--workdir {a_file / "run"}: cannot'),
                           (a_file, f'--workdir {a_file}: cannot create it')):  # fmt: skip
    with pytest.raises(UsageError) as e:
      train.make_workdir(str(workdir))
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)
  assert a_file.read_text() == 'not a directory\n'


def test_two_processes_match_one_process(vocab_dir, tmp_path):
  # Dropout off: its masks are not the same for one process and for two (a known difference).
  run = {'num_train_steps': 6, 'checkpoint_every_steps': 6, 'model.hidden_dropout': 0.0, 'model.attention_dropout': 0.0}
  multi = tmp_path / 'multi'
  outs = finish(start_two_processes(tiny_flags(vocab_dir, multi, {**run, 'mesh.data': 2, 'mesh.fsdp': 2})))
  assert '2 process(es), 4 cpu devices' in outs[0]
  assert len(os.listdir(multi / 'tensorboard')) == 1  # One event file: process 0 writes it.
  trainer.train(tiny_config(vocab_dir, run), str(tmp_path / 'one'))  # One process: this one, on its 8 devices.
  got, want = logged(multi), logged(tmp_path / 'one')
  assert sorted(got) == sorted(want) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-4)
