"""Attention: packed rows (segment ids, restarting positions) equal separate padded rows; every
fused kernel (XLA, cuDNN's sequence-length form, splash in the Pallas interpreter) agrees with
the explicit path in its outputs and gradients; the choice of kernel per backend."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import attention, model, sharding, steps
from jaxlm.errors import UsageError

# Two documents packed into one row of 16: tokens 0-4 are the first, 5-11 the second, 12-15 padding.
LENGTHS = (5, 7)
T = 16


@pytest.fixture(scope='module')
def tiny():
  cfg = model.ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
    max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2,
  )  # fmt: skip
  _, params = model.init(cfg, seed=0)
  return cfg, params


def _packed_and_separate(seed: int = 0):
  """(packed batch of one row, separate batch of one row per document) as model inputs."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(5, 97, n).astype(np.int32) for n in LENGTHS]
  ids = np.zeros((1, T), np.int32)
  segments = np.zeros((1, T), np.int32)
  positions = np.zeros((1, T), np.int32)
  separate = np.zeros((len(docs), T), np.int32)
  mask = np.zeros((len(docs), T), np.int32)
  start = 0
  for i, doc in enumerate(docs):
    n = len(doc)
    span = slice(start, start + n)
    ids[0, span], segments[0, span], positions[0, span] = doc, i + 1, np.arange(n)
    separate[i, :n], mask[i, :n] = doc, 1
    start += n
  return ids, segments, positions, separate, mask


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('impl', ['', 'explicit'])
def test_packed_documents_equal_separate_rows(tiny, scan, impl):
  cfg, params = tiny
  graphdef, _ = model.abstract(cfg.replace(scan_layers=scan, attention_impl=impl))
  ids, segments, positions, separate, mask = _packed_and_separate()
  # Through steps.forward: a batch dict from the data pipeline carries the packing keys.
  packed = steps.forward(graphdef, params, {'input_ids': ids, 'segment_ids': segments, 'position_ids': positions})
  packed = packed['hidden']
  alone = model.apply(graphdef, params, separate, mask)['hidden']
  start = 0
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(packed[0, start : start + n], alone[i, :n], atol=1e-5)
    start += n
  # Without segment ids the documents see each other, and without positions they sit elsewhere.
  mixed = model.apply(graphdef, params, ids, (segments > 0).astype(np.int32), None, position_ids=positions)['hidden']
  assert np.abs(np.asarray(mixed[0, : LENGTHS[0]]) - np.asarray(alone[0, : LENGTHS[0]])).max() > 1e-2
  shifted = model.apply(graphdef, params, ids, None, None, segment_ids=segments)['hidden']
  assert np.abs(np.asarray(shifted[0, LENGTHS[0] : sum(LENGTHS)]) - np.asarray(alone[1, : LENGTHS[1]])).max() > 1e-2


# ----------------------------------------------------------------------------- kernels against the explicit path

B, TK, N, K = 4, 128, 2, 64  # The splash kernel's smallest tile is 128 tokens.


@pytest.fixture(scope='module')
def qkv():
  """q, k, v [B,T,N,K]; right padding (lengths 128, 100, 37, 1); packed segments (0 = padding)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (B, TK, N, K)) for i in range(3))
  valid = np.arange(TK)[None, :] < np.array([TK, 100, 37, 1])[:, None]
  segments = np.zeros((B, TK), np.int32)
  segments[0, :60], segments[0, 60:128] = 1, 2  # Two documents fill the row.
  segments[1, :10], segments[1, 10:90], segments[1, 90:97] = 1, 2, 3  # Three, then padding.
  segments[2, :37] = 1  # One document, then padding.
  segments[3, :1] = 1  # One token.
  cfg = model.ModelConfig(hidden_size=N * K, num_heads=N, attention_dropout=0.0)
  w = jax.random.normal(jax.random.key(3), (B, TK, N, K))  # Loss weights for the gradients.
  return q, k, v, jnp.asarray(valid), jnp.asarray(segments), cfg, w


def _explicit(q, k, v, valid, segments, cfg):
  return model._explicit_attention(q, k, v, attention.mask(valid, segments), cfg, None)


def _check(fn, qkv, packed: bool, grads: bool = True):
  """`fn(q, k, v, valid, segments)` against the explicit path at the real tokens: outputs, and
  the gradients of a weighted sum over them."""
  q, k, v, valid, segments, cfg, w = qkv
  segments = segments if packed else None
  real = (segments > 0 if packed else valid)[:, :, None, None]

  def loss(f):
    return lambda q, k, v: (f(q, k, v, valid, segments) * w * real).sum()

  want = _explicit(q, k, v, valid, segments, cfg)
  got = jax.jit(fn)(q, k, v, valid, segments)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5)
  if grads:
    want_g = jax.grad(loss(lambda *a: _explicit(*a, cfg)), argnums=(0, 1, 2))(q, k, v)
    got_g = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip('qkv', got_g, want_g):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('packed', [False, True])
def test_xla_kernel_matches_explicit(qkv, packed):
  assert attention.choose('', 'cpu', TK, K, jnp.float32, packed) == 'xla'
  _check(lambda q, k, v, valid, seg: attention.fused(q, k, v, valid, seg, ''), qkv, packed)


def test_sequence_length_form_matches_explicit(qkv):
  # The arguments the cuDNN path passes (padding as lengths), run by XLA: cuDNN itself needs a GPU.
  _check(lambda q, k, v, valid, seg: attention.seq_lengths_attention(q, k, v, valid, 'xla'), qkv, packed=False)


@pytest.mark.parametrize('packed', [False, True])
@pytest.mark.parametrize('devices', ['one', 'mesh'])
def test_splash_kernel_matches_explicit(qkv, packed, devices, monkeypatch):
  monkeypatch.setattr(attention, 'INTERPRET', True)  # The TPU kernel, run by the Pallas interpreter.
  assert attention.choose('splash', 'cpu', TK, K, jnp.float32, packed) == 'splash'
  if devices == 'one':  # The kernel vmapped over the batch, as on a single chip.
    mesh = contextlib.nullcontext()

    def fn(q, k, v, valid, seg):
      return attention._splash(q, k, v, valid.astype(jnp.int32) if seg is None else seg, P())

  else:  # Traced under a mesh: shard_map, batch over data x fsdp, heads over tensor.
    mesh = jax.set_mesh(sharding.make_mesh(2, 2, 2))

    def fn(q, k, v, valid, seg):
      return attention.fused(q, k, v, valid, seg, 'splash')

  q, k, v, valid, segments, *_ = qkv
  with mesh:
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, valid, segments if packed else None))
    assert 'pallas_call' in jaxpr and ('shard_map' in jaxpr) == (devices == 'mesh')
    _check(fn, qkv, packed)


def test_model_with_splash_under_the_trainers_mesh(qkv, monkeypatch):
  """A whole model on packed rows, jitted as the trainer jits its step (sharded batch, traced in
  the mesh): splash runs per shard, and hidden states and gradients equal the explicit path's."""
  monkeypatch.setattr(attention, 'INTERPRET', True)
  *_, segments, _, _ = qkv
  cfg = model.ModelConfig(
    vocab_size=97, hidden_size=N * K, num_layers=2, num_heads=N, intermediate_size=64, max_position_embeddings=TK,
    hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2, mlm_head=False, pooler=False,
  )  # fmt: skip
  _, params = model.init(cfg, seed=0)
  ids = np.random.default_rng(0).integers(5, 97, (B, TK)).astype(np.int32)
  starts = np.concatenate([np.zeros((B, 1), bool), segments[:, 1:] != segments[:, :-1]], 1)
  positions = np.asarray([np.arange(TK) - np.maximum.accumulate(np.where(s, np.arange(TK), 0)) for s in starts])
  batch = {'input_ids': ids, 'segment_ids': np.asarray(segments), 'position_ids': positions.astype(np.int32)}
  real = (np.asarray(segments) > 0)[..., None]
  mesh = sharding.make_mesh(2, 2, 2)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch}

  def run(impl):
    graphdef, _ = model.abstract(cfg.replace(attention_impl=impl))

    def loss(p, b):
      h = steps.forward(graphdef, p, b)['hidden']
      return (h * real).sum(), h

    fn = jax.jit(sharding.in_mesh(mesh, jax.value_and_grad(loss, has_aux=True)), in_shardings=(None, batch_sh))
    return fn, fn(params, batch)

  fn, ((_, hidden), grads) = run('splash')
  jaxpr = str(jax.make_jaxpr(fn)(params, batch))
  assert 'pallas_call' in jaxpr and 'shard_map' in jaxpr
  _, ((_, want_hidden), want_grads) = run('explicit')
  np.testing.assert_allclose(np.where(real, hidden, 0), np.where(real, want_hidden, 0), atol=1e-5)
  # Parameter gradients sum over all 512 tokens, the kernels in another order: float32 rounding
  # reaches ~3e-5 there (each attention output and its q/k/v gradients agree to 1e-5, above).
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a GPU')
def test_cudnn_kernel_matches_explicit(qkv):
  q, k, v, valid, _, cfg, _ = qkv
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))  # cuDNN takes bfloat16 / float16 only.
  assert attention.choose('', 'gpu', TK, K, jnp.bfloat16, False) == 'cudnn'
  fn = jax.jit(lambda q, k, v: attention.fused(q, k, v, valid, None, ''))
  assert 'cudnn' in fn.lower(q, k, v).as_text()  # The cuDNN custom call, not the XLA fallback.
  real = np.asarray(valid)[:, :, None, None]
  got, want = (
    np.where(real, np.asarray(o, np.float32), 0) for o in (fn(q, k, v), _explicit(q, k, v, valid, None, cfg))
  )
  np.testing.assert_allclose(got, want, atol=2e-2)  # bfloat16 outputs: 8 bits of mantissa.


def test_each_backend_chooses_its_kernel_and_falls_back_to_xla():
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert attention.choose('', 'cpu', 128, 64, f32, False) == 'xla'
  assert attention.choose(None, 'gpu', 128, 64, bf16, False) == 'cudnn'
  assert attention.choose('', 'tpu', 512, 64, bf16, True) == 'splash'
  assert attention.choose('explicit', 'tpu', 512, 64, bf16, True) == 'explicit'
  # cuDNN: not float32, not packed rows, head sizes up to 128 dividing by 8, on a GPU only.
  for head, dtype, packed, backend in [(64, f32, False, 'gpu'), (64, bf16, True, 'gpu'), (256, bf16, False, 'gpu'),
                                       (60, bf16, False, 'gpu'), (64, bf16, False, 'cpu'), (64, bf16, False, 'tpu')]:  # fmt: skip
    assert attention.choose('cudnn', backend, 128, head, dtype, packed) == 'xla', (head, dtype, packed, backend)
  # Splash: T a multiple of 128, on a TPU, where it can be split over the devices.
  assert attention.choose('splash', 'tpu', 384, 64, bf16, True) == 'splash'
  assert attention.choose('splash', 'tpu', 200, 64, bf16, True) == 'xla'
  assert attention.choose('splash', 'cpu', 128, 64, f32, True) == 'xla'
  assert attention.choose('splash', 'tpu', 128, 64, bf16, True, splits=False) == 'xla'
  with pytest.raises(UsageError, match="model.attention_impl='flash'"):
    model.ModelConfig(attention_impl='flash')
