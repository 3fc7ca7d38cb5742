"""python -m jaxlm.train (jaxlm/train.py): the shipped configs and the commands they document, one error line and
exit code 2 for a bad flag, config file or workdir. The training itself is test_trainer.py's (stage by stage, in
this process); test_journey.py runs the quickstart command, test_checkpoint.py two processes."""

import json
import os
import runpy
import socket
import subprocess

import pytest
from conftest import start_cli

from jaxlm import config as config_lib
from jaxlm import tasks, train, trainer
from jaxlm.errors import UsageError
from jaxlm.tasks import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  if tasks.get(c.task).finetuning:  # Fine-tuning starts from a model.
    with pytest.raises(UsageError, match='model.init_from'):
      trainer.check_config(c, 8)
    c.model.init_from = '/models/bert'
  trainer.check_config(c, 8)


def test_flag_config_file_and_workdir_problems_are_one_line_and_exit_2(tmp_path):
  syntax = tmp_path / 'syntax.py'
  syntax.write_text('def get_config(:\n')
  unknown = tmp_path / 'unknown_key.py'
  unknown.write_text(
    'from jaxlm.config import base\n\ndef get_config():\n  c = base()\n  c.num_train_step = 5\n  return c\n'
  )
  with pytest.raises(UsageError, match="unknown config key 'num_train_step'"):
    config_lib.validate(runpy.run_path(str(unknown))['get_config'](), 8)
  with pytest.raises(UsageError, match="unknown config key 'num_train_step'"):  # What the command reports below.
    trainer.train(runpy.run_path(str(unknown))['get_config'](), str(tmp_path / 'w3'))
  assert os.listdir(tmp_path / 'w3') == []  # Stopped before any work: no vocabulary trained, the lock released.
  quickstart = os.path.join(ROOT, 'configs', 'quickstart.py')
  in_use = tmp_path / 'in_use'  # A workdir another training (a live process) holds.
  in_use.mkdir()
  holder = subprocess.Popen(['sleep', '300'])
  (in_use / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': holder.pid, 'since': 'noon'}))
  cases = [  # (config, workdir, extra flags, what the one line says)
    (tmp_path / 'missing.py', tmp_path / 'w0', (), 'No such file or directory'),
    (syntax, tmp_path / 'w1', (), f'{syntax}:1: SyntaxError'),
    (quickstart, tmp_path / 'w2', ('--config.learning_rat=0.1',), 'learning_rat'),  # A key misspelt in a flag.
    (quickstart, in_use, (), f'error: {in_use} is in use by pid {holder.pid} on host '),  # A library UsageError.
  ]
  # A process each (how the command line reports is the point), all started at once.
  try:
    procs = [
      start_cli('jaxlm.train', '--config', config, '--workdir', workdir, *extra, devices=8)
      for config, workdir, extra, _ in cases
    ]  # fmt: skip
    for (config, _, _, message), proc in zip(cases, procs):
      _, err = proc.communicate(timeout=600)
      assert proc.returncode == 2, (config, err[-2000:])
      assert 'Traceback' not in err, err[-2000:]
      lines = [ln for ln in err.splitlines() if ln.strip()]
      assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (config, err[-2000:])
  finally:
    holder.kill()
    holder.wait()
  assert os.listdir(in_use) == ['.lock']  # Nothing written, the holder's lock left alone.


def test_a_workdir_that_cannot_be_made_is_one_usage_error(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory\n')
  for workdir, message in ((a_file / 'run', f'--workdir {a_file / "run"}: cannot'),
                           (a_file, f'--workdir {a_file}: cannot create it')):  # fmt: skip
    with pytest.raises(UsageError) as e:
      train.make_workdir(str(workdir))
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)
  assert a_file.read_text() == 'not a directory\n'
