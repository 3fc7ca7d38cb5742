"""BERT-small (4 layers, hidden 512) masked-LM pretraining with the original BERT recipe.

  python -m jaxlm.train --config configs/bert_small_mlm.py --workdir /mnt/runs/bert-small \
    --config.data.train='text:gs://BUCKET/corpus/*.txt'

Run the same command on every worker of a TPU pod slice. See jaxlm/config.py for every key.
"""

from jaxlm.config import pretraining


def get_config():
  c = pretraining('small')
  c.learning_rate = 3e-4  # Compact models train well at a higher rate.
  c.model.attention_dropout = 0.1  # The published recipe. 0.0 takes the fused attention kernel in
  #   training (cuDNN / splash): faster on GPU / TPU, a departure from the recipe (README: Attention).
  return c
