"""Quickstart: train a WordPiece vocabulary and pretrain a tiny BERT on the builtin corpus, offline.

  python -m jaxlm.train --config configs/quickstart.py --workdir /tmp/jaxlm-quickstart

The corpus is the Python standard library's documentation (read at run time, no download).
About 3 minutes on a 2-core laptop CPU; the MLM loss falls from ~8.3 to about 5.
"""

from jaxlm.config import base


def get_config():
  c = base()
  c.num_train_steps = 500  # About ten epochs over ~160k tokens.
  c.global_batch_size = 32  # Sequences per update.
  c.learning_rate = 2e-3  # Tiny models take a high learning rate.
  c.warmup_steps = 50  # 10% warmup.
  c.log_every_steps = 50  # A progress line every 50 steps.
  c.eval_every_steps = 250  # MLM loss on the whole eval set (another masking seed).
  c.checkpoint_every_steps = 100  # Checkpoint interval.
  c.model.preset = 'tiny'  # 2 layers, hidden 128.
  c.model.max_position_embeddings = 128  # Sequences are 128 long.
  c.model.attention_dropout = 0.0  # Fused attention in training; here the final MLM loss equals
  #   that of 0.1 (two seeds, README: Attention), so dropout on the probabilities buys nothing.
  c.data.train = 'builtin:stdlib'  # Python's own docstrings.
  c.data.eval = 'builtin:stdlib'  # Same text, another seed: a smoke check, not a held-out set.
  c.data.seq_len = 128  # Tokens per sequence.
  c.data.max_predictions = 20  # 15% of 128, rounded up.
  c.data.train_tokenizer_vocab = 8000  # Train an 8k WordPiece vocabulary into WORKDIR/tokenizer.
  return c
