"""Input pipelines on tf.data: sources, tokenizing, packing and masking, per-host sharding.

TensorFlow is used for tf.data only: importing this package hides every GPU and TPU from it,
so it never takes accelerator memory that JAX needs. The inference path never imports it.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel('ERROR')  # AutoGraph's notes on lambdas are noise here.
tf.config.set_visible_devices([], 'GPU')
try:
  tf.config.set_visible_devices([], 'TPU')
except (ValueError, RuntimeError):  # No TPU device type in this TensorFlow build.
  pass
