"""The command line of training: `python -m jaxlm.train --config configs/NAME.py --workdir DIR`.

Override any config key with `--config.KEY=VALUE`. Run the same command on every host of a
pod slice; on GPU clusters or for CPU processes on one machine, add `--coordinator_address`,
`--num_processes` and `--process_id`. This module is only flags, process set-up and error
reporting (one `error:` line; exit 2 for bad input, 1 for a failed run, 130 after Ctrl-C); the
training itself is jaxlm/trainer.py. WORKDIR receives config.json, model_config.json,
tokenizer/, labels.json (fine-tuning), checkpoints/, metrics.jsonl and TensorBoard events.
"""

from __future__ import annotations

if __name__ == '__main__':  # Before JAX is imported: huge pages, the compilation cache (hostenv.py).
  import os

  from jaxlm import hostenv

  # TensorFlow only runs the input pipeline: its start-up banners (oneDNN, absl) would bury our lines.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  hostenv.reexec_with_hugepages()
  hostenv.compilation_cache_env()

import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from jaxlm.errors import UsageError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, TensorBoard events and the tokenizer go.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed (GPU / CPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes, for jax.distributed.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1, for jax.distributed.')


def init_distributed() -> None:
  """jax.distributed from the flags, or automatically on a multi-host TPU slice."""
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()


def main(argv) -> int:
  if len(argv) > 1:
    return _usage(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = FLAGS.config  # A file that failed to load raises on first attribute access.
    if config is not None:
      config.task  # noqa: B018
  except Exception as e:  # noqa: BLE001 (a missing file, a syntax error, a failing get_config)
    return _usage(f'--config: {_config_error(e)}')
  if config is None:
    return _usage('--config is required (e.g. --config configs/quickstart.py)')
  if not FLAGS.workdir:
    return _usage('--workdir is required')
  # lazy: a bad flag or config file above is one line in a second; the training code (Orbax, TensorFlow,
  # the models: 3 s of imports) loads only for a command that can run.
  from jaxlm import checkpoint, trainer

  checkpoint.quiet_orbax()
  try:
    make_workdir(FLAGS.workdir)
    init_distributed()
    trainer.train(config, FLAGS.workdir)
  except UsageError as e:
    return _usage(str(e))
  except (FloatingPointError, checkpoint.SaveError) as e:  # The run's environment or numbers, not the command: exit 1.
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt as e:  # 128 + SIGINT, as a shell expects of a program stopped by Ctrl-C.
    if not e.args:  # Before the first step, or a second Ctrl-C: nothing more was saved.
      print('error: interrupted (Ctrl-C); nothing saved since the last checkpoint', file=sys.stderr, flush=True)
    return 130
  return 0


def make_workdir(workdir: str) -> None:
  """Creates the workdir (local or gs://), or raises one UsageError saying why it cannot be."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except (OSError, ValueError) as e:  # FileExistsError, NotADirectoryError, PermissionError, ...
    why = getattr(e, 'strerror', None) or str(e)
    raise UsageError(f'--workdir {workdir}: cannot create it ({why})') from None
  if not path.is_dir():
    raise UsageError(f'--workdir {workdir}: exists and is not a directory')


def _config_error(e: Exception) -> str:
  """One line for a config file that cannot be loaded: the innermost cause, not the loader's wrapper."""
  while e.__cause__ is not None:
    e = e.__cause__
  if isinstance(e, SyntaxError):
    return f'{e.filename}:{e.lineno}: SyntaxError: {e.msg}'
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[-1] if lines else ""}'.rstrip(': ')


def _usage(msg: str) -> int:
  print(f'error: {msg}', file=sys.stderr, flush=True)
  return 2


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config key is one line and exit code 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    sys.exit(_usage(msg))
  except Exception as e:  # noqa: BLE001 (a config file that does not load: missing, a syntax error, ...)
    sys.exit(_usage(f'--config: {_config_error(e)}'))


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
