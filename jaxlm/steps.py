"""The pure train step, ready to jit: `state, batch, rng -> state, metrics`.

The train state is a plain dict {'params', 'opt_state', 'step'} (optim.init_state); the model
graphdef, the optimizer and the task's loss are closed over, so the step is a pure function of
pytrees, jitted by the trainer with in/out shardings and a donated state. Evaluation is the
task's (tasks/), on `forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import decoder, losses, peft
from jaxlm.optim import trainable_of


def forward(graphdef: nnx.GraphDef, params, batch: dict, rng=None, first_token_only: bool = False) -> dict:
  """Runs the model on a batch dict (input_ids, attention_mask, token_type_ids[, masked_positions,
  segment_ids, position_ids]: packed rows carry the last two). `first_token_only`: see model.Bert.
  A decoder (decoder.Decoder) reads input_ids[, attention_mask, segment_ids, position_ids] and
  returns its final features and head weight, not logits (losses.causal_lm_loss takes either)."""
  module = nnx.merge(graphdef, params)
  if isinstance(module, decoder.Decoder):
    return module(batch['input_ids'], batch.get('attention_mask'), segment_ids=batch.get('segment_ids'),
                  position_ids=batch.get('position_ids'), rng=rng, logits=False)  # fmt: skip
  return module(
    batch['input_ids'],
    batch.get('attention_mask'),
    batch.get('token_type_ids'),
    batch.get('masked_positions'),
    segment_ids=batch.get('segment_ids'),
    position_ids=batch.get('position_ids'),
    rng=rng,
    first_token_only=first_token_only,
  )


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_fn: Callable,
  grad_accum_steps: int = 1,
  schedule: Callable | None = None,
  skip_nonfinite: bool = False,
  frozen=None,
  lora_scale: float = 1.0,
) -> Callable:
  """A pure `(state, batch, rng) -> (state, metrics)` for one optimizer update.

  With `grad_accum_steps` k > 1 the batch is split into k microbatches whose gradients are
  summed in a `lax.scan`; each microbatch's loss is normalised by the whole batch's
  denominators (losses.normalizers), so the result equals one step on the whole batch.
  With `skip_nonfinite`, a step whose loss or gradient is not finite changes nothing and
  reports `skipped` = 1.

  Fine-tuning (peft.py): `frozen` marks parameters whose gradient is stopped (the optimizer
  gives them zero updates); when the state holds `adapters`, the optimizer's target is
  {'params', 'adapters'} and the model runs on peft.merge(params, adapters, lora_scale).
  """

  def model_params(trainable):
    p = trainable['params'] if isinstance(trainable, dict) and 'adapters' in trainable else trainable
    if frozen is not None:
      p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
    if isinstance(trainable, dict) and 'adapters' in trainable:
      p = peft.merge(p, trainable['adapters'], lora_scale)
    return p

  def grads_of(params, micro, norm, rng):
    def loss(p):
      return loss_fn(forward(graphdef, model_params(p), micro, rng), micro, norm)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return grads, metrics

  def step(state, batch, rng):
    params = trainable_of(state)
    norm = losses.normalizers(batch)
    if grad_accum_steps == 1:
      grads, metrics = grads_of(params, batch, norm, rng)
    else:
      k = grad_accum_steps
      micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

      def body(carry, inputs):
        i, mb = inputs
        g, m = grads_of(params, mb, norm, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.eval_shape(lambda: grads_of(params, jax.tree.map(lambda x: x[0], micro), norm, rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    metrics['grad_norm'] = optax.global_norm(grads)
    if schedule is not None:
      metrics['learning_rate'] = schedule(state['step'])
    new_params = optax.apply_updates(params, updates)
    if skip_nonfinite:
      # A NaN / Inf loss or gradient leaves parameters and optimizer state as they were.
      ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
      keep = lambda new, old: jnp.where(ok, new, old)
      new_params = jax.tree.map(keep, new_params, params)
      opt_state = jax.tree.map(keep, opt_state, state['opt_state'])
      metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
    new_state = {**state, 'opt_state': opt_state, 'step': state['step'] + 1}
    if 'adapters' in state:
      new_state['params'], new_state['adapters'] = new_params['params'], new_params['adapters']
    else:
      new_state['params'] = new_params
    return new_state, metrics

  return step
