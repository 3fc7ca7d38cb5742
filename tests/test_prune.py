"""Gradual magnitude pruning: the cubic schedule, exact zeros through AdamW, untouched other parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import losses, model, optim, prune, steps
from jaxlm.errors import UsageError


def test_cubic_schedule_values():
  s = prune.cubic_schedule(0.9, begin_step=10, end_step=110, frequency=20, initial_sparsity=0.1)
  cubic = lambda t: 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3
  expected = {0: 0.0, 9: 0.0, 10: 0.1, 29: 0.1, 30: cubic(30), 49: cubic(30), 50: cubic(50), 90: cubic(90),
              109: cubic(90), 110: 0.9, 1000: 0.9}  # fmt: skip
  for t, want in expected.items():
    assert float(s(t)) == pytest.approx(want, abs=1e-6), t
  assert float(s(30)) == pytest.approx(0.4904, abs=1e-6)
  values = np.asarray(jax.jit(jax.vmap(s))(jnp.arange(200)))
  assert np.all(np.diff(values) >= 0) and len(np.unique(values)) == 7  # 0, then s_i and 5 rises to s_f.
  # A span that the frequency does not divide: the last rise is to s_f at end_step.
  s = prune.cubic_schedule(0.5, 0, 10, frequency=4)
  assert [round(float(s(t)), 4) for t in (0, 3, 4, 8, 9, 10)] == [0.0, 0.0, 0.392, 0.496, 0.496, 0.5]
  for bad in (dict(final_sparsity=1.0), dict(initial_sparsity=0.6), dict(end_step=0), dict(frequency=0)):
    with pytest.raises(UsageError):
      prune.cubic_schedule(**{'final_sparsity': 0.5, 'begin_step': 0, 'end_step': 10, **bad})


def test_a_mask_update_prunes_the_smallest_magnitudes_ties_by_index():
  """The selection in _prune_slice against a stable sort: the first k of (magnitude, index), those pruned before
  first, k = round(s * n); ties (equal magnitudes, zeros, opposite signs) broken by the lower index."""
  rng = np.random.default_rng(0)
  w = np.round(rng.normal(size=(4, 9, 7)) * 2).astype(np.float32)  # Many equal magnitudes, zeros and -0.0.
  w[0, 0, :3] = -0.0
  w[1] = rng.normal(size=(9, 7)).astype(np.float32) * 1e-30  # Subnormal and tiny values.
  keep = rng.uniform(size=w.shape) > 0.15
  update = jax.jit(jax.vmap(prune._prune_slice, in_axes=(0, 0, None)))
  for s in (0.0, 0.1, 0.5, 0.37, 0.99):
    got = np.asarray(update(w, keep, s))
    for layer in range(w.shape[0]):
      score = np.where(keep[layer], np.abs(w[layer]), -1.0).reshape(-1)
      k = max(round(s * score.size), int((~keep[layer]).sum()))
      want = np.ones(score.size, bool)
      want[np.argsort(score, kind='stable')[:k]] = False
      np.testing.assert_array_equal(got[layer].reshape(-1), want, err_msg=f'sparsity {s}, layer {layer}')
  full = np.ones(w.shape[1:], bool)
  assert np.asarray(prune._prune_slice(jnp.asarray(w[2]), full, 0.0)).all()  # Nothing to prune: all kept.


@pytest.fixture(scope='module')
def tiny():
  cfg = model.preset('tiny', vocab_size=300, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
  graphdef, params = model.init(cfg, 0)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 300, (4, 16)).astype(np.int32)
  pos = np.tile(np.arange(1, 15, 3, dtype=np.int32), (4, 1))
  batch = {'input_ids': ids, 'masked_positions': pos, 'masked_ids': np.take_along_axis(ids, pos, 1),
           'masked_weights': np.ones(pos.shape, np.float32)}  # fmt: skip

  @jax.jit
  def grads(p):
    return jax.grad(lambda p: losses.mlm_loss(steps.forward(graphdef, p, batch), batch)[0])(p)

  return graphdef, params, grads


def _flat(params):
  return {'/'.join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}


@pytest.mark.parametrize('per_layer', [True, False])
def test_pruning_through_adamw_is_exact_and_leaves_the_rest_alone(tiny, per_layer):
  graphdef, params, grads = tiny
  schedule = prune.cubic_schedule(0.75, begin_step=1, end_step=7, frequency=2)
  inner = optim.make_optimizer('adamw', 1e-3)  # Clip by global norm, then AdamW with masked decay.
  tx, plain = prune.magnitude_pruning(inner, schedule, per_layer=per_layer), inner

  @jax.jit
  def update(tx_state, plain_state, p, q):
    g = grads(p)  # The same gradients for both optimizers.
    u, tx_state = tx.update(g, tx_state, p)
    v, plain_state = plain.update(g, plain_state, q)
    return tx_state, plain_state, optax.apply_updates(p, u), optax.apply_updates(q, v)

  tx_state, plain_state, p, q = tx.init(params), plain.init(params), params, params
  pruned_before = {}
  for t in range(10):
    tx_state, plain_state, p, q = update(tx_state, plain_state, p, q)
    fp, fq, masks = _flat(p), _flat(q), _flat(tx_state.masks)
    s = float(schedule(t))
    for name, w in fp.items():
      if not prune.encoder_kernels(name):
        # What plain AdamW computes: bitwise with XLA's default CPU back end; the suite's (conftest) may fuse the
        # two optimizers' element-wise ops differently, a few ulp apart after 10 steps.
        np.testing.assert_array_max_ulp(w, fq[name], maxulp=8)
        continue
      pruned = ~masks[name]
      assert np.all(w[pruned] == 0.0)  # Exactly zero, through AdamW's update and weight decay.
      assert (w == 0).sum() == pruned.sum()
      slices = pruned.reshape(pruned.shape[0], -1) if per_layer else pruned.reshape(1, -1)
      assert np.all(slices.sum(1) == round(s * slices.shape[1])), (t, name, s)  # Per layer slice, or whole.
      if name in pruned_before:
        assert np.all(pruned[pruned_before[name]]), (t, name)  # Once pruned, always pruned.
      pruned_before[name] = pruned
  report = prune.sparsity(p)
  assert set(report) == set(prune.ENCODER_KERNELS) | {'total'}
  assert report['total'] == pytest.approx(0.75, abs=1e-3) and prune.sparsity(q)['total'] == 0.0


def test_pruning_inside_the_jitted_train_step(tiny):
  graphdef, params, _ = tiny
  only_wi = lambda path: path == 'layers/wi_kernel'
  tx = prune.magnitude_pruning(optax.adamw(1e-3), prune.cubic_schedule(0.5, 0, 4, 2), mask_fn=only_wi)
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss), donate_argnums=0)
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 300, (2, 16)).astype(np.int32)
  batch = {'input_ids': ids, 'masked_positions': np.array([[1, 5], [2, 9]], np.int32),
           'masked_ids': ids[:, :2], 'masked_weights': np.ones((2, 2), np.float32)}  # fmt: skip
  state = optim.init_state(jax.tree.map(jnp.copy, params), tx)
  for i in range(6):
    state, metrics = step(state, batch, jax.random.key(i))
  report = prune.sparsity(state['params'], only_wi)
  assert report == {'layers/wi_kernel': 0.5, 'total': 0.5} and np.isfinite(float(metrics['loss']))
  with pytest.raises(UsageError, match='selects no parameter'):
    prune.magnitude_pruning(optax.sgd(0.1), prune.cubic_schedule(0.5, 0, 4), mask_fn=lambda p: False).init(params)
