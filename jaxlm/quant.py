"""Weight-only int8 post-training quantization of the dense kernels of encoders and decoders.

`quantize(graphdef, params)` turns a float model into one with `quantization='int8'`: its int8
kernels become int8 with a float32 scale per output channel (symmetric: w ~= q * scale, q in
[-127, 127], scale = max |w| over the channel's inputs / 127).

  encoder   the q/k/v/o/wi/wo kernels of every layer, the pooler and the MLM transform;
            embeddings, LayerNorm, biases and the small classifier / next-sentence heads stay float32
  decoder   the q/k/v/o/wi/wo (and a Llama's wg) kernels of every layer; embeddings, norms, biases
            and the LM head (tied or untied) stay float32

The model dequantizes each kernel inside the jitted forward (blocks.weight), so the weights stay
int8 in memory and on disk; `python -m jaxlm.export --quantize int8` writes such an export and
`jaxlm.load` runs it (a Predictor, or a Generator for a decoder). Which parameters are int8 is
read from the model itself (each int8 kernel has a `<kernel>_scale` beside it), so the functions
here serve both families.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import models
from jaxlm.errors import UsageError

SCALE_SUFFIX = '_scale'


def _config(graphdef, params) -> models.Config:
  return nnx.merge(graphdef, params).cfg


def quantize_kernel(w: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(int8 kernel, float32 scale without `reduce_axes`): symmetric, per output channel."""
  w = np.asarray(w, np.float32)
  amax = np.abs(w).max(axis=reduce_axes, keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return q, np.squeeze(scale, axis=reduce_axes)


def _kernels(params) -> dict[tuple, tuple]:
  """Quantized kernel path -> (scale path, the kernel's input axis positions), from the axes metadata."""
  flat = dict(nnx.to_flat_state(params))
  out = {}
  for path, var in flat.items():
    name = str(path[-1])
    if not name.endswith('kernel' + SCALE_SUFFIX):
      continue
    kernel_path = (*path[:-1], name[: -len(SCALE_SUFFIX)])
    kernel_axes = flat[kernel_path].get_metadata()['axes']
    scale_axes = var.get_metadata()['axes']
    out[kernel_path] = (path, tuple(i for i, a in enumerate(kernel_axes) if a not in scale_axes))
  return out


def quantize(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
  """The int8 model of a float one: (graphdef, params) of `cfg.replace(quantization='int8')`."""
  cfg = _config(graphdef, params)
  if cfg.quantization == 'int8':
    return graphdef, params
  qgraphdef, qparams = models.abstract(cfg.replace(quantization='int8'))
  src = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
  flat = dict(nnx.to_flat_state(qparams))
  kernels = _kernels(qparams)
  scales = {scale_path for scale_path, _ in kernels.values()}
  for path, var in flat.items():
    if path in kernels:
      scale_path, reduce_axes = kernels[path]
      q, scale = quantize_kernel(np.asarray(src[path]), reduce_axes)
      var.set_value(jnp.asarray(q))
      flat[scale_path].set_value(jnp.asarray(scale))
    elif path not in scales:
      var.set_value(jnp.asarray(src[path], jnp.float32))
  return qgraphdef, qparams


def dequantize(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
  """The float model of an int8 one (kernels = q * scale), e.g. to write a Hugging Face directory."""
  cfg = _config(graphdef, params)
  if cfg.quantization == 'none':
    return graphdef, params
  src = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
  kernels = _kernels(params)
  fgraphdef, fparams = models.abstract(cfg.replace(quantization='none'))
  for path, var in nnx.to_flat_state(fparams):
    value = np.asarray(src[path], np.float32)
    if path in kernels:
      scale_path, reduce_axes = kernels[path]
      value = value * np.expand_dims(np.asarray(src[scale_path], np.float32), reduce_axes)
    var.set_value(jnp.asarray(value))
  return fgraphdef, fparams


def summary(params: nnx.State) -> dict:
  """Bytes of the int8 kernels with their scales, and of the float32 parameters they replace."""
  flat = dict(nnx.to_flat_state(params))
  kernels = _kernels(params)
  if not kernels:
    raise UsageError('these parameters hold no int8 kernel')
  q_bytes = sum(flat[k].get_value().nbytes + flat[s].get_value().nbytes for k, (s, _) in kernels.items())
  f_bytes = sum(4 * flat[k].get_value().size for k in kernels)
  total = sum(v.get_value().nbytes for v in flat.values())
  return {
    'int8_kernels': ['/'.join(map(str, k)) for k in kernels],
    'int8_bytes': int(q_bytes),
    'float32_bytes': int(f_bytes),
    'total_bytes': int(total),
  }
