"""The whole optimizer of a run, from its config: `optim.from_config(config, abstract_params, finetune)`.

clip-by-global-norm -> AdamW | Adafactor | LAMB with a warmup-then-decay schedule (weight decay
masked off biases and LayerNorm, as in the original BERT), then what the config adds: frozen
parameters, LoRA and bottleneck adapters (peft.py: finetune.*) and gradual magnitude pruning (prune.py:
prune.*). `check_config` validates those keys; the train state is made by `Optimizer.init_state`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlm import model, peft, prune
from jaxlm.errors import UsageError
from jaxlm.peft import _path_str

OPTIMIZERS = ('adamw', 'adafactor', 'lamb')


def decay_mask(params):
  """True where weight decay applies: kernels and embeddings, not biases or LayerNorm."""

  def wants_decay(path, _):
    name = _path_str(path)
    return not (name.endswith('bias') or 'ln_' in name.rsplit('/', 1)[-1])

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int, decay: str = 'linear'):
  """Linear warmup to `learning_rate`, then linear or cosine decay to 0 at `total_steps`."""
  if decay not in SCHEDULES:
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


SCHEDULES = ('linear', 'cosine', 'constant')


def warmup_steps(config) -> int:
  """Warmup in steps: warmup_steps when set, else warmup_ratio of num_train_steps."""
  if config.warmup_steps > 0:
    return config.warmup_steps
  return round(config.warmup_ratio * config.num_train_steps)


def prune_end_step(end_step: int, num_train_steps: int) -> int:
  """prune.end_step, with -1 meaning 3/4 of the run (the rest fine-tunes at the final sparsity)."""
  return end_step if end_step >= 0 else max(1, (3 * num_train_steps) // 4)


def check_config(config, finetune: bool) -> None:
  """Raises UsageError naming the first bad key of the optimizer's part: learning rate and
  schedule, optimizer.*, finetune.* (freezing, LoRA, bottleneck adapters) and prune.*."""
  if not config.learning_rate > 0:
    raise UsageError(f'learning_rate={config.learning_rate}: must be positive')
  if config.warmup_steps < 0:
    raise UsageError(f'warmup_steps={config.warmup_steps}: must be >= 0')
  if not 0.0 <= config.warmup_ratio <= 1.0:
    raise UsageError(f'warmup_ratio={config.warmup_ratio}: must be between 0 and 1')
  if config.lr_schedule not in SCHEDULES:
    raise UsageError(f'lr_schedule={config.lr_schedule!r}: expected linear, cosine or constant')
  if config.optimizer.name not in OPTIMIZERS:
    raise UsageError(f'optimizer.name={config.optimizer.name!r}: expected one of {OPTIMIZERS}')
  ft, pr = config.finetune, config.prune
  if ft.mode not in peft.MODES:
    raise UsageError(f'finetune.mode={ft.mode!r}: expected one of {peft.MODES}')
  peft.parse_targets(ft.lora_targets)
  if ft.adapter_placement not in model.ADAPTER_PLACEMENTS:
    raise UsageError(
      f'finetune.adapter_placement={ft.adapter_placement!r}: expected one of {tuple(model.ADAPTER_PLACEMENTS)}'
    )
  if not 0.0 <= pr.sparsity < 1.0:
    raise UsageError(f'prune.sparsity={pr.sparsity}: must be in [0, 1)')
  if pr.sparsity and finetune and ft.mode != 'full':
    raise UsageError(f'prune.sparsity needs finetune.mode=full (the kernels are frozen under {ft.mode!r})')
  if pr.sparsity:
    end = prune_end_step(pr.end_step, config.num_train_steps)
    if not 0 <= pr.begin_step < end or pr.frequency < 1:
      raise UsageError(
        f'prune: need 0 <= prune.begin_step ({pr.begin_step}) < prune.end_step ({end}) and prune.frequency >= 1'
      )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optimizer chain of a run and what the train step needs to know about it."""

  tx: optax.GradientTransformation
  schedule: Any  # step -> learning rate
  mode: str  # finetune.mode: 'full', 'head', 'lora' or 'adapter'
  labels: Any  # 'train' / 'freeze' per parameter (peft.labels)
  frozen: Any  # True where the gradient is stopped; None when everything trains
  lora_targets: tuple[str, ...]  # Matrices with LoRA adapters; () without LoRA
  lora_rank: int
  lora_scale: float  # alpha / r
  pruning: bool  # prune.sparsity > 0: masks in the optimizer state

  def init_state(self, params, seed: int = 0) -> dict:
    """The train state for fresh parameters (and fresh LoRA adapters, seeded)."""
    adapters = peft.init_adapters(params, self.lora_targets, self.lora_rank, seed) if self.lora_targets else None
    return init_state(params, self.tx, adapters)

  def model_params(self, state: dict):
    """The parameters that leave the run: LoRA adapters folded into the dense kernels."""
    return peft.merge(state['params'], state['adapters'], self.lora_scale) if 'adapters' in state else state['params']

  def trainable(self, state: dict) -> tuple[int, int]:
    """(trainable, total) parameter counts of `state`."""
    return peft.count(state['params'], self.labels, state.get('adapters'))


def init_state(params, tx: optax.GradientTransformation, adapters: dict | None = None) -> dict:
  """The train state {'params', 'opt_state', 'step'[, 'adapters']}: a plain dict of arrays."""
  state = {'params': params, 'step': jnp.zeros((), jnp.int32)}
  if adapters is not None:
    state['adapters'] = adapters
  state['opt_state'] = tx.init(trainable_of(state))
  return state


def trainable_of(state: dict):
  """What the optimizer updates: the parameters, or {'params', 'adapters'} under LoRA."""
  return {'params': state['params'], 'adapters': state['adapters']} if 'adapters' in state else state['params']


def from_config(config, abstract_params, finetune: bool) -> Optimizer:
  """The whole optimizer of a run: schedule, clipping, AdamW / Adafactor / LAMB, freezing, LoRA and bottleneck
  adapters (finetune.mode, when fine-tuning) and gradual magnitude pruning (prune.sparsity)."""
  check_config(config, finetune)
  schedule = make_schedule(config.learning_rate, warmup_steps(config), config.num_train_steps, config.lr_schedule)
  o, ft, pr = config.optimizer, config.finetune, config.prune
  tx = make_optimizer(o.name, schedule, config.weight_decay, o.b1, o.b2, o.eps, config.clip_grad_norm or None)
  mode = ft.mode if finetune else 'full'
  labels = peft.labels(abstract_params, mode, ft.adapter_train_layernorm)
  frozen = None
  if mode != 'full':
    tx, frozen = peft.wrap_optimizer(tx, labels, mode == 'lora'), peft.frozen_mask(labels)
  if pr.sparsity:  # Masks in the optimizer state; pruned weights exactly 0.
    end = prune_end_step(pr.end_step, config.num_train_steps)
    tx = prune.magnitude_pruning(tx, prune.cubic_schedule(pr.sparsity, pr.begin_step, end, pr.frequency))
  targets = peft.parse_targets(ft.lora_targets) if mode == 'lora' else ()
  return Optimizer(
    tx=tx, schedule=schedule, mode=mode, labels=labels, frozen=frozen, lora_targets=targets,
    lora_rank=ft.lora_rank, lora_scale=ft.lora_alpha / ft.lora_rank, pruning=bool(pr.sparsity),
  )  # fmt: skip
