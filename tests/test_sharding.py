"""The mesh and logical-axis rules, on 8 CPU devices standing in for an accelerator mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm import model, optim, sharding, steps, tasks
from jaxlm.errors import UsageError

CFG = model.ModelConfig(
  vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
  max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 256, (8, 32)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, 20:] = 0
  pos = np.sort(rng.choice(np.arange(1, 31), (8, 4)), -1).astype(np.int32)
  return {
    'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids), 'masked_positions': pos,
    'masked_ids': np.take_along_axis(ids, pos, -1), 'masked_weights': np.ones(pos.shape, np.float32),
  }  # fmt: skip


def test_eight_devices_are_there():
  assert jax.device_count() == 8


def test_mesh_shape_resolves_and_checks():
  assert sharding.mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
  assert sharding.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  with pytest.raises(UsageError, match='only one of mesh.data/fsdp/tensor may be -1'):
    sharding.mesh_shape(-1, -1, 1, 8)
  with pytest.raises(UsageError, match=r'mesh.data\*mesh.fsdp\*mesh.tensor = 2\*2\*1 = 4, but there are 8 devices'):
    sharding.mesh_shape(2, 2, 1, 8)
  with pytest.raises(UsageError, match='mesh.tensor=-1: 8 devices do not divide'):
    sharding.mesh_shape(3, 1, -1, 8)


def test_rules_map_logical_names_onto_the_mesh():
  mesh = sharding.make_mesh(2, 2, 2)
  _, abstract = model.abstract(CFG)
  specs = {
    '/'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(sharding.param_specs(abstract, mesh=mesh))
  }
  assert specs['embeddings/word'] == P('tensor', 'fsdp')
  assert specs['layers/q_kernel'] == P(None, 'fsdp', 'tensor', None)
  assert specs['layers/wo_kernel'] == P(None, 'tensor', 'fsdp')
  assert specs['mlm/bias'] == P('tensor')
  # An axis of size 1 is dropped, so a pure data-parallel mesh replicates the parameters.
  dp = {k: v.get_value() for k, v in nnx.to_flat_state(sharding.param_specs(abstract, mesh=sharding.make_mesh(8)))}
  assert all(s == P(*([None] * len(s))) for s in dp.values())


def test_unshardable_parameter_names_its_path():
  mesh = sharding.make_mesh(1, 1, 8)
  _, abstract = model.abstract(CFG.replace(num_heads=2))
  with pytest.raises(
    UsageError, match=r'parameter layers/k_bias of shape \(2, 2, 32\) cannot be split 8 ways along .tensor.'
  ):
    sharding.param_shardings(abstract, mesh)


def _loss_and_grads(mesh, batch, vocab_parallel=False, hlo=None):
  graphdef, abstract = model.abstract(CFG)
  shardings = sharding.param_shardings(abstract, mesh)
  _, params = model.init(CFG, 0, out_shardings=shardings)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

  @jax.jit
  def f(params, batch):
    loss = lambda p: tasks.mlm_loss(steps.forward(graphdef, p, batch), batch, mesh=mesh if vocab_parallel else None)[0]
    return jax.value_and_grad(loss)(params)

  if hlo is not None:
    hlo.append(f.lower(params, placed).as_text())
  loss, grads = f(params, placed)
  word = params['embeddings']['word'][...]
  return float(loss), jax.tree.map(np.asarray, grads), word.sharding


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_forward_and_gradients_equal_one_device(shape, batch):
  ref_loss, ref_grads, _ = _loss_and_grads(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch)
  loss, grads, word_sharding = _loss_and_grads(sharding.make_mesh(*shape), batch)
  if shape != (8, 1, 1):
    assert not word_sharding.is_fully_replicated  # The parameters really are split.
  assert abs(loss - ref_loss) < 1e-5
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_vocab_parallel_cross_entropy_equals_the_plain_one(batch):
  mesh = sharding.make_mesh(2, 2, 2)
  ref_loss, ref_grads, _ = _loss_and_grads(mesh, batch)
  hlo = []
  loss, grads, _ = _loss_and_grads(mesh, batch, vocab_parallel=True, hlo=hlo)
  assert 'manual_computation' in hlo[0] or 'SPMDFullToShardShape' in hlo[0]  # It went through shard_map.
  assert abs(loss - ref_loss) < 1e-5
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_sharded_train_step_runs_and_learns(batch):
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, abstract = model.abstract(CFG)
  _, params = model.init(CFG, 0, out_shardings=sharding.param_shardings(abstract, mesh))
  tx = optim.make_optimizer('adamw', 1e-2, weight_decay=0.0)
  state = steps.init_state(params, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, tasks.mlm_loss), donate_argnums=0)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  losses = []
  for i in range(8):
    state, metrics = step(state, placed, jax.random.key(i))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state['step']) == 8
  assert not state['params']['layers']['wi_kernel'][...].sharding.is_fully_replicated
