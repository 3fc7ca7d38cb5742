"""BERT-tiny (2 layers, hidden 128) masked-LM pretraining with the original BERT recipe.

  python -m jaxlm.train --config configs/bert_tiny_mlm.py --workdir /mnt/runs/bert-tiny \
    --config.data.train='text:gs://BUCKET/corpus/*.txt'

Run the same command on every worker of a TPU pod slice. See jaxlm/config.py for every key.
"""

from jaxlm.config import pretraining


def get_config():
  c = pretraining('tiny')
  c.learning_rate = 1e-3  # Compact models train well at a higher rate.
  return c
