"""BERT-base (12 layers, hidden 768) masked-LM pretraining with the original BERT recipe.

  python -m jaxlm.train --config configs/bert_base_mlm.py --workdir /mnt/runs/bert-base \
    --config.data.train='text:gs://BUCKET/corpus/*.txt'

Run the same command on every worker of a TPU pod slice. See jaxlm/config.py for every key.
"""

from jaxlm.config import pretraining


def get_config():
  c = pretraining('base')
  return c
