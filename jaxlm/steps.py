"""Jitted-ready pure step functions: `state, batch, rng -> state, metrics`.

The train state is a plain dict {'params', 'opt_state', 'step'}; the model graphdef and the
optimizer are closed over, so the step is a pure function of pytrees and can be jitted with
in/out shardings and a donated state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import model as model_lib


def forward(graphdef: nnx.GraphDef, params, batch: dict, rng=None) -> dict:
  """Runs the model on a batch dict (input_ids, attention_mask, token_type_ids[, masked_positions])."""
  return model_lib.apply(
    graphdef,
    params,
    batch['input_ids'],
    batch.get('attention_mask'),
    batch.get('token_type_ids'),
    batch.get('masked_positions'),
    rng=rng,
  )


def init_state(params, tx: optax.GradientTransformation) -> dict:
  """The train state for fresh parameters."""
  return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: Callable) -> Callable:
  """A pure `(state, batch, rng) -> (state, metrics)` for one optimizer update."""

  def step(state, batch, rng):
    def loss(params):
      return loss_fn(forward(graphdef, params, batch, rng), batch)

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  return step
