"""The mesh and logical-axis rules, on 8 CPU devices standing in for an accelerator mesh."""

import json
import os
import runpy

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm import losses, model, optim, sharding, steps
from jaxlm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _loss_and_grads(mesh, batch, vocab_parallel=False, hlo=None, cfg=CFG):
  graphdef, abstract = model.abstract(cfg)
  shardings = sharding.param_shardings(abstract, mesh)
  _, params = model.init(cfg, 0, out_shardings=shardings)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

  @jax.jit
  def f(params, batch):
    loss = lambda p: losses.mlm_loss(steps.forward(graphdef, p, batch), batch, mesh=mesh if vocab_parallel else None)[0]
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


@pytest.mark.parametrize('vocab_size, multiple, shape', [(251, 128, (2, 2, 2)), (101, 256, (2, 1, 4))])
def test_vocab_parallel_cross_entropy_with_a_padded_vocabulary(vocab_size, multiple, shape, batch):
  # 251 rows padded to 256 split two ways, and 101 rows padded to 256 split four ways: the last
  # two vocabulary shards then hold nothing but padding.
  cfg = CFG.replace(vocab_size=vocab_size)
  padded = cfg.replace(vocab_multiple=multiple)
  batch = {**batch, 'input_ids': batch['input_ids'] % vocab_size}
  batch['masked_ids'] = np.take_along_axis(batch['input_ids'], batch['masked_positions'], -1)
  mesh = sharding.make_mesh(*shape)
  with pytest.raises(UsageError, match=r'parameter embeddings/word .* cannot be split'):
    sharding.param_shardings(model.abstract(cfg)[1], mesh)  # Unpadded, the mesh refuses it.
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ref_loss, ref_grads, _ = _loss_and_grads(one, batch, cfg=cfg)
  hlo = []
  loss, grads, word_sharding = _loss_and_grads(mesh, batch, vocab_parallel=True, hlo=hlo, cfg=padded)
  assert 'manual_computation' in hlo[0] or 'SPMDFullToShardShape' in hlo[0]  # It went through shard_map.
  assert word_sharding.spec[0] == 'tensor' and word_sharding.shard_shape((256, 64))[0] == 256 // shape[2]
  assert abs(loss - ref_loss) < 1e-5
  vocab_paths = {('embeddings', 'word'), ('mlm', 'bias')}
  for (path, g), (_, ref) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
    g = g[...][:vocab_size] if path in vocab_paths else g[...]
    np.testing.assert_allclose(g, ref[...], atol=2e-6, rtol=1e-4, err_msg=str(path))


def test_sharded_train_step_runs_and_learns(batch):
  mesh = sharding.make_mesh(2, 2, 2)
  graphdef, abstract = model.abstract(CFG)
  _, params = model.init(CFG, 0, out_shardings=sharding.param_shardings(abstract, mesh))
  tx = optim.make_optimizer('adamw', 1e-2, weight_decay=0.0)
  state = optim.init_state(params, tx)
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss), donate_argnums=0)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  curve = []
  for i in range(8):
    state, metrics = step(state, placed, jax.random.key(i))
    curve.append(float(metrics['loss']))
  assert curve[-1] < 0.5 * curve[0]
  assert int(state['step']) == 8
  assert not state['params']['layers']['wi_kernel'][...].sharding.is_fully_replicated


@pytest.fixture(scope='module')
def odd_vocab_run(tmp_path_factory):
  """Two pretraining steps (in-process) of the quickstart's tiny BERT on mesh fsdp=4, tensor=2
  with a 1,001-token vocabulary, which no tensor-parallel mesh divides."""
  from jaxlm import tokenizer, trainer
  from jaxlm.data import pretrain

  d = tmp_path_factory.mktemp('odd_vocab')
  tok = tokenizer.train_wordpiece(pretrain.iter_texts('builtin:stdlib'), 1001)
  assert tok.vocab_size == 1001
  tok.save(str(d / 'tokenizer'))
  c = runpy.run_path(os.path.join(ROOT, 'configs', 'quickstart.py'))['get_config']()
  c.data.tokenizer = str(d / 'tokenizer')
  c.num_train_steps, c.global_batch_size, c.log_every_steps, c.eval_every_steps = 2, 8, 1, 0
  c.checkpoint_every_steps, c.data.seq_len, c.data.max_predictions, c.data.shuffle_buffer = 2, 32, 5, 64
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
  last = trainer.train(c, str(d / 'run'))
  return str(d / 'run'), last


def test_pretraining_on_fsdp4_tensor2_with_an_odd_vocabulary(odd_vocab_run):
  from jaxlm import store

  workdir, last = odd_vocab_run
  assert np.isfinite(last['loss']) and 0 <= last['mlm_accuracy'] <= 1
  assert json.loads(open(os.path.join(workdir, 'metrics.jsonl')).readlines()[-1])['step'] == 2
  saved = json.load(open(os.path.join(workdir, 'model_config.json')))
  assert saved['vocab_size'] == 1001 and saved['vocab_multiple'] == 128
  _, params, _, _ = store.load_checkpoint(workdir)
  word, bias = np.asarray(params['embeddings']['word'][...]), np.asarray(params['mlm']['bias'][...])
  assert word.shape == (1024, 128) and bias.shape == (1024,)
  assert not word[1001:].any() and not bias[1001:].any()  # No gradient ever reached the padding rows.
  # Loaded with another multiple (a fine-tune on another mesh): the same real rows, zero padding.
  _, unpadded, _, _ = store.load_checkpoint(workdir, vocab_multiple=1)
  np.testing.assert_array_equal(unpadded['embeddings']['word'][...], word[:1001])
  _, repadded, new = store.load_for_init(workdir, vocab_multiple=100, num_labels=2, pooler=True)
  assert repadded['mlm']['bias'][...].shape == (1100,) and 'mlm/bias' not in new
  np.testing.assert_array_equal(repadded['embeddings']['word'][...][:1024], word)
  assert not np.asarray(repadded['embeddings']['word'][...][1024:]).any()


def test_padding_rows_are_never_predicted_nor_exported_to_hugging_face(odd_vocab_run, tmp_path):
  import jaxlm
  from jaxlm import hf

  workdir, _ = odd_vocab_run
  m = jaxlm.load(workdir)
  fills = m.fill_mask('the [MASK] of the module.', top_k=5000)
  assert len(fills) == 1001 and max(f['token'] for f in fills) < 1001
  assert abs(sum(f['score'] for f in fills) - 1.0) < 1e-3  # The real vocabulary holds all the mass.
  hf.save(str(tmp_path), m.params, m.config, tokenizer_dir=os.path.join(workdir, 'tokenizer'))
  assert json.load(open(tmp_path / 'config.json'))['vocab_size'] == 1001
  from safetensors.numpy import load_file

  tensors = load_file(str(tmp_path / 'model.safetensors'))
  assert tensors['bert.embeddings.word_embeddings.weight'].shape == (1001, 128)
  assert tensors['cls.predictions.bias'].shape == (1001,)
  _, back, _, report = hf.load(str(tmp_path), vocab_multiple=128)
  assert report.missing == [] and report.unused == []
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(m.params)):
    np.testing.assert_array_equal(a, b)
