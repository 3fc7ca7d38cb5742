"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded), `tensor` (Megatron-style tensor parallelism). Every parameter
carries logical axis names in its `axes` metadata (see blocks.param); `RULES` says which mesh
axis each logical name is split over. That table is the only sharding knob.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import UsageError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
  'batch': ('data', 'fsdp'),
  'length': None,
  'layers': None,
  'embed': 'fsdp',
  'vocab': 'tensor',
  'mlp': 'tensor',
  'heads': 'tensor',
  'kv': None,
}


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, ...]:
  """Resolves one -1 to 'the rest of the devices'; checks the product is the device count."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise UsageError(f'mesh: only one of mesh.data/fsdp/tensor may be -1, got {", ".join("mesh." + k for k in free)}')
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise UsageError(f'mesh.{k}={v}: must be a positive device count or -1')
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % known:
      raise UsageError(f'mesh.{free[0]}=-1: {n} devices do not divide by the other axes ({known})')
    sizes[free[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise UsageError(
      f'mesh: mesh.data*mesh.fsdp*mesh.tensor = {sizes["data"]}*{sizes["fsdp"]}*{sizes["tensor"]}'
      f' = {math.prod(sizes.values())}, but there are {n} devices'
    )
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh laid out over the physical topology (ICI-near devices on `tensor`)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules: dict = RULES, mesh: Mesh | None = None) -> PartitionSpec:
  """PartitionSpec for logical axis names; a mesh axis is used at most once per array."""
  spec, taken = [], set()
  for name in axes:
    target = rules.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in taken and (mesh is None or mesh.shape[t] > 1))
    taken.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State, rules: dict = RULES, mesh: Mesh | None = None):
  """The PartitionSpec of every parameter, from its `axes` metadata (same tree structure)."""

  def spec(var):
    axes = var.get_metadata().get('axes')
    return var.replace(logical_to_spec(axes, rules, mesh) if axes else PartitionSpec())

  return jax.tree.map(spec, state, is_leaf=_is_var)


def param_shardings(state: nnx.State, mesh: Mesh, rules: dict = RULES):
  """NamedShardings for a parameter state; checks each sharded dimension divides evenly."""
  specs = param_specs(state, rules, mesh)
  flat_specs = dict(nnx.to_flat_state(specs))
  for path, var in nnx.to_flat_state(state):
    spec = flat_specs[path].get_value()
    for dim, axis in zip(var.shape, spec):
      size = _axis_size(mesh, axis)
      if dim % size:
        raise UsageError(
          f'parameter {"/".join(map(str, path))} of shape {tuple(var.shape)} cannot be split'
          f' {size} ways along {axis!r} (sharding {tuple(spec)}); change the mesh or the rules'
        )
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), RULES, mesh))


def state_shardings(abstract_state, mesh: Mesh, rules: dict = RULES):
  """Shardings for a whole train state: parameters and the optimizer moments that mirror them
  follow their `axes`; anything else (counts, factored moments of other shapes) is replicated."""

  def one(x):
    if isinstance(x, nnx.Variable):
      if not hasattr(x.get_value(), 'shape'):  # An empty placeholder (optax.MaskedNode of a frozen parameter).
        return x
      axes = x.get_metadata().get('axes')
      ok = axes is not None and len(axes) == len(x.shape)
      spec = logical_to_spec(axes, rules, mesh) if ok else PartitionSpec()
      if ok and any(d % _axis_size(mesh, a) for d, a in zip(x.shape, spec)):
        spec = PartitionSpec()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_state, is_leaf=_is_var)


def in_mesh(mesh: Mesh, fn):
  """`fn`, traced with `mesh` as the abstract mesh in context (for jax.jit to wrap): a kernel that
  XLA cannot partition (splash attention, attention.py) then runs under shard_map over it."""

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def _axis_size(mesh: Mesh, axis) -> int:
  return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
