"""Orbax checkpoints of a training run: save asynchronously, resume exactly, restore onto any mesh.

  WORKDIR/checkpoints/<step>/       Orbax: `state` (params, opt_state, step) and `meta` (JSON)
  WORKDIR/checkpoints/data/<step>/  the tf.data iterator position of every process
  WORKDIR/checkpoints/best/<step>/  parameters of the step with the best eval metric so far

A step counts as saved only when Orbax has finalised it (its directory was renamed into place)
and this process's iterator state exists; anything else (a save killed half way) is skipped
with a warning, and the step before it is used. Arrays are restored straight into the
shardings of the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import os
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
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
    self.directory = os.path.join(os.path.abspath(workdir) if '://' not in workdir else workdir, 'checkpoints')
    self.data_dir = os.path.join(self.directory, 'data')
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    best_options = ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m['value'], best_mode=best_mode, keep_checkpoints_without_metrics=False,
      create=True, enable_async_checkpointing=async_save,
    )  # fmt: skip
    self.best = ocp.CheckpointManager(
      os.path.join(self.directory, 'best'), options=best_options, item_names=('state', 'meta')
    )

  # ------------------------------------------------------------------ saving

  def save(self, step: int, state, meta: dict, data_iterator=None) -> None:
    """Starts an asynchronous save of `state` at `step` (returns once arrays are copied off device)."""
    if data_iterator is not None:
      data_iterator.save(os.path.join(self.data_dir, str(step), f'process_{jax.process_index()}'))
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
    if jax.process_index() == 0 and os.path.isdir(self.data_dir):
      kept = {str(s) for s in self.manager.all_steps()}
      for name in os.listdir(self.data_dir):
        if name not in kept and int(name) < (self.manager.latest_step() or 0):
          shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

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
    each array goes on the current mesh. A checkpoint that fails to load is skipped.
    """
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      to_arrays(abstract_state),
      to_arrays(shardings),
    )
    for step in self.steps():
      data_path = os.path.join(self.data_dir, str(step), f'process_{jax.process_index()}')
      if data_iterator is not None and not os.path.exists(data_path + '.index'):
        warnings.warn(
          f'checkpoint {step}: no input position for process {jax.process_index()}; using an older one', stacklevel=2
        )
        continue
      try:
        out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
      except Exception as e:  # noqa: BLE001 (a damaged step can fail in many ways)
        _check_shapes(self.directory, step, target, e)
        warnings.warn(
          f'checkpoint {step} could not be read ({type(e).__name__}: {e}); trying an older one', stacklevel=2
        )
        continue
      if data_iterator is not None:
        data_iterator.restore(data_path)
      return from_arrays(abstract_state, out['state']), out['meta'], step
    return None


def _check_shapes(directory: str, step: int, target, error: Exception) -> None:
  """Turns a shape mismatch (another model size or vocabulary) into one error naming the parameter."""
  try:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), 'state'))
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


def is_array_tree_equal(a, b) -> bool:
  """True when two pytrees hold bitwise-equal arrays (for tests and tools)."""
  la, lb = jax.tree.leaves(to_arrays(a)), jax.tree.leaves(to_arrays(b))
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
