"""Losses as pure functions of model outputs and a batch; the tasks (tasks/) choose among them.

Pretraining: masked-LM cross-entropy over the gathered masked positions, weighted (padding
predictions have weight 0), plus the optional next-sentence loss; causal LMs: next-token
cross-entropy at every position, weighted by `loss_weights` (0 on padding, on a prompt's tokens
in supervised fine-tuning, across documents). Fine-tuning:
classification cross-entropy or regression squared error. Every function returns
(loss, metrics) with float32 scalars; evaluation reuses the same functions reduced
differently (sums over an eval set, or one value per example). MLM logits span the padded vocabulary
(model.vocab_multiple); the model gives padding columns a large negative logit, so they add
nothing to a softmax and never win an argmax, here or vocabulary-parallel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


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


def vocab_parallel_xent(logits, labels, weights, mesh):
  """weighted_xent with the vocabulary split over the mesh's `tensor` axis (shard_map).

  Each device holds V/t logits per position; the softmax max, its normaliser and the label's
  logit are combined with one pmax and two psums over `tensor`, so the [.., V] logits are never
  gathered onto one device. Sums are then psum'd over the batch axes.
  """

  batch_axes = tuple(a for a in ('data', 'fsdp') if mesh.shape[a] > 1) or None
  lead = (batch_axes,) + (None,) * (labels.ndim - 1)

  def local(logits, labels, weights):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    offset = jax.lax.axis_index('tensor') * v_local
    top = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), 'tensor')  # A constant shift: no gradient.
    sum_exp = jax.lax.psum(jnp.exp(logits - top[..., None]).sum(-1), 'tensor')
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    label_logit = jax.lax.psum(jnp.where(iota == (labels - offset)[..., None], logits, 0.0).sum(-1), 'tensor')
    nll = jnp.log(sum_exp) + top - label_logit
    w = weights.astype(jnp.float32)
    correct = (label_logit >= top).astype(jnp.float32)
    sums = jnp.stack([(nll * w).sum(), (correct * w).sum(), w.sum()])
    return jax.lax.psum(sums, batch_axes) if batch_axes else sums

  sums = jax.shard_map(
    local, mesh=mesh, in_specs=(P(*lead, 'tensor'), P(*lead), P(*lead)), out_specs=P(), check_vma=False
  )(logits, labels, weights)
  return sums[0], sums[1], sums[2]


def normalizers(batch: dict) -> dict:
  """Denominators of the batch's losses. Computed once over a whole batch and passed to the
  loss of each microbatch, so that summed microbatch losses equal the whole-batch loss."""
  norm = {}
  if 'masked_weights' in batch:
    norm['mlm'] = jnp.maximum(batch['masked_weights'].astype(jnp.float32).sum(), 1.0)
  if 'labels' in batch:
    w = batch.get('weights')
    norm['cls'] = jnp.maximum(w.astype(jnp.float32).sum(), 1.0) if w is not None else jnp.float32(batch['labels'].size)
  if 'loss_weights' in batch:
    norm['lm'] = jnp.maximum(batch['loss_weights'].astype(jnp.float32).sum(), 1.0)
  if 'nsp_labels' in batch:
    w = batch.get('nsp_weights')
    norm['nsp'] = (
      jnp.maximum(w.astype(jnp.float32).sum(), 1.0)
      if w is not None
      else jnp.asarray(batch['nsp_labels'].size, jnp.float32)
    )
  return norm


def mlm_loss(out: dict, batch: dict, norm: dict | None = None, mesh=None):
  """Masked-LM loss (+ next-sentence loss when the batch has `nsp_labels`).

  Given a mesh whose `tensor` axis is larger than 1, the vocabulary-wide cross-entropy runs
  vocabulary-parallel (vocab_parallel_xent)."""
  norm = normalizers(batch) if norm is None else norm
  args = (out['mlm_logits'], batch['masked_ids'], batch['masked_weights'])
  if mesh is not None and mesh.shape['tensor'] > 1:
    nll, correct, _ = vocab_parallel_xent(*args, mesh)
  else:
    nll, correct, _ = weighted_xent(*args)
  loss = nll / norm['mlm']
  metrics = {'mlm_loss': loss, 'mlm_accuracy': correct / norm['mlm']}
  if 'nsp_labels' in batch and 'nsp_logits' in out:
    nsp_nll, nsp_correct, _ = weighted_xent(out['nsp_logits'], batch['nsp_labels'], batch.get('nsp_weights'))
    metrics['nsp_loss'], metrics['nsp_accuracy'] = nsp_nll / norm['nsp'], nsp_correct / norm['nsp']
    loss = loss + metrics['nsp_loss']
  metrics['loss'] = loss
  return loss, metrics


def causal_lm_loss(out: dict, batch: dict, norm: dict | None = None, mesh=None):
  """Next-token cross-entropy of a causal LM: the logits [B,T,V] against `targets`, weighted by
  `loss_weights` (both [B,T]); vocabulary-parallel when the mesh's `tensor` axis is larger than 1."""
  norm = normalizers(batch) if norm is None else norm
  args = (out['logits'], batch['targets'], batch['loss_weights'])
  if mesh is not None and mesh.shape['tensor'] > 1:
    nll, correct, _ = vocab_parallel_xent(*args, mesh)
  else:
    nll, correct, _ = weighted_xent(*args)
  loss = nll / norm['lm']
  return loss, {'loss': loss, 'accuracy': correct / norm['lm']}


def per_example_classification(out: dict, batch: dict) -> dict:
  """{'loss', 'pred', 'label', 'weight'} per example: cross-entropy and the argmax class
  (num_labels > 1), or squared error and the score (num_labels == 1)."""
  logits = out['logits'].astype(jnp.float32)
  w = batch.get('weights', jnp.ones(logits.shape[0], jnp.float32)).astype(jnp.float32)
  y = batch['labels']
  if logits.shape[-1] == 1:
    return {'loss': (logits[:, 0] - y.astype(jnp.float32)) ** 2, 'pred': logits[:, 0], 'label': y, 'weight': w}
  top = jax.lax.stop_gradient(logits.max(-1))
  lse = jnp.log(jnp.exp(logits - top[:, None]).sum(-1)) + top
  one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == y.astype(jnp.int32)[:, None]
  nll = lse - jnp.where(one_hot, logits, 0.0).sum(-1)
  return {'loss': nll, 'pred': logits.argmax(-1), 'label': y, 'weight': w}


def classification_loss(out: dict, batch: dict, norm: dict | None = None):
  """Cross-entropy (num_labels > 1) or squared error (num_labels == 1) over `labels`, weighted by
  `weights` (0 for padding rows): the weighted mean of per_example_classification."""
  ex = per_example_classification(out, batch)
  n = (normalizers(batch) if norm is None else norm)['cls']
  loss = (ex['loss'] * ex['weight']).sum() / n
  if out['logits'].shape[-1] == 1:
    return loss, {'loss': loss}
  correct = (ex['pred'] == ex['label'].astype(ex['pred'].dtype)).astype(jnp.float32)
  return loss, {'loss': loss, 'accuracy': (correct * ex['weight']).sum() / n}
