"""The GLUE benchmark (Wang et al. 2019) as presets of classification and regression (TFDS `glue/<name>`).

`configs/finetune_glue.py` sets `task_name`; `resolve(config)` then fills config.task, the data
sources, fields and eval splits from `PRESETS`, and the classification task takes the label
names and metrics from there, so `--config.task_name=mrpc` is all a user sets. Evaluation is on
the validation split(s); GLUE's test labels are hidden.
"""

from __future__ import annotations

import dataclasses

from jaxlm.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Preset:
  text: str  # TFDS feature of the first text.
  pair: str  # Feature of the second text ('' for single-sentence tasks).
  labels: tuple[str, ...]  # Class names in TFDS label order; () for regression.
  metrics: tuple[str, ...]  # jaxlm.metrics names; the first is the task's main metric.
  eval_splits: tuple[str, ...] = ('validation',)  # The first is reported without a prefix.


PRESETS: dict[str, Preset] = {
  'cola': Preset('sentence', '', ('unacceptable', 'acceptable'), ('matthews', 'accuracy')),
  'sst2': Preset('sentence', '', ('negative', 'positive'), ('accuracy',)),
  'mrpc': Preset('sentence1', 'sentence2', ('not_equivalent', 'equivalent'), ('f1', 'accuracy')),
  'qqp': Preset('question1', 'question2', ('not_duplicate', 'duplicate'), ('f1', 'accuracy')),
  'stsb': Preset('sentence1', 'sentence2', (), ('pearson', 'spearman')),
  'mnli': Preset(
    'premise',
    'hypothesis',
    ('entailment', 'neutral', 'contradiction'),
    ('accuracy',),
    ('validation_matched', 'validation_mismatched'),
  ),  # fmt: skip
  'qnli': Preset('question', 'sentence', ('entailment', 'not_entailment'), ('accuracy',)),
  'rte': Preset('sentence1', 'sentence2', ('entailment', 'not_entailment'), ('accuracy',)),
  'wnli': Preset('sentence1', 'sentence2', ('not_entailment', 'entailment'), ('accuracy',)),
}


def eval_prefix(split: str, splits: tuple[str, ...]) -> str:
  """'' for the main eval split, else e.g. 'mismatched_' for validation_mismatched."""
  return '' if split == splits[0] else split.removeprefix('validation_') + '_'


def resolve(config) -> Preset | None:
  """Fills config.task, data.* and best_metric from config.task_name (in place); None if unset."""
  name = config.task_name
  if not name:
    return None
  if name not in PRESETS:
    raise UsageError(f'task_name={name!r}: expected one of {sorted(PRESETS)}')
  t = PRESETS[name]
  with config.unlocked():
    config.task = 'regression' if not t.labels else 'classification'
    config.data.train = f'tfds:glue/{name}'
    config.data.eval = f'tfds:glue/{name}'
    config.data.train_split = 'train'
    config.data.eval_split = ','.join(t.eval_splits)
    config.data.text_field, config.data.text_pair_field, config.data.label_field = t.text, t.pair, 'label'
  return t
