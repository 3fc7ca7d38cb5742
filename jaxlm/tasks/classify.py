"""Fine-tuning an encoder to classify texts or text pairs (task=classification), or to score them
(task=regression), from the user's files or a GLUE preset (glue.py, config.task_name).

The label set is the training file's (or the preset's), saved with every checkpoint; batches come
from data/classify.py. The loss is losses.classification_loss; evaluation runs its per-example
form over the whole eval set (padding rows have weight 0) and computes the task's metrics.
"""

from __future__ import annotations

import numpy as np

from jaxlm import losses, metrics
from jaxlm.data import classify
from jaxlm.errors import UsageError
from jaxlm.tasks import Task, glue, register


class _Supervised(Task):
  """What classification and regression share: fields, batches, evaluation."""

  finetuning = True
  first_token_only = True  # The losses read the pooled [CLS] vector alone.

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.preset = glue.PRESETS.get(config.task_name) if config.task_name else None
    self.labels = self._label_names()
    # Label strings as they appear in the data: TFDS gives class ids, files give names.
    self._values = [str(i) for i in range(len(self.labels))] if self.preset and self.labels else self.labels
    self.splits = tuple(s.strip() for s in config.data.eval_split.split(',') if s.strip())

  def _label_names(self) -> list[str] | None:
    return None

  @classmethod
  def check_config(cls, config) -> None:
    for key in ('nsp', 'separate_documents'):
      if config.data[key]:
        raise UsageError(f'data.{key}=True is for pretraining; task={config.task!r}')
    if config.data.pack_examples:
      raise UsageError(f'data.pack_examples=True packs causal LM examples (task=sft); task={config.task!r} has one'
                       ' example a row')  # fmt: skip
    classify.check_config(config.data.to_dict())
    if not (config.model.init_from or config.data.tokenizer):
      raise UsageError('model.init_from is empty: fine-tuning starts from a Hugging Face BERT directory or a jaxlm run')

  def heads(self) -> dict:
    return dict(mlm_head=False, nsp_head=False, pooler=True, num_labels=len(self.labels) if self.labels else 1)

  def _batches_kw(self) -> dict:
    c = self.config
    return dict(labels=self._values, seq_len=c.data.seq_len, global_batch_size=c.global_batch_size,
                data_cfg=c.data.to_dict(), **self.shard)  # fmt: skip

  def batch_lengths(self) -> tuple[int, ...]:
    return classify.bucket_lengths(self.config.data.to_dict(), self.config.data.seq_len)

  def train_dataset(self, seed: int):
    c = self.config
    return classify.classify_dataset(c.data.train, self.tokenizer, seed=seed, shuffle_buffer=c.data.shuffle_buffer,
                                     repeat=True, **self._batches_kw())  # fmt: skip

  def eval_sets(self) -> dict[str, list[dict]]:
    c = self.config
    return {
      s: classify.eval_batches(c.data.eval, self.tokenizer, split=s, **self._batches_kw())[0] for s in self.splits
    }

  def loss_fn(self, mesh):
    return losses.classification_loss

  def eval_step(self, out: dict, batch: dict, mesh) -> dict:
    return losses.per_example_classification(out, batch)

  def metric_names(self) -> tuple[str, ...]:
    """The eval metrics; the first is the task's main one (best_metric='auto')."""
    return self.preset.metrics if self.preset else ('accuracy',)

  def summarize(self, split: str, outputs: list[dict]) -> dict[str, float]:
    r = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    real = r['weight'] > 0  # Padding rows (weight 0) count nowhere.
    prefix = glue.eval_prefix(split, self.splits)
    out = {prefix + k: v for k, v in metrics.compute(self.metric_names(), r['pred'][real], r['label'][real]).items()}
    out[prefix + 'loss'] = float(r['loss'][real].mean())
    return out

  def default_best_metric(self) -> tuple[str, str]:
    return f'eval_{self.metric_names()[0]}', 'max'


@register
class Classification(_Supervised):
  name = 'classification'

  def _label_names(self) -> list[str]:
    if self.preset is not None:
      return list(self.preset.labels)
    names = classify.label_set(self.config.data.train, self.config.data.to_dict())
    print(f'{len(names)} labels: {names[:20]}', flush=True)
    return names

  def metric_names(self) -> tuple[str, ...]:
    if self.preset is None and len(self.labels) == 2:
      return ('accuracy', 'f1')
    return super().metric_names()


@register
class Regression(_Supervised):
  name = 'regression'

  def metric_names(self) -> tuple[str, ...]:
    return self.preset.metrics if self.preset else ('pearson', 'spearman')
