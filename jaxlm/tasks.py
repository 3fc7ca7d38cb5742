"""Losses and metrics per task, as pure functions of model outputs and a batch.

Pretraining: masked-LM cross-entropy over the gathered masked positions, weighted (padding
predictions have weight 0), plus the optional next-sentence loss. Fine-tuning:
classification cross-entropy or regression squared error. Every function returns
(loss, metrics) with float32 scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_xent(logits, labels, weights=None):
  """(sum of weighted NLL, sum of weighted correct, sum of weights), in float32.

  Written with a one-hot select rather than log_softmax + take_along_axis: the gradient is
  then elementwise and fused, instead of a vocabulary-wide zeros buffer and a scatter.
  """
  logits = logits.astype(jnp.float32)
  top = logits.max(-1, keepdims=True)
  lse = jnp.log(jnp.exp(logits - jax.lax.stop_gradient(top)).sum(-1)) + jax.lax.stop_gradient(top[..., 0])
  one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == labels[..., None]
  label_logit = jnp.where(one_hot, logits, 0.0).sum(-1)
  nll = lse - label_logit
  w = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
  correct = (label_logit >= top[..., 0]).astype(jnp.float32)  # The label's logit is the largest.
  return (nll * w).sum(), (correct * w).sum(), w.sum()


def mlm_loss(out: dict, batch: dict):
  """Masked-LM loss (+ next-sentence loss when the batch has `nsp_labels`)."""
  nll, correct, n = weighted_xent(out['mlm_logits'], batch['masked_ids'], batch['masked_weights'])
  n = jnp.maximum(n, 1.0)
  loss = nll / n
  metrics = {'mlm_loss': loss, 'mlm_accuracy': correct / n}
  if 'nsp_labels' in batch and 'nsp_logits' in out:
    nsp_nll, nsp_correct, m = weighted_xent(out['nsp_logits'], batch['nsp_labels'])
    metrics['nsp_loss'], metrics['nsp_accuracy'] = nsp_nll / m, nsp_correct / m
    loss = loss + metrics['nsp_loss']
  metrics['loss'] = loss
  return loss, metrics


def classification_loss(out: dict, batch: dict):
  """Cross-entropy (num_labels > 1) or squared error (num_labels == 1) over `labels`."""
  logits = out['logits'].astype(jnp.float32)
  w = batch.get('weights', jnp.ones(logits.shape[0], jnp.float32)).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  if logits.shape[-1] == 1:
    loss = ((logits[:, 0] - batch['labels']) ** 2 * w).sum() / n
    return loss, {'loss': loss}
  nll, correct, _ = weighted_xent(logits, batch['labels'].astype(jnp.int32), w)
  return nll / n, {'loss': nll / n, 'accuracy': correct / n}
