"""BERT-large (24 layers, hidden 1024) masked-LM pretraining with the original BERT recipe.

  python -m jaxlm.train --config configs/bert_large_mlm.py --workdir /mnt/runs/bert-large \
    --config.data.train='text:gs://BUCKET/corpus/*.txt'

Run the same command on every worker of a TPU pod slice. See jaxlm/config.py for every key.
"""

from jaxlm.config import pretraining


def get_config():
  c = pretraining('large')
  c.model.remat = 'save_dots_no_batch'  # Recompute activations but keep weight matmuls: fits larger batches.
  c.model.attention_dropout = 0.1  # The published recipe. 0.0 takes the fused attention kernel in
  #   training (cuDNN / splash): faster on GPU / TPU, a departure from the recipe (README: Attention).
  return c
