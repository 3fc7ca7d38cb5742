"""TensorFlow as jaxlm uses it: tf.data and TensorBoard summaries, on the CPU only, quiet, without Keras.

Import this module before anything that imports TensorFlow (clu's summary writers, the input pipelines):

- every GPU and TPU is hidden from TensorFlow, so it never takes accelerator memory that JAX needs;
- its start-up banners are off (TF_CPP_MIN_LOG_LEVEL, unless set);
- `import tensorflow` imports Keras eagerly (its optimizers' SavedModel registrations), and Keras imports
  scikit-learn: 1.3 of TensorFlow's 3.7 seconds of import on a 2-core machine, for nothing tf.data or a
  summary writer uses. TensorFlow makes that import inside a try/except ImportError; a None entry in
  sys.modules, removed right after, makes it fail there. Keras stays importable (`import keras`, `tf.keras`).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_EAGER_KERAS = 'keras.src.optimizers'  # What tensorflow/__init__.py imports "for its registrations".
_skip = 'tensorflow' not in sys.modules and _EAGER_KERAS not in sys.modules
if _skip:
  sys.modules[_EAGER_KERAS] = None  # type: ignore[assignment]
try:
  import tensorflow as tf  # noqa: E402
finally:
  if _skip and sys.modules.get(_EAGER_KERAS, 0) is None:
    del sys.modules[_EAGER_KERAS]

tf.get_logger().setLevel('ERROR')  # AutoGraph's notes on lambdas are noise here.
tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):  # No TPU device type in this TensorFlow build.
  pass
