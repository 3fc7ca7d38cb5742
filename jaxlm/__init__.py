"""jaxlm: pretrain, fine-tune and serve BERT-style encoders and causal LMs with JAX and Flax NNX.

`jaxlm.load(path)` returns a Predictor (embed / fill_mask / predict), or a generate.Generator
(generate / chat / perplexity / score) for a causal LM run or export; `jaxlm.preset(name)`
returns a ModelConfig of the published BERT family. Training is `python -m jaxlm.train`.
"""

import importlib

from jaxlm.errors import UsageError

__all__ = ['PRESETS', 'ModelConfig', 'Predictor', 'UsageError', 'load', 'preset']
__version__ = '0.1.0'

_LAZY = {'Predictor': 'inference', 'load': 'inference', 'PRESETS': 'model', 'ModelConfig': 'model', 'preset': 'model'}


def __getattr__(name: str):
  # Imported on first use, so that `python -m jaxlm.train` starts (and re-executes itself,
  # hostenv.py) before JAX is imported.
  if name in _LAZY:
    return getattr(importlib.import_module(f'jaxlm.{_LAZY[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
