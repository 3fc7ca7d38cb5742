"""Orbax checkpoints of a training run: save asynchronously, resume exactly, restore onto any mesh.

  WORKDIR/checkpoints/<step>/       Orbax: `state` (params, opt_state, step) and `meta` (JSON)
  WORKDIR/checkpoints/data/<step>/  the tf.data iterator position of every process
  WORKDIR/checkpoints/best/<step>/  parameters of the step with the best eval metric so far
  WORKDIR/checkpoints_damaged/      steps that could not be restored, moved out of Orbax's sight

A step counts as saved only when Orbax has finalised it (its directory was renamed into place)
and every process can read it, its iterator state included; a save killed half way is never
seen, and a finalised step that cannot be read is moved to checkpoints_damaged/ (kept, never
retried) with a warning, and the step before it is used. A step of another model or optimizer
is refused with one error naming the parameter, before any array is read. Arrays are restored
straight into the shardings of the current mesh, whatever mesh wrote them. An iterator position is
restored only by the number of processes that saved it (`restored_process_count` tells the
caller whether it was). A save that fails (a full disk) raises `SaveError`; the steps saved
before it stay intact. The workdir may be local or remote (gs://): paths go through epath.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm.errors import UsageError


class SaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a quota, a lost connection); one line saying which."""


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def to_arrays(tree):
  """The tree with every nnx Variable replaced by its value (what Orbax stores)."""
  return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def from_arrays(template, arrays):
  """Puts restored values back into the Variables of `template` (same structure)."""
  flat_t, treedef = jax.tree.flatten(template, is_leaf=_is_var)
  flat_a = treedef.flatten_up_to(arrays)
  return treedef.unflatten([t.replace(a) if _is_var(t) else a for t, a in zip(flat_t, flat_a)])


_whole_arrays = False  # Whether this process registered the array handler below.


def _whole_arrays_on_one_host() -> None:
  """With one process, each replicated array is written whole, from its first replica.

  Orbax's default on CPU and TPU splits a replicated array across its replicas ("replica-parallel"), so that
  the hosts of a pod slice share the writing. Within one process that shares nothing and costs a slicing
  program per array shape and device: 88 small compilations on the first save of the tiny run on 8 CPU devices.
  """
  global _whole_arrays
  if _whole_arrays or jax.process_count() > 1:
    return
  absl_log = logging.getLogger('absl')
  note = lambda record: 'overriding' not in record.getMessage()  # noqa: E731 (Orbax's note on replacing its default)
  absl_log.addFilter(note)
  try:
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _whole_arrays = True
  finally:
    absl_log.removeFilter(note)


class Checkpointer:
  """Saves and restores one run's train state, iterator positions and metadata."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, best_mode: str = 'min'):
    self.directory = workdir_path(workdir) / 'checkpoints'
    self.data_dir = self.directory / 'data'
    self.damaged_dir = self.directory.parent / 'checkpoints_damaged'
    self.restored_process_count: int | None = None  # How many processes saved the restored step.
    self.input_restored = False  # Whether restore() put the data iterator back where it was.
    self._saving = {}  # Manager name -> the step its unfinished save writes, for error messages.
    self._failed = False
    _drop_closed_loop_noise()
    _whole_arrays_on_one_host()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    best_options = ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m['value'], best_mode=best_mode, keep_checkpoints_without_metrics=False,
      create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
    )  # fmt: skip
    self.best = ocp.CheckpointManager(self.directory / 'best', options=best_options, item_names=('state', 'meta'))

  # ------------------------------------------------------------------ saving

  def _data_path(self, step: int) -> epath.Path:
    """Prefix of this process's iterator state for `step`."""
    return self.data_dir / str(step) / f'process_{jax.process_index()}'

  def save(self, step: int, state, meta: dict, data_iterator=None) -> None:
    """Starts an asynchronous save of `state` at `step` (returns once arrays are copied off device)."""
    self._finish('manager')  # A failure of the previous save is reported as that step's.
    meta = {**meta, 'process_count': jax.process_count()}
    self._saving['manager'] = step
    with self._reporting('manager'):
      if data_iterator is not None:
        data_iterator.save(str(self._data_path(step)))
      self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(to_arrays(state)), meta=ocp.args.JsonSave(meta))
      )

  def save_best(self, step: int, params, meta: dict, value: float) -> None:
    """Offers the parameters of `step` for checkpoints/best/, which keeps the one with the best `value`."""
    self._finish('best')
    self._saving['best'] = step
    with self._reporting('best'):
      self.best.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave({'params': to_arrays(params)}), meta=ocp.args.JsonSave(meta)
        ),
        metrics={'value': float(value)},
      )

  def wait(self) -> None:
    """Blocks until every save has been written; prunes iterator states of deleted steps."""
    self._finish('manager')
    self._finish('best')
    if jax.process_index() == 0:
      prune_data(self.data_dir, self.manager.all_steps())

  def close(self) -> None:
    """Waits for the saves in flight (unless one failed already) and stops Orbax's threads."""
    try:
      if not self._failed:
        self.wait()
    finally:
      for manager in (self.manager, self.best):
        try:
          manager.close()
        except Exception:  # noqa: BLE001 (after a failed save: the error that matters was raised already)
          if not self._failed:
            raise

  def _finish(self, name: str) -> None:
    with self._reporting(name):
      getattr(self, name).wait_until_finished()
    self._saving.pop(name, None)

  @contextlib.contextmanager
  def _reporting(self, name: str):
    """Turns any failure of a save into one SaveError naming the step, the reason and what is intact."""
    try:
      yield
    except SaveError:
      raise
    except Exception as e:
      self._failed = True
      where = self.directory / 'best' if name == 'best' else self.directory
      step, kept = self._saving.get(name), self.manager.latest_step()
      intact = f'; step {kept}, saved before, is intact' if name == 'manager' and kept not in (None, step) else ''
      raise SaveError(f'could not save the checkpoint of step {step} in {where}: {one_line(e)}{intact}') from e

  # ------------------------------------------------------------------ restoring

  def steps(self) -> list[int]:
    """Finalised steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def restore(self, abstract_state, shardings, data_iterator=None):
    """(state, meta, step) of the newest loadable checkpoint, or None if there is none.

    `abstract_state` gives the structure and shapes (with nnx Variables), `shardings` where
    each array goes on the current mesh. A checkpoint that some process cannot load is moved to
    checkpoints_damaged/ by process 0 and skipped by all. One of another model (a parameter
    missing or of another shape) is a UsageError, raised with the managers closed.
    `data_iterator` continues where it was only when as many processes saved the step as run
    now; otherwise it is left untouched (see `restored_process_count`).
    """
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      to_arrays(abstract_state),
      to_arrays(shardings),
    )
    moved = False
    try:
      for step in self.steps():
        problem, meta, out = self._read(step, target, data_iterator)
        if not _everywhere(problem is None):
          self._move_aside(step, problem or 'another process cannot read it')
          moved = True
          continue
        saved_by = meta.pop('process_count')
        self.input_restored = data_iterator is not None and saved_by == jax.process_count() and not self._unsaved(step)
        if self.input_restored:
          data_iterator.restore(str(self._data_path(step)))
        self.restored_process_count = saved_by
        return from_arrays(abstract_state, out['state']), meta, step
      return None
    except UsageError:
      self._failed = True  # Nothing to wait for: close quietly, so that the one error line is all that shows.
      self.close()
      raise
    finally:
      if moved and not self._failed:  # Orbax caches its list of steps: it must forget the moved ones, everywhere.
        _barrier('jaxlm_checkpoint_moved_aside')
        self.manager.reload()

  def _unsaved(self, step: int) -> bool:
    """True when this process's input could not save its position at `step` (a source without state)."""
    return epath.Path(f'{self._data_path(step)}.unsaved').exists()

  def _read(self, step: int, target, data_iterator):
    """(problem or None, meta, restored) for one step; a step of another model raises UsageError."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      meta['process_count'] = int(meta.get('process_count', jax.process_count()))  # Older ones: as many as now.
    except Exception as e:  # noqa: BLE001 (a damaged step can fail in many ways)
      return f'could not be read ({one_line(e)})', None, None
    same = meta['process_count'] == jax.process_count()
    position = epath.Path(f'{self._data_path(step)}.index')
    if data_iterator is not None and same and not self._unsaved(step) and not position.exists():
      return f'has no input position for process {jax.process_index()}', None, None
    _check_compatible(self.directory / str(step), target)  # Before reading: a refused restore leaves noise.
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001
      return f'could not be read ({one_line(e)})', None, None
    return None, meta, out

  def _move_aside(self, step: int, problem: str) -> None:
    """Moves a step that cannot be restored to checkpoints_damaged/ (process 0), with one warning line."""
    dest = self.damaged_dir / str(step)
    if jax.process_index() == 0:
      n = 1
      while dest.exists():  # A step damaged twice keeps both copies.
        dest, n = self.damaged_dir / f'{step}.{n}', n + 1
      try:
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(dest)
      except Exception as e:  # noqa: BLE001 (it stays where it is; Orbax then skips saves of this step)
        dest = f'nowhere (moving it failed: {one_line(e)})'
    print(f'warning: checkpoint {step} {problem}; moved to {dest}, using an older one', file=sys.stderr, flush=True)


def _everywhere(ok: bool) -> bool:
  """True on every process if `ok` is True on all of them (so all restore the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).min())


def _barrier(name: str) -> None:
  """Waits until every process got here (after process 0 changed the directory)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_WORDS = ('no space left', 'disk quota', 'file too large', 'quota exceeded')


def one_line(error: BaseException) -> str:
  """What went wrong, in one short line: 'no space left on the device' for a full disk, else the first line
  of the root cause (Orbax wraps tensorstore's precise message in a vague one)."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for e in chain:
    if getattr(e, 'errno', None) in _DISK_FULL or any(w in str(e).lower() for w in _DISK_FULL_WORDS):
      return 'no space left on the device (or a quota or file-size limit was reached)'
  root = error
  while root.__cause__ is not None and root.__cause__ in chain:
    root = root.__cause__
  first = (str(root).strip().splitlines() or [''])[0]
  return f'{type(root).__name__}: {first[:240]}{"..." if len(first) > 240 else ""}'


def workdir_path(workdir) -> epath.Path:
  """The workdir as an epath.Path: absolute when local, as given when remote (gs://...)."""
  p = epath.Path(workdir)
  return p if '://' in str(workdir) else p.resolve()


def prune_data(data_dir, kept_steps) -> None:
  """Deletes the iterator states of steps older than the newest kept one that are no longer kept."""
  data_dir, kept = epath.Path(data_dir), {str(s) for s in kept_steps}
  if not kept or not data_dir.is_dir():
    return
  newest = max(int(s) for s in kept)
  for d in data_dir.iterdir():
    if d.name.isdigit() and d.name not in kept and int(d.name) < newest:
      d.rmtree(missing_ok=True)


def _tree_metadata(path):
  """The tree of array metadata Orbax saved at `path` (read by the handler: no step-metadata warning)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(path))
  finally:
    handler.close()
  return meta.tree if hasattr(meta, 'tree') else meta


def _flat(tree) -> dict:
  """{'params/embeddings/word': leaf, ...}: paths the same for a train state and its saved metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in flat}


def _check_compatible(step_dir, target) -> None:
  """Refuses a step of another model or optimizer with one error naming the first parameter that differs.

  Only the saved metadata is read; when it cannot be, restoring will tell whether the step is damaged.
  """
  try:
    saved = _flat(_tree_metadata(epath.Path(step_dir) / 'state'))
  except Exception:  # noqa: BLE001
    return
  want = _flat(target)
  for name in sorted(want, key=lambda n: not n.startswith('params/')):  # A parameter says most.
    leaf = want[name]
    got = saved.get(name)
    if got is None:
      raise UsageError(f'{step_dir}: the checkpoint has no {name} (another model, optimizer or fine-tuning mode?)')
    if hasattr(got, 'shape') and tuple(got.shape) != tuple(leaf.shape):
      vocab_rows = name.endswith(('embeddings/word', 'mlm/bias')) and got.shape[1:] == leaf.shape[1:]
      hint = 'another vocabulary or model.vocab_multiple?' if vocab_rows else 'another model size or vocabulary?'
      raise UsageError(
        f'{step_dir}: parameter {name} has shape {tuple(got.shape)} in the checkpoint but'
        f' {tuple(leaf.shape)} in this model ({hint})'
      )
  extra = [name for name in saved if name not in want]
  if extra:
    raise UsageError(
      f'{step_dir}: the checkpoint has {extra[0]}, which this run does not (another model or optimizer?)'
    )


def read_arrays(path) -> dict:
  """The arrays Orbax saved at `path` as numpy, whatever number of processes or mesh wrote them."""
  path = epath.Path(path)
  _drop_closed_loop_noise()  # A damaged file fails one read of many.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _tree_metadata(path))
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    handler.close()


def _closed_loop_noise(info) -> bool:
  return isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed'


def _drop_closed_loop_noise() -> None:
  """Filters (once per process) the 'Event loop is closed' tracebacks tensorstore prints after Orbax gave up.

  When one array of a checkpoint cannot be read or written, Orbax closes its event loop while
  tensorstore still works on the others, and each of their callbacks then fails as unraisable:
  dozens of tracebacks after the one error that matters, which the caller gets as an exception.
  """
  if getattr(sys.unraisablehook, 'drops_closed_loop_noise', False):
    return
  previous = sys.unraisablehook

  def hook(info):
    if not _closed_loop_noise(info):
      previous(info)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


def quiet_orbax() -> None:
  """For command-line programs: Orbax's failures show as our one error line, not as pages of tracebacks.

  Orbax logs each failing thread of an asynchronous save with its traceback, and the error then
  reaches the caller as a SaveError; those records are shortened to their first line.
  """
  _drop_closed_loop_noise()

  def shorten(record: logging.LogRecord) -> bool:
    if f'{os.sep}orbax{os.sep}' in record.pathname and record.levelno >= logging.ERROR:
      record.msg, record.args = (record.getMessage().splitlines() or [''])[0][:300], None
      record.exc_info, record.exc_text = None, None
    return True

  logging.getLogger('absl').addFilter(shorten)
  # The same failure once more, from the event loop of the save's threads when it is collected.
  logging.getLogger('asyncio').addFilter(lambda r: 'exception was never retrieved' not in r.getMessage())


def is_array_tree_equal(a, b) -> bool:
  """True when two pytrees hold bitwise-equal arrays (for tests and tools)."""
  la, lb = jax.tree.leaves(to_arrays(a)), jax.tree.leaves(to_arrays(b))
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def checksum(tree) -> int:
  """A 32-bit checksum of the bits of every array in `tree`, the same on any mesh or device.

  Sums of integers modulo 2**32 do not depend on the order of the reduction, so a checkpoint
  restored onto another mesh or number of processes has the checksum of the arrays it saved.
  Every element is weighted by its position (and every array by its place in the tree), so
  values that moved change it too.
  """
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(to_arrays(tree))]
  u32 = jnp.uint32

  def one(k, x):
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: u32}[x.dtype.itemsize]).astype(u32)
    where = u32(0)
    for d in range(x.ndim):
      where = where * u32(x.shape[d]) + jax.lax.broadcasted_iota(u32, x.shape, d)
    return jnp.sum(bits * (2 * where + 1), dtype=u32) * u32(2 * k + 1)

  shardings = [x.sharding for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)]
  out = jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec()) if shardings else None
  total = jax.jit(lambda xs: sum((one(k, x) for k, x in enumerate(xs)), u32(0)), out_shardings=out)(leaves)
  return int(np.asarray(total))
