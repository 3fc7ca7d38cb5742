"""Optax optimizers and learning-rate schedules for BERT training.

`make_optimizer` builds clip-by-global-norm -> AdamW | Adafactor | LAMB with a
warmup-then-decay schedule. Weight decay is masked off biases and LayerNorm parameters,
as in the original BERT.
"""

from __future__ import annotations

import jax
import optax

from jaxlm.errors import UsageError

OPTIMIZERS = ('adamw', 'adafactor', 'lamb')


def _path_str(path) -> str:
  """'layers/wi_bias' for a pytree path (dict keys only; the Variable's own `.value` dropped)."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params):
  """True where weight decay applies: kernels and embeddings, not biases or LayerNorm."""

  def wants_decay(path, _):
    name = _path_str(path)
    return not (name.endswith('bias') or 'ln_' in name.rsplit('/', 1)[-1])

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int, decay: str = 'linear'):
  """Linear warmup to `learning_rate`, then linear or cosine decay to 0 at `total_steps`."""
  if decay not in ('linear', 'cosine', 'constant'):
    raise UsageError(f'schedule={decay!r}: expected linear, cosine or constant')
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  tail = {
    'linear': optax.linear_schedule(learning_rate, 0.0, rest),
    'cosine': optax.cosine_decay_schedule(learning_rate, rest),
    'constant': optax.constant_schedule(learning_rate),
  }[decay]
  return optax.join_schedules([warmup, tail], [warmup_steps])


def make_optimizer(
  name: str = 'adamw',
  learning_rate=1e-4,
  weight_decay: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
  """clip -> optimizer, with weight decay masked to kernels and embeddings."""
  if name == 'adamw':
    opt = optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == 'lamb':
    opt = optax.lamb(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == 'adafactor':
    opt = optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)
  else:
    raise UsageError(f'optimizer.name={name!r}: expected one of {OPTIMIZERS}')
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt
