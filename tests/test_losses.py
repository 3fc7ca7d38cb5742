"""The causal LM head fused with its cross-entropy (losses.fused_head_xent) against the same loss on
materialised logits: values and gradients, on one device and split over a data x fsdp mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import losses, sharding

V, REAL, D = 200, 190, 16  # A padded vocabulary: columns 190..199 are padding.


@pytest.fixture(scope='module')
def inputs():
  k = jax.random.split(jax.random.key(3), 4)
  h = jax.random.normal(k[0], (8, 33, D))  # 264 tokens: blocks of 64 make 5 blocks of 53, one row of padding.
  w = jax.random.normal(k[1], (V, D))
  labels = jax.random.randint(k[2], (8, 33), 0, REAL)
  weights = (jax.random.uniform(k[3], (8, 33)) > 0.3).astype(jnp.float32)  # Prompt / padding tokens weigh 0.
  return h, w, labels, weights


def _explicit(h, w, labels, weights):
  logits = losses.head_logits(h, w, REAL)
  return losses.weighted_xent(logits, labels, weights)


def _value_and_grads(xent, h, w, labels, weights, **kw):
  def f(h, w):
    nll, correct, total = xent(h, w, labels, weights, **kw)
    return nll / total, (nll, correct, total)

  (_, sums), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
  return [np.asarray(s) for s in sums], [np.asarray(g) for g in grads]


@pytest.fixture(scope='module')
def explicit(inputs):
  return _value_and_grads(_explicit, *inputs)


def test_fused_head_cross_entropy_equals_the_explicit_one(inputs, explicit, monkeypatch):
  monkeypatch.setattr(losses, 'HEAD_CHUNK', 64)
  sums, grads = _value_and_grads(lambda *a: losses.fused_head_xent(*a, vocab_size=REAL), *inputs)
  for got, want in zip(sums, explicit[0]):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(grads, explicit[1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.abs(grads[1][REAL:]).max() == 0.0  # Padding rows of the head get no gradient.
  # Without differentiation (evaluation) the same sums, from the forward-only blocks.
  forward = jax.jit(lambda *a: losses.fused_head_xent(*a, vocab_size=REAL))(*inputs)
  np.testing.assert_allclose([np.asarray(s) for s in forward], explicit[0], rtol=1e-6)


def _largest_vocab_wide(fn, *args) -> int:
  """The most rows of any [rows, V] array in fn's jaxpr, nested jaxprs included."""
  rows = [0]

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        shape = getattr(v.aval, 'shape', ())
        if len(shape) >= 2 and shape[-1] == V:
          rows.append(int(np.prod(shape[:-1])))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return max(rows)


def test_the_fused_head_never_holds_the_logits_of_all_tokens(inputs, monkeypatch):
  monkeypatch.setattr(losses, 'HEAD_CHUNK', 64)
  h, w, labels, weights = inputs

  def grads(xent):
    return jax.grad(lambda h, w: xent(h, w, labels, weights)[0], argnums=(0, 1))

  fused = _largest_vocab_wide(grads(lambda *a: losses.fused_head_xent(*a, vocab_size=REAL)), h, w)
  assert fused == 53  # One block of tokens at a time (264 tokens in 5 blocks).
  assert _largest_vocab_wide(grads(_explicit), h, w) == 8 * 33  # The check can fail: here all 264 rows exist.


@pytest.mark.parametrize('shape', [(2, 4, 1), (8, 1, 1)])
def test_fused_head_cross_entropy_split_over_devices_equals_one_device(inputs, explicit, shape, monkeypatch):
  monkeypatch.setattr(losses, 'HEAD_CHUNK', 16)  # Each device's 33 (or 66) tokens in several blocks.
  mesh = sharding.make_mesh(*shape)
  h, w, labels, weights = inputs
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  placed = [jax.device_put(x, rows) for x in (h, labels, weights)]
  w = jax.device_put(w, NamedSharding(mesh, P('fsdp')))  # The head split as fsdp splits the embeddings.
  sums, grads = _value_and_grads(
    lambda h, w, l, x: losses.fused_head_xent(h, w, l, x, vocab_size=REAL, mesh=mesh), placed[0], w, *placed[1:]
  )
  for got, want in zip(sums, explicit[0]):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(grads, explicit[1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
