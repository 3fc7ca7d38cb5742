"""Input pipelines on tf.data: sources, tokenizing, packing and masking, per-host sharding.

TensorFlow is used for tf.data only: importing this package sets it up (jaxlm/tensorflow_setup.py):
every GPU and TPU hidden from it, no Keras. The inference path never imports it.
"""

from jaxlm import tensorflow_setup  # noqa: F401 (TensorFlow on the CPU only, quiet, without Keras)
