"""jaxlm: pretrain, fine-tune and serve BERT-style encoders with JAX and Flax NNX.

`jaxlm.load(path)` returns a Predictor (embed / fill_mask / predict); `jaxlm.preset(name)`
returns a ModelConfig of the published BERT family. Training is `python -m jaxlm.train`.
"""

from jaxlm.errors import UsageError
from jaxlm.inference import Predictor, load
from jaxlm.model import PRESETS, ModelConfig, preset

__all__ = ['PRESETS', 'ModelConfig', 'Predictor', 'UsageError', 'load', 'preset']
__version__ = '0.1.0'
