"""Orbax checkpoints of a training run: save asynchronously, resume exactly, restore onto any mesh.

  WORKDIR/checkpoints/<step>/       Orbax: `state` (params, opt_state, step) and `meta` (JSON)
  WORKDIR/checkpoints/data/<step>/  the tf.data iterator position of every process
  WORKDIR/checkpoints/best/<step>/  parameters of the step with the best eval metric so far

A step counts as saved only when Orbax has finalised it (its directory was renamed into place)
and every process can read it, its iterator state included; anything else (a save killed half
way) is skipped with a warning, and the step before it is used. Arrays are restored straight
into the shardings of the current mesh, whatever mesh wrote them. An iterator position is
restored only by the number of processes that saved it (`restored_process_count` tells the
caller whether it was). The workdir may be local or remote (gs://): paths go through epath.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxlm.errors import UsageError


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


class Checkpointer:
  """Saves and restores one run's train state, iterator positions and metadata."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, best_mode: str = 'min'):
    self.directory = workdir_path(workdir) / 'checkpoints'
    self.data_dir = self.directory / 'data'
    self.restored_process_count: int | None = None  # How many processes saved the restored step.
    self.input_restored = False  # Whether restore() put the data iterator back where it was.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    best_options = ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m['value'], best_mode=best_mode, keep_checkpoints_without_metrics=False,
      create=True, enable_async_checkpointing=async_save,
    )  # fmt: skip
    self.best = ocp.CheckpointManager(self.directory / 'best', options=best_options, item_names=('state', 'meta'))

  # ------------------------------------------------------------------ saving

  def _data_path(self, step: int) -> epath.Path:
    """Prefix of this process's iterator state for `step`."""
    return self.data_dir / str(step) / f'process_{jax.process_index()}'

  def save(self, step: int, state, meta: dict, data_iterator=None) -> None:
    """Starts an asynchronous save of `state` at `step` (returns once arrays are copied off device)."""
    if data_iterator is not None:
      data_iterator.save(str(self._data_path(step)))
    meta = {**meta, 'process_count': jax.process_count()}
    self.manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(to_arrays(state)), meta=ocp.args.JsonSave(meta))
    )

  def save_best(self, step: int, params, meta: dict, value: float) -> None:
    """Offers the parameters of `step` for checkpoints/best/, which keeps the one with the best `value`."""
    self.best.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave({'params': to_arrays(params)}), meta=ocp.args.JsonSave(meta)),
      metrics={'value': float(value)},
    )

  def wait(self) -> None:
    """Blocks until every save has been written; prunes iterator states of deleted steps."""
    self.manager.wait_until_finished()
    self.best.wait_until_finished()
    if jax.process_index() == 0:
      prune_data(self.data_dir, self.manager.all_steps())

  def close(self) -> None:
    self.wait()
    self.manager.close()
    self.best.close()

  # ------------------------------------------------------------------ restoring

  def steps(self) -> list[int]:
    """Finalised steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def restore(self, abstract_state, shardings, data_iterator=None):
    """(state, meta, step) of the newest loadable checkpoint, or None if there is none.

    `abstract_state` gives the structure and shapes (with nnx Variables), `shardings` where
    each array goes on the current mesh. A checkpoint that some process cannot load is skipped
    by all. `data_iterator` continues where it was only when as many processes saved the step
    as run now; otherwise it is left untouched (see `restored_process_count`).
    """
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      to_arrays(abstract_state),
      to_arrays(shardings),
    )
    for step in self.steps():
      problem, saved_by, out = None, None, None
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        saved_by = int(meta.pop('process_count', jax.process_count()))  # Older checkpoints: as many as now.
      except Exception as e:  # noqa: BLE001 (a damaged step can fail in many ways)
        problem = f' could not be read ({type(e).__name__}: {e}); trying an older one'
      same = saved_by == jax.process_count()
      data_path = self._data_path(step)
      unsaved = same and epath.Path(f'{data_path}.unsaved').exists()  # A source that cannot save its position.
      if (
        problem is None
        and data_iterator is not None
        and same
        and not unsaved
        and not epath.Path(f'{data_path}.index').exists()
      ):
        problem = f': no input position for process {jax.process_index()}; using an older one'
      if problem is None:
        try:
          out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
          _check_shapes(self.directory, step, target, e)
          problem = f' could not be read ({type(e).__name__}: {e}); trying an older one'
      if not _everywhere(problem is None):
        problem = problem or ': another process cannot read it; using an older one'
        warnings.warn(f'checkpoint {step}{problem}', stacklevel=2)
        continue
      self.input_restored = data_iterator is not None and same and not unsaved
      if self.input_restored:
        data_iterator.restore(str(data_path))
      self.restored_process_count = saved_by
      return from_arrays(abstract_state, out['state']), meta, step
    return None


def _everywhere(ok: bool) -> bool:
  """True on every process if `ok` is True on all of them (so all restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).min())


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


def _check_shapes(directory: str, step: int, target, error: Exception) -> None:
  """Turns a shape mismatch (another model size or vocabulary) into one error naming the parameter."""
  try:
    meta = ocp.StandardCheckpointer().metadata(epath.Path(directory) / str(step) / 'state')
    saved = meta.item_metadata if hasattr(meta, 'item_metadata') else meta
  except Exception:  # noqa: BLE001
    return
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  for path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
    got = flat_saved.get(path)
    if got is not None and hasattr(got, 'shape') and tuple(got.shape) != tuple(want.shape):
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
      raise UsageError(
        f'{directory}/{step}: parameter {name} has shape {tuple(got.shape)} in the checkpoint but'
        f' {tuple(want.shape)} in this model (another model size or vocabulary?)'
      ) from error


def read_arrays(path) -> dict:
  """The arrays Orbax saved at `path` as numpy, whatever number of processes or mesh wrote them."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata if hasattr(meta, 'item_metadata') else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


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
