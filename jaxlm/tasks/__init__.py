"""Kinds of training: one module per task, each owning its batches, loss, evaluation, best metric and heads.

  mlm.py       masked-LM pretraining, with optional next-sentence prediction
  classify.py  classification and regression of texts or text pairs, from files or a GLUE
               preset (glue.py)
  causal.py    causal LM pretraining of a decoder (next token over packed documents) and its
               supervised fine-tuning on prompt / response pairs (sft)

The trainer knows a task only through the `Task` interface below and `get(config.task)`; a new
kind of training is a new module whose class is decorated with `@register`. Losses themselves
are pure functions in losses.py; a task picks one and reduces it for evaluation.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import jax

from jaxlm.errors import UsageError

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  """Makes a Task class available as `config.task = cls.name`."""
  TASKS[cls.name] = cls
  return cls


def get(name: str) -> type[Task]:
  """The Task class of `config.task`; one error naming the key for an unknown one."""
  if name not in TASKS:
    raise UsageError(f'task={name!r}: expected one of {tuple(TASKS)}')
  return TASKS[name]


class Task(abc.ABC):
  """One kind of training, built at set-up from the run's config and tokenizer.

  Batches are dicts of numpy arrays, this process's rows of each global batch. `labels` are the
  class names saved with every checkpoint (None when there are none); `predictions` is the
  number of output positions per sequence that pay for a vocabulary projection (model FLOPs);
  `family` the kind of model it trains (models.py), which also decides the kind of a vocabulary
  trained for the run (WordPiece for an encoder, byte-level BPE for a decoder).
  """

  name: str = ''
  finetuning: bool = False  # Starts from a pretrained encoder: finetune.mode (head, LoRA) applies.
  labels: list[str] | None = None
  predictions: int = 0
  first_token_only: bool = False  # Evaluation reads only the first position's output (model.Bert).
  family: str = 'encoder'  # 'encoder' (model.py) or 'decoder' (decoder.py); config.model.preset must be one.

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.shard = dict(process_index=jax.process_index(), process_count=jax.process_count())

  @classmethod
  @abc.abstractmethod
  def check_config(cls, config) -> None:
    """Raises UsageError naming the first key this task cannot run with (before any work)."""

  @abc.abstractmethod
  def heads(self) -> dict:
    """The model config fields this task sets: an encoder's heads (mlm_head, nsp_head, pooler, num_labels),
    a decoder's special token ids."""

  @abc.abstractmethod
  def train_dataset(self, seed: int):
    """This process's endless, shuffled training batches (a tf.data dataset), seeded."""

  @abc.abstractmethod
  def eval_sets(self) -> dict[str, list[dict]]:
    """Every eval split, read once and in full: split name -> this process's batches."""

  @abc.abstractmethod
  def loss_fn(self, mesh) -> Callable:
    """The training loss: `(model outputs, batch, normalizers) -> (loss, metrics)` (losses.py)."""

  @abc.abstractmethod
  def eval_step(self, out: dict, batch: dict, mesh) -> dict:
    """The same loss on one eval batch, reduced for `summarize`: sums, or one value per example."""

  @abc.abstractmethod
  def summarize(self, split: str, outputs: list[dict]) -> dict[str, float]:
    """The metrics of one eval split from the host copies of its `eval_step` outputs."""

  def batch_lengths(self) -> tuple[int, ...]:
    """Every sequence length a training batch may have: data.seq_len, or the length buckets a task pads to."""
    return (self.config.data.seq_len,)

  def best_metric(self) -> tuple[str, str]:
    """(metrics key, 'min' | 'max') of the best checkpoint; config.best_metric='auto' asks the task."""
    c = self.config
    if c.best_metric != 'auto':
      return c.best_metric, c.best_mode
    return self.default_best_metric()

  def default_best_metric(self) -> tuple[str, str]:
    return 'eval_loss', 'min'


from jaxlm.tasks import causal, classify, mlm  # noqa: E402, F401 (registers the tasks)
