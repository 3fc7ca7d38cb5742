"""The building blocks both model families share: parameters with logical axis names, int8
kernels, activations, LayerNorm, dropout, rematerialisation, vocabulary padding.

What lives here: the pieces `model.py` (the BERT encoder) and `decoder.py` (GPT-2 / Llama) build
their layers from, and the execution knobs they have in common (REMAT_POLICIES, QUANTIZATIONS,
whether a stack runs as a `lax.scan`). What does not: any layer or model (model.py, decoder.py),
the attention kernels (attention.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'silu')
REMAT_POLICIES = ('none', 'full', 'save_dots', 'save_dots_no_batch')
QUANTIZATIONS = ('none', 'int8')
# scan_layers=None scans stacks deeper than this, except on a GPU. Unrolled, each layer's saved
# activations are buffers of their own: the scan's stacked residual buffers (zero-filled, written
# and read by dynamic slices) cost the BERT-small CPU train step of tools/bench.py about 10%, and on
# an H200 the unrolled BERT-base / BERT-large bf16 steps ran 1.38x / 1.30x faster than scanned
# (README: GPU), for 1.3-2.6x the compile time. On a TPU the scan keeps compiles short.
SCAN_ABOVE = 6


def scan_by_default(num_layers: int) -> bool:
  """Whether scan_layers=None runs `num_layers` layers as a lax.scan on this backend."""
  return num_layers > SCAN_ABOVE and jax.default_backend() != 'gpu'


# The MLM logit of a padding row, as a fraction of the compute dtype's largest value.
PADDING_LOGIT = -0.7


def param(rngs: nnx.Rngs | None, shape, axes, std: float | None = None, fill: float = 0.0):
  """A float32 parameter with logical axis names; truncated-normal if `std`, else `fill`."""
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.full(shape, fill, jnp.float32)
  else:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  return nnx.Param(value, axes=tuple(axes))


def vocab_rows(value, axes, rows: int) -> np.ndarray:
  """`value` (a parameter with logical `axes`) with `rows` rows on its `vocab` axis: padding rows
  of zeros appended, or trailing rows cut. Other parameters come back as they are."""
  value = np.asarray(value)
  if 'vocab' not in (axes or ()) or len(axes) != value.ndim:
    return value
  axis = list(axes).index('vocab')
  if value.shape[axis] == rows:
    return value
  if value.shape[axis] > rows:
    return value[(slice(None),) * axis + (slice(0, rows),)]
  widths = [(0, 0)] * value.ndim
  widths[axis] = (0, rows - value.shape[axis])
  return np.pad(value, widths)


def fit_vocab(value, axes, cfg):
  """A loaded parameter refitted to `cfg.padded_vocab_size` rows on its `vocab` axis when it holds
  all `cfg.vocab_size` real rows (saved unpadded or with another vocab_multiple); anything else
  comes back as it is, for the caller's shape check to name."""
  value = np.asarray(value)
  if 'vocab' in (axes or ()) and len(axes) == value.ndim and value.shape[list(axes).index('vocab')] >= cfg.vocab_size:
    return vocab_rows(value, axes, cfg.padded_vocab_size)
  return value


def int8_param(var: nnx.Param, out_axes: tuple) -> tuple[nnx.Param, nnx.Param]:
  """(int8 kernel shaped like `var`, float32 scale over the kernel's `out_axes` positions)."""
  axes = var.get_metadata()['axes']
  scale_shape = tuple(var.shape[i] for i in out_axes)
  kernel = nnx.Param(jnp.zeros(var.shape, jnp.int8), axes=axes)
  return kernel, nnx.Param(jnp.ones(scale_shape, jnp.float32), axes=tuple(axes[i] for i in out_axes))


def weight(w, scale, dt):
  """A kernel in the compute dtype; an int8 one times its per-output-channel scale (in float32)."""
  if scale is None:
    return w.astype(dt)
  return (w.astype(jnp.float32) * bcast(scale.astype(jnp.float32), w.ndim)).astype(dt)


def activation(name: str):
  return {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
  }[name]


def bcast(v, ndim: int):
  """`v` with leading unit axes up to `ndim` (explicit broadcasting; rank promotion is off in tests)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def layer_norm(x, scale, bias, eps):
  """LayerNorm computed in float32, returned in the input dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * bcast(scale, x.ndim) + bcast(bias, x.ndim)
  return y.astype(x.dtype)


def random_u16(rng, shape) -> jax.Array:
  """Uniform uint16 values of `shape`, four per threefry2x32 evaluation.

  `jax.random.bits(rng, shape, uint16)` spends one whole evaluation (64 random bits) on each
  16-bit value. Here the counter is the row-major index over `shape` with its last axis cut to
  a quarter, built from iotas as jax's partitionable threefry builds it (so the values do not
  depend on how the array is sharded), and each evaluation's two 32-bit words give four values.
  Other key types, a last axis not divisible by 4, or 2^32 evaluations or more fall back to
  `jax.random.bits`.
  """
  *lead, last = shape
  quarter = (*lead, last // 4)
  if (
    last % 4
    or math.prod(quarter) >= 2**32
    or not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    or str(jax.random.key_impl(rng)) != 'threefry2x32'
  ):
    return jax.random.bits(rng, shape, jnp.uint16)

  index, stride = jnp.zeros(quarter, jnp.uint32), 1
  for axis in reversed(range(len(quarter))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, quarter, axis) * jnp.uint32(stride)
    stride *= quarter[axis]
  k = jax.random.key_data(rng)
  hi, lo = threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(index), index)
  halves = [hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16]
  return jnp.stack([h.astype(jnp.uint16) for h in halves], axis=-1).reshape(shape)


def dropout(x, rate: float, rng):
  """Inverted dropout. The keep decision compares 16 random bits with round((1 - rate) * 2^16)
  (the keep rate is exact to 1e-5); the random bits are a large share of a CPU step, so they
  come four to a threefry evaluation (random_u16)."""
  if rng is None or rate == 0.0:
    return x
  keep = random_u16(rng, x.shape) < jnp.uint16(round((1.0 - rate) * 65536))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def remat(body, policy: str, scanned: bool):
  """`body` (one layer) rematerialised by `policy` (REMAT_POLICIES); as it is for 'none'."""
  if policy == 'none':
    return body
  saved = {
    'full': None,
    'save_dots': jax.checkpoint_policies.checkpoint_dots,
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[policy]
  return jax.checkpoint(body, policy=saved, prevent_cse=not scanned)


def split_rng(rng, n: int):
  return [None] * n if rng is None else list(jax.random.split(rng, n))
