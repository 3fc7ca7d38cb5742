"""The optimizer chain (jaxlm/optim.py) and the train step it runs in (jaxlm/steps.py): schedules and warmup,
clipping, weight decay, the three optimizers, gradient accumulation."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import losses, model, optim, steps
from jaxlm.errors import UsageError


def test_warmup_ratio_scales_with_the_run():
  c = config_lib.finetuning()
  for n, want in ((200, 20), (1000, 100), (7, 1)):
    c.num_train_steps = n
    assert optim.warmup_steps(c) == want
  c.warmup_steps = 30  # Steps, when given, win over the ratio.
  assert optim.warmup_steps(c) == 30
  schedule = optim.make_schedule(2e-5, optim.warmup_steps(config_lib.finetuning()), 2000)
  assert float(schedule(200)) == pytest.approx(2e-5) and float(schedule(1100)) == pytest.approx(1e-5)


def test_schedule_warms_up_then_decays():
  lin = optim.make_schedule(1e-3, 10, 110, 'linear')
  cos = optim.make_schedule(1e-3, 10, 110, 'cosine')
  np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10, 60, 110)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
  np.testing.assert_allclose([float(cos(s)) for s in (5, 10, 60, 110)], [5e-4, 1e-3, 5e-4, 0], atol=1e-9)
  assert float(cos(35)) > float(lin(35))  # Cosine stays higher early in the decay.
  with pytest.raises(UsageError, match='schedule=.step.'):
    optim.make_schedule(1e-3, 10, 110, 'step')


def test_updates_follow_the_clipped_gradient():
  params = {'w': np.zeros(4, np.float32)}
  grads = [{'w': np.array([30.0, -40.0, 0.0, 0.0], np.float32)}, {'w': np.array([0.1, 0.0, 0.0, 0.2], np.float32)}]

  def run(tx, gs):
    state, out = tx.init(params), []
    for g in gs:
      u, state = tx.update(g, state, params)
      out.append(np.asarray(u['w']))
    return out

  clipped = [jax.tree.map(lambda x: x * min(1.0, 1.0 / float(np.linalg.norm(g['w']))), g) for g in grads]
  ours = run(optim.make_optimizer('adamw', 1e-2, weight_decay=0.0, clip_norm=1.0), grads)
  plain = optax.adamw(1e-2, 0.9, 0.999, 1e-6, weight_decay=0.0)
  for a, b in zip(ours, run(plain, clipped)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert not np.allclose(ours[1], run(plain, grads)[1], rtol=1e-3)  # Unclipped, the second step differs.


def test_weight_decay_skips_biases_and_layernorm():
  _, params = model.init(model.preset('tiny', vocab_size=64))
  mask = {'/'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(optim.decay_mask(params))}
  assert mask['layers/wi_kernel'] and mask['embeddings/word']
  assert not mask['layers/wi_bias'] and not mask['layers/attn_ln_scale'] and not mask['embeddings/ln_bias']
  assert not mask['mlm/bias']


def _tiny_state(opt='adamw', lr=1e-2):
  cfg = model.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0, nsp_head=True)  # fmt: skip
  graphdef, params = model.init(cfg)
  tx = optim.make_optimizer(opt, lr)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 64, (8, 16)).astype(np.int32)
  pos = np.sort(rng.choice(np.arange(1, 15), (8, 3)), -1).astype(np.int32)
  w = np.ones((8, 3), np.float32)
  w[2, 1:] = 0  # Uneven weights: the microbatches hold different numbers of predictions.
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids),
           'masked_positions': pos, 'masked_ids': np.take_along_axis(ids, pos, -1), 'masked_weights': w,
           'nsp_labels': rng.integers(0, 2, (8,)).astype(np.int32)}  # fmt: skip
  return graphdef, params, tx, batch


def test_gradient_accumulation_equals_one_big_batch():
  graphdef, params, tx, batch = _tiny_state()
  out = {}
  for k in (1, 4):
    step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss, grad_accum_steps=k))
    out[k] = step(optim.init_state(params, tx), batch, jax.random.key(0))
  for key in ('loss', 'mlm_accuracy', 'nsp_loss', 'grad_norm'):
    np.testing.assert_allclose(out[4][1][key], out[1][1][key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(out[4][0]['params']), jax.tree.leaves(out[1][0]['params'])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('opt', ['adamw', 'adafactor', 'lamb'])
def test_optimizers_learn(opt):
  # Adafactor and LAMB scale each step by the parameter's norm, so they want a larger rate.
  graphdef, params, tx, batch = _tiny_state(opt, lr=1e-2 if opt == 'adamw' else 0.1)
  step = jax.jit(steps.make_train_step(graphdef, tx, losses.mlm_loss))
  state = optim.init_state(params, tx)
  curve = []
  for i in range(15):
    state, m = step(state, batch, jax.random.key(i))
    curve.append(float(m['loss']))
  assert curve[-1] < 0.7 * curve[0], curve
