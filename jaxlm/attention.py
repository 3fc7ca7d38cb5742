"""Attention kernels: the encoder's fused self-attention and the choice among them per backend,
and the decoder's causal and grouped-query attention.

What lives here: `fused(q, k, v, valid, segments, impl)`, softmax(q k^T / sqrt(K)) v without the
[B,N,T,T] probabilities in memory, and `choose`, which names the kernel that runs. For decoders
(decoder.py): `grouped_query`, attention of N query heads over G key/value heads under any mask
(decoding against the cache), `causal_blocks`, causal attention over whole rows a block of
queries at a time with its own gradient, and `fused_causal`, cuDNN's causal kernel on a GPU or
splash's on a TPU (grouped-query, packed rows). What does not: the encoder's explicit path that
materialises the probabilities, which training with attention dropout needs (model.py, next to the
dropout).

The kernels (`model.attention_impl`; '' = auto picks the backend's own):
  'xla'     jax.nn.dot_product_attention(implementation='xla') with a boolean mask. CPU's choice,
            and where another kernel cannot run.
  'cudnn'   cuDNN flash attention on GPU, jax.nn.dot_product_attention(implementation='cudnn'),
            with right padding given as sequence lengths: a boolean mask would put cuDNN on a slow
            path or be refused (jax-ml/jax#28974). Needs bfloat16 / float16, a head size <= 128
            that divides by 8, and no segment ids (packed rows); otherwise 'xla'.
  'splash'  Pallas splash attention on TPU, with padding and packing as its segment ids, one
            multi-head kernel vmapped over the batch (on several devices under shard_map over the
            mesh in context: `_splash_spec`). Needs T to divide by 128; otherwise 'xla'.
A kernel named for another backend runs 'xla' there, so a run trained on one backend serves on
another. Every kernel agrees with the explicit path at the real tokens (tests/test_attention.py);
at padding positions their outputs differ and are never read.

Shape letters: B batch, T sequence length, N heads, K head size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from jaxlm import sharding

IMPLS = ('', 'xla', 'cudnn', 'splash', 'explicit')
# Pallas kernels run in Pallas's interpreter on any backend when this is set (tests, on CPU).
INTERPRET = False
# Splash tile sizes, largest first: T must divide by one of them.
SPLASH_BLOCKS = (512, 256, 128)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def mask(valid_BxT, segment_BxT):
  """Which keys each query sees: [B,1,1,T] the valid keys, or [B,1,T,T] those of its own segment."""
  if segment_BxT is None:
    return valid_BxT[:, None, None, :]
  return segment_BxT[:, None, :, None] == segment_BxT[:, None, None, :]


def choose(impl: str | None, backend: str, T: int, K: int, dtype, packed: bool, splits: bool = True) -> str:
  """The kernel that runs: `impl` ('' / None = the backend's own) where backend, shapes and dtype
  allow, else 'xla'. `splits`: splash can be split over the devices (_splash_spec)."""
  impl = impl or {'gpu': 'cudnn', 'tpu': 'splash'}.get(backend, 'xla')
  if impl == 'cudnn':
    head_ok = K <= 128 and K % 8 == 0
    if backend != 'gpu' or packed or jnp.dtype(dtype) not in CUDNN_DTYPES or not head_ok:
      return 'xla'
  if impl == 'splash':
    if (backend != 'tpu' and not INTERPRET) or T % SPLASH_BLOCKS[-1] or not splits:
      return 'xla'
  return impl


def fused(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, segment_BxT, impl: str | None):
  """Self-attention of the valid tokens (right padding), or within each segment, by `choose`'s kernel."""
  B, T, N, K = q_BxTxNxK.shape
  spec = _splash_spec(B, N)
  name = choose(impl, jax.default_backend(), T, K, q_BxTxNxK.dtype, segment_BxT is not None, spec is not None)
  if name == 'cudnn':
    try:
      return seq_lengths_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, 'cudnn')
    except NotImplementedError:  # This GPU or cuDNN version cannot take the shapes: XLA can.
      pass
  if name == 'splash':
    segment_BxT = valid_BxT.astype(jnp.int32) if segment_BxT is None else segment_BxT
    return _splash(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, segment_BxT, spec)
  return jax.nn.dot_product_attention(
    q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, mask=mask(valid_BxT, segment_BxT), implementation='xla'
  )


def seq_lengths_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, implementation: str):
  """jax.nn.dot_product_attention with right padding as per-row lengths: cuDNN's form of a mask."""
  # At least one key per row: an all-padding row (a filler row of an eval batch) then attends to
  # its first token, where no kernel could give NaN.
  lengths_B = jnp.maximum(valid_BxT.sum(-1, dtype=jnp.int32), 1)
  return jax.nn.dot_product_attention(
    q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
    implementation=implementation,
  )  # fmt: skip


def _splash_spec(B: int, N: int) -> P | None:
  """How splash splits [B,N,T,K] over the devices: P() on one device; over the mesh in context
  (sharding.in_mesh, or `with jax.set_mesh(mesh)` around the jitted call) batch as `batch`,
  heads as `heads`; None where it cannot run. XLA cannot partition a Pallas kernel, so on
  several devices it runs under shard_map, which needs that mesh: the trainer traces its step
  and evaluation in theirs. Elsewhere on several devices (no mesh) attention runs 'xla'."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return P() if jax.device_count() == 1 else None
  if not set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return None
  spec = sharding.logical_to_spec(('batch', 'heads', None, None), mesh=mesh)
  devices = lambda axis: math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))  # noqa: E731
  return spec if B % devices(spec[0]) == 0 and N % devices(spec[1]) == 0 else None


def _splash_blocks(T: int):
  """One tile size for every pass of the kernel: the largest of SPLASH_BLOCKS that divides T."""
  b = next(b for b in SPLASH_BLOCKS if T % b == 0)
  return splash_kernel.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                  block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)  # fmt: skip


def _splash(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, segment_BxT, spec: P):
  """Splash attention, split over the devices by `spec`: tokens attend within their segment."""
  B, T, N, K = q_BxTxNxK.shape
  # The kernel takes [N,T,K] per row and applies no scale of its own.
  q_BxNxTxK = (q_BxTxNxK * jnp.asarray(1.0 / math.sqrt(K), q_BxTxNxK.dtype)).transpose(0, 2, 1, 3)
  k_BxNxTxK, v_BxNxTxK = k_BxTxNxK.transpose(0, 2, 1, 3), v_BxTxNxK.transpose(0, 2, 1, 3)

  def run(q, k, v, seg):
    # Built per shard, for the shard's own heads (the mask is the same full mask on every head).
    heads = splash_mask.MultiHeadMask([splash_mask.FullMask((T, T))] * q.shape[1])
    kernel = splash_kernel.make_splash_mha(
      heads, block_sizes=_splash_blocks(T), head_shards=1, q_seq_shards=1, interpret=INTERPRET
    )
    return jax.vmap(kernel)(q, k, v, splash_kernel.SegmentIds(seg, seg))

  if len(spec):
    mesh = jax.sharding.get_abstract_mesh()
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec, check_vma=False)
  return run(q_BxNxTxK, k_BxNxTxK, v_BxNxTxK, segment_BxT).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- causal (decoder.py)


def grouped_query(q_BxTxNxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS):
  """softmax(q k^T / sqrt(K)) v over the keys `mask` allows, grouped-query (N = G * heads per group).
  Keys and values are head-major (the cache's layout), so neither dot transposes them."""
  B, T, N, K = q_BxTxNxK.shape
  G = k_BxGxSxK.shape[1]
  q = q_BxTxNxK.reshape(B, T, G, N // G, K)
  s = jnp.einsum('btgrk,bgsk->bgrts', q, k_BxGxSxK).astype(jnp.float32) / math.sqrt(K)
  s = jnp.where(mask_BxTxS[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_BxGxSxK.dtype)
  return jnp.einsum('bgrts,bgsk->btgrk', p, v_BxGxSxK).reshape(B, T, N, K)


@jax.custom_vjp
def _softmax_attention(q_BxTxNxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS):
  """grouped_query with its own gradient: the backward of softmax(s) v written out (dS = P * (dP - rowsum(dO * O)))
  reads the saved probabilities once, where autodiff of grouped_query made transposed copies of them and of
  their gradient."""
  return _softmax_attention_fwd(q_BxTxNxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS)[0]


def _softmax_attention_fwd(q_BxTxNxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS):
  B, T, N, K = q_BxTxNxK.shape
  G = k_BxGxSxK.shape[1]
  q = (q_BxTxNxK * (1 / math.sqrt(K))).reshape(B, T, G, N // G, K)
  s = jnp.einsum('btgrk,bgsk->bgrts', q, k_BxGxSxK).astype(jnp.float32)
  s = jnp.where(mask_BxTxS[:, None, None], s, jnp.finfo(jnp.float32).min)
  top = jax.lax.stop_gradient(s.max(-1, keepdims=True))
  p = jnp.exp(s - (jnp.log(jnp.exp(s - top).sum(-1, keepdims=True)) + top))
  o = jnp.einsum('bgrts,bgsk->btgrk', p.astype(v_BxGxSxK.dtype), v_BxGxSxK)
  return o.reshape(B, T, N, K), (q, k_BxGxSxK, v_BxGxSxK, p, o)


def _softmax_attention_bwd(res, do_BxTxNxK):
  q, k, v, p, o = res
  B, T, G, R, K = q.shape
  do = do_BxTxNxK.reshape(B, T, G, R, K)
  dp = jnp.einsum('btgrk,bgsk->bgrts', do, v).astype(jnp.float32)
  delta = jnp.einsum('btgrk,btgrk->bgrt', do.astype(jnp.float32), o.astype(jnp.float32))
  ds = p * (dp - delta[..., None])
  dq = jnp.einsum('bgrts,bgsk->btgrk', ds.astype(k.dtype), k) * (1 / math.sqrt(K))
  dk = jnp.einsum('bgrts,btgrk->bgsk', ds.astype(q.dtype), q)
  dv = jnp.einsum('bgrts,btgrk->bgsk', p.astype(do.dtype), do)
  return dq.reshape(B, T, G * R, K).astype(q.dtype), dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)

CAUSAL_BLOCK = 128  # Query rows per block of causal attention over whole rows (causal_blocks).


def causal_blocks(q_BxTxNxK, k_BxGxTxK, v_BxGxTxK, mask_BxTxT, block: int = CAUSAL_BLOCK):
  """Causal attention over whole rows, a block of queries at a time, each against the keys up to its
  own last position: the keys after it are masked for every query of the block, so skipping them
  changes nothing but the work (about half of the scores; at most 8 blocks per row, for the compile time)."""
  T = q_BxTxNxK.shape[1]
  block = max(block, -(-T // 8))
  if T <= block:
    return _softmax_attention(q_BxTxNxK, k_BxGxTxK, v_BxGxTxK, mask_BxTxT)
  out = []
  for a in range(0, T, block):
    e = min(a + block, T)
    out.append(_softmax_attention(q_BxTxNxK[:, a:e], k_BxGxTxK[:, :, :e], v_BxGxTxK[:, :, :e], mask_BxTxT[:, a:e, :e]))
  return jnp.concatenate(out, 1)


def fused_causal(q_BxTxNxK, k_BxGxTxK, v_BxGxTxK, valid_BxT, segment_BxT, impl: str | None):
  """Causal attention by a fused kernel, else None (causal_blocks runs then): cuDNN's on a GPU (16-bit, right
  padding only), splash on a TPU (right padding and packed documents, as segment ids; T divisible by 128)."""
  backend = jax.default_backend()
  impl = impl or {'gpu': 'cudnn', 'tpu': 'splash'}.get(backend, 'xla')
  B, T, _, K = q_BxTxNxK.shape
  if impl == 'splash':
    spec = _splash_spec(B, k_BxGxTxK.shape[1])
    if choose(impl, backend, T, K, q_BxTxNxK.dtype, True, spec is not None) != 'splash':
      return None
    segment_BxT = valid_BxT.astype(jnp.int32) if segment_BxT is None else segment_BxT
    return _splash_causal(q_BxTxNxK, k_BxGxTxK, v_BxGxTxK, segment_BxT, spec)
  dtype_ok = q_BxTxNxK.dtype in CUDNN_DTYPES and K % 8 == 0
  if impl != 'cudnn' or backend != 'gpu' or segment_BxT is not None or not dtype_ok:
    return None
  lengths = jnp.maximum(valid_BxT.sum(-1, dtype=jnp.int32), 1)
  k, v = k_BxGxTxK.transpose(0, 2, 1, 3), v_BxGxTxK.transpose(0, 2, 1, 3)
  try:
    return jax.nn.dot_product_attention(q_BxTxNxK, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation='cudnn')  # fmt: skip
  except NotImplementedError:
    return None


def _splash_causal(q_BxTxNxK, k_BxGxTxK, v_BxGxTxK, segment_BxT, spec: P):
  """Splash attention under a causal mask, grouped-query: each of the G key/value heads is one multi-query
  kernel call for its R = N / G query heads. Split over the devices by `spec` ([B,G,...]) as _splash."""
  B, T, N, K = q_BxTxNxK.shape
  G = k_BxGxTxK.shape[1]
  scaled = q_BxTxNxK * jnp.asarray(1.0 / math.sqrt(K), q_BxTxNxK.dtype)  # The kernel applies no scale.
  q_BxGxRxTxK = scaled.reshape(B, T, G, N // G, K).transpose(0, 2, 3, 1, 4)

  def run(q, k, v, seg):
    heads = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * q.shape[2])
    kernel = splash_kernel.make_splash_mqa(
      heads, block_sizes=_splash_blocks(T), head_shards=1, q_seq_shards=1, interpret=INTERPRET
    )
    per_row = lambda q, k, v, s: jax.vmap(kernel, (0, 0, 0, None))(q, k, v, splash_kernel.SegmentIds(s, s))  # noqa: E731
    return jax.vmap(per_row)(q, k, v, seg)

  if len(spec):
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = P(*spec, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, spec, spec, P(spec[0], None)), out_specs=q_spec,
                        check_vma=False)  # fmt: skip
  out_BxGxRxTxK = run(q_BxGxRxTxK, k_BxGxTxK, v_BxGxTxK, segment_BxT)
  return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(B, T, N, K)
