"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune") as an optax wrapper.

  schedule = prune.cubic_schedule(0.9, begin_step=100, end_step=1000, frequency=100)
  tx = prune.magnitude_pruning(optim.make_optimizer('adamw', 1e-4), schedule)
  ...   # the usual train step: updates, opt_state = tx.update(grads, opt_state, params)
  prune.sparsity(params)   # {'layers/q_kernel': 0.9, ..., 'total': 0.9}

The wrapper keeps a boolean mask per target parameter in its state (True = kept). Whenever the
scheduled sparsity rises, the masks are recomputed from the current weights: in each slice (a
layer of a stacked [L, ...] kernel, or a whole unstacked tensor) the round(s * n) entries of
smallest magnitude are pruned, those pruned before always among them, so masks only ever lose
entries. The update of a pruned entry is `-param`, so `optax.apply_updates` (p + u) makes it
exactly 0.0 and keeps it there. The inner optimizer sees the gradients unchanged, so what it
computes for the other parameters is bitwise what it would compute without the wrapper.
Targets are chosen by a predicate on the parameter path ('layers/wi_kernel'); the default
takes the encoder's dense kernels q/k/v/o/wi/wo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlm.errors import UsageError
from jaxlm.peft import _path_str

ENCODER_KERNELS = tuple(f'layers/{n}_kernel' for n in ('q', 'k', 'v', 'o', 'wi', 'wo'))


def encoder_kernels(path: str) -> bool:
  """The default targets: the q/k/v/o/wi/wo kernels of the stacked encoder layers."""
  return path in ENCODER_KERNELS


def cubic_schedule(
  final_sparsity: float, begin_step: int, end_step: int, frequency: int = 100, initial_sparsity: float = 0.0
) -> Callable:
  """Zhu & Gupta's sparsity schedule, as a function of the step (an int or a traced array).

  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3, with t0 = begin_step, n * dt =
  end_step - begin_step and dt = frequency, evaluated only at t = t0, t0 + dt, ... and held in
  between: 0 before begin_step, s_i at it, s_f from end_step on.
  """
  if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
    raise UsageError(f'sparsity: need 0 <= initial ({initial_sparsity}) <= final ({final_sparsity}) < 1')
  if not 0 <= begin_step < end_step or frequency < 1:
    raise UsageError(f'sparsity schedule: need 0 <= begin_step ({begin_step}) < end_step ({end_step}), frequency >= 1')
  span = end_step - begin_step

  def schedule(step):
    t = jnp.asarray(step, jnp.int32)
    t_q = begin_step + (jnp.clip(t, begin_step, end_step) - begin_step) // frequency * frequency
    frac = (t_q - begin_step).astype(jnp.float32) / span
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3
    s = jnp.where(t >= end_step, final_sparsity, s)
    return jnp.where(t < begin_step, 0.0, s).astype(jnp.float32)

  return schedule


class MagnitudePruningState(NamedTuple):
  count: jax.Array  # Updates done so far: the step the schedule is evaluated at.
  masks: Any  # Like the params: bool masks for targets, a scalar True for the rest.
  inner_state: optax.OptState


def _targets(params, mask_fn: Callable[[str], bool]):
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(mask_fn(_path_str(path))), params)


def _order_keys(x):
  """float32 -> uint32 with the same order (negative numbers included): the bits of a positive float count
  up from 2**31, those of a negative one are flipped to count down below it."""
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def _largest_below(fewer: Callable, bits: int):
  """The largest v < 2**bits with fewer(v) true, for a `fewer` that only turns false as v grows: set bit by bit from
  the top, `bits` counting passes over the data instead of a sort."""

  def body(i, v):
    cand = v | (jnp.uint32(1) << (bits - 1 - i).astype(jnp.uint32))
    return jnp.where(fewer(cand), cand, v)

  return jax.lax.fori_loop(0, bits, body, jnp.uint32(0))


def _prune_slice(w, keep, sparsity):
  """`keep` with the smallest-magnitude entries of `w` dropped, round(sparsity * n) in all: the first k in the
  order of (magnitude, index), those pruned before first. Found by selection (the k-th smallest key, then the
  ties at it by index), not by sorting: a stable argsort of a BERT-base layer takes seconds on a CPU."""
  n = w.size
  k = jnp.maximum(jnp.round(sparsity * n).astype(jnp.int32), n - keep.sum())
  key = _order_keys(jnp.where(keep, jnp.abs(w).astype(jnp.float32), -1.0).reshape(-1))  # Pruned ones first.
  kth = _largest_below(lambda v: jnp.sum(key < v) < k, 32)
  below, tie = key < kth, key == kth
  ties_pruned = k - below.sum()  # The lowest-index ones of the ties.
  index = jnp.arange(n, dtype=jnp.uint32)
  last = _largest_below(lambda v: jnp.sum(tie & (index < v)) < ties_pruned, max(1, (n - 1).bit_length()))
  pruned = (below | (tie & (index <= last))) & (k > 0)
  return ~pruned.reshape(w.shape)


def _new_mask(path: str, w, keep, sparsity, per_layer: bool):
  if per_layer and path.startswith('layers/') and w.ndim > 1:
    return jax.vmap(_prune_slice, in_axes=(0, 0, None))(w, keep, sparsity)
  return _prune_slice(w, keep, sparsity)


def magnitude_pruning(
  inner: optax.GradientTransformation,
  schedule: Callable,
  mask_fn: Callable[[str], bool] = encoder_kernels,
  per_layer: bool = True,
) -> optax.GradientTransformation:
  """`inner` with gradual magnitude pruning of the parameters `mask_fn` selects.

  `schedule(step)` gives the sparsity that the update of train step `step` (0-based, counted
  in this state) prunes to, e.g. cubic_schedule; the masks are recomputed at the steps where
  it rises above the previous step's. `per_layer` prunes each layer slice of a
  stacked `layers/...` kernel to the sparsity (else each tensor as a whole). `update` needs
  `params`.
  """

  def init(params):
    targets = _targets(params, mask_fn)
    if not any(jax.tree.leaves(targets)):
      raise UsageError('magnitude_pruning: mask_fn selects no parameter')
    masks = jax.tree.map(lambda t, p: jnp.ones(p.shape if t else (), bool), targets, params)
    return MagnitudePruningState(jnp.zeros((), jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('magnitude_pruning needs the params in update()')
    targets = _targets(params, mask_fn)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    t = state.count
    s = schedule(t)
    rises = s > jnp.where(t > 0, schedule(jnp.maximum(t - 1, 0)), 0.0)

    def recompute(masks):
      def one(path, target, p, keep):
        return _new_mask(_path_str(path), p, keep, s, per_layer) if target else keep

      return jax.tree_util.tree_map_with_path(one, targets, params, masks)

    masks = jax.lax.cond(rises, recompute, lambda m: m, state.masks)
    new_updates = jax.tree.map(
      lambda target, u, p, keep: jnp.where(keep, u, -p).astype(u.dtype) if target else u,
      targets, inner_updates, params, masks,
    )  # fmt: skip
    return new_updates, MagnitudePruningState(t + 1, masks, inner_state)

  return optax.GradientTransformation(init, update)


def sparsity(params, mask_fn: Callable[[str], bool] = encoder_kernels) -> dict[str, float]:
  """Fraction of exact zeros in each target parameter, and over all of them ('total')."""
  out, zeros, total = {}, 0, 0
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path_str(path)
    if mask_fn(name):
      z = int(jnp.sum(p == 0))
      out[name] = z / p.size
      zeros, total = zeros + z, total + p.size
  out['total'] = zeros / max(total, 1)
  return out


def sparsity_fraction(params, mask_fn: Callable[[str], bool] = encoder_kernels):
  """Fraction of exact zeros over all target parameters, as a traceable scalar (for jit)."""
  zeros, total = jnp.zeros((), jnp.float32), 0
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    if mask_fn(_path_str(path)):
      zeros, total = zeros + jnp.sum(p == 0).astype(jnp.float32), total + p.size
  return zeros / max(total, 1)
