"""BERT-tiny (2 layers, hidden 128) masked-LM pretraining: the original BERT recipe, no attention dropout.

  python -m jaxlm.train --config configs/bert_tiny_mlm.py --workdir /mnt/runs/bert-tiny \
    --config.data.train='text:gs://BUCKET/corpus/*.txt'

Run the same command on every worker of a TPU pod slice. See jaxlm/config.py for every key.
"""

from jaxlm.config import pretraining


def get_config():
  c = pretraining('tiny')
  c.learning_rate = 1e-3  # Compact models train well at a higher rate.
  c.model.attention_dropout = 0.0  # Fused attention in training: on the quickstart (this model) the
  #   MLM loss equals that of the recipe's 0.1 (README: Attention). Set 0.1 for the exact recipe.
  return c
