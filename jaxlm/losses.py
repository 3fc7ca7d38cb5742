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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.blocks import PADDING_LOGIT


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


HEAD_CHUNK = 512  # Tokens per block of the fused LM head: [512, V] float32 logits, ~100 MB at GPT-2's vocabulary.


def _head_block(h_CxD, w_VxD, labels_C, weights_C, vocab_size, grads: bool):
  """One block of tokens through the LM head and the cross-entropy: (nll, correct) sums and, with
  `grads`, d(nll sum)/d h [C,D] and d(nll sum)/d w [V,D] (float32). `weights_C` is float32."""
  logits = head_logits(h_CxD, w_VxD, vocab_size)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  top = logits.max(-1, keepdims=True)
  exp = jnp.exp(logits - top)
  sum_exp = exp.sum(-1, keepdims=True)
  one_hot = iota == labels_C[:, None]
  label_logit = jnp.where(one_hot, logits, 0.0).sum(-1)
  nll = ((jnp.log(sum_exp[:, 0]) + top[:, 0] - label_logit) * weights_C).sum()
  correct = ((label_logit >= top[:, 0]).astype(jnp.float32) * weights_C).sum()
  if not grads:
    return nll, correct
  dlogits = ((exp / sum_exp - one_hot) * weights_C[:, None]).astype(h_CxD.dtype)  # softmax - one-hot, weighted.
  dh = dlogits @ w_VxD
  dw = jax.lax.dot_general(dlogits, h_CxD, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return nll, correct, dh, dw


def _head_blocks(h_NxD, w_VxD, labels_N, weights_N, vocab_size, grads: bool):
  """_head_block over the N tokens in blocks of at most HEAD_CHUNK (a lax.scan); the gradient of w
  is summed over blocks in float32. Rows added to fill the last block weigh 0."""
  n = h_NxD.shape[0]
  blocks = -(-n // HEAD_CHUNK)
  size = -(-n // blocks)
  pad = blocks * size - n
  if pad:
    h_NxD = jnp.pad(h_NxD, ((0, pad), (0, 0)))
    labels_N, weights_N = jnp.pad(labels_N, (0, pad)), jnp.pad(weights_N, (0, pad))
  xs = (h_NxD.reshape(blocks, size, -1), labels_N.reshape(blocks, size), weights_N.reshape(blocks, size))
  if not grads:
    _, (nll, correct) = jax.lax.scan(
      lambda c, x: (c, _head_block(x[0], w_VxD, x[1], x[2], vocab_size, False)), None, xs
    )
    return nll.sum(), correct.sum()

  def body(dw, x):
    nll, correct, dh, dw_block = _head_block(x[0], w_VxD, x[1], x[2], vocab_size, True)
    return dw + dw_block, (nll, correct, dh)

  dw, (nll, correct, dh) = jax.lax.scan(body, jnp.zeros(w_VxD.shape, jnp.float32), xs)
  return nll.sum(), correct.sum(), dh.reshape(blocks * size, -1)[:n], dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_xent(h_NxD, w_VxD, labels_N, weights_N, vocab_size):
  return _head_blocks(h_NxD, w_VxD, labels_N, weights_N, vocab_size, grads=False)


def _fused_xent_fwd(h_NxD, w_VxD, labels_N, weights_N, vocab_size):
  # The loss is a sum over tokens, so its gradient is known here: each block's gradient is taken
  # while its logits are at hand, and the [N,V] logits and their gradient never exist whole.
  nll, correct, dh, dw = _head_blocks(h_NxD, w_VxD, labels_N, weights_N, vocab_size, grads=True)
  return (nll, correct), (dh, dw, labels_N, weights_N)


def _fused_xent_bwd(vocab_size, res, g):
  dh, dw, labels_N, weights_N = res
  g_nll = g[0]  # `correct` is a count: no gradient.
  zero_labels = np.zeros(labels_N.shape, jax.dtypes.float0)
  # h and w share the compute dtype (fused_head_xent casts w), so dh's dtype is w's too.
  return (dh * g_nll).astype(dh.dtype), (dw * g_nll).astype(dh.dtype), zero_labels, jnp.zeros_like(weights_N)


_fused_xent.defvjp(_fused_xent_fwd, _fused_xent_bwd)


def fused_head_xent(h_BxTxD, w_VxD, labels, weights, vocab_size: int, mesh=None):
  """weighted_xent of the LM head's logits `h @ w.T`, without the [B,T,V] logits.

  The tokens go through the head in blocks of HEAD_CHUNK; each block's softmax gradient is turned
  into the gradients of h and w at once (custom VJP), so neither the logits nor their gradient is
  ever held whole: less memory, and the vocabulary-wide passes run on cache-sized blocks. Columns
  from `vocab_size` on are padding (head_logits). With a mesh of
  several devices the blocks run per device on its own rows (shard_map over the batch axes, `w`
  whole on each) and the sums, and the gradient of `w`, are summed over devices once.
  Returns (sum of weighted NLL, sum of weighted correct, sum of weights), float32.
  """
  w_VxD = w_VxD.astype(h_BxTxD.dtype)
  weights = weights.astype(jnp.float32)

  def local(h, w, labels, weights):
    nll, correct = _fused_xent(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), weights.reshape(-1), vocab_size)
    return jnp.stack([nll, correct, weights.sum()])

  batch_axes = tuple(a for a in ('data', 'fsdp') if mesh is not None and mesh.shape[a] > 1)
  if not batch_axes:
    sums = local(h_BxTxD, w_VxD, labels, weights)
  else:
    lead = P(batch_axes)
    sums = jax.shard_map(
      lambda *a: jax.lax.psum(local(*a), batch_axes), mesh=mesh, in_specs=(lead, P(), lead, lead), out_specs=P(),
      check_vma=False,
    )(h_BxTxD, w_VxD, labels, weights)  # fmt: skip
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


def head_logits(h, w_VxD, vocab_size: int):
  """A causal LM head's logits `h @ w.T` in float32 (h's dtype for the matmul); columns from
  `vocab_size` on (the padded vocabulary) at a large negative value."""
  logits = (h @ w_VxD.astype(h.dtype).T).astype(jnp.float32)
  if vocab_size == logits.shape[-1]:
    return logits
  real = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) < vocab_size
  return jnp.where(real, logits, PADDING_LOGIT * jnp.finfo(jnp.float32).max)


def causal_lm_loss(out: dict, batch: dict, norm: dict | None = None, mesh=None):
  """Next-token cross-entropy of a causal LM against `targets`, weighted by `loss_weights` (both [B,T]).

  `out` holds the logits [B,T,V], or the decoder's 'features' and 'head' (decoder.Decoder with
  logits=False, as steps.forward runs it): then the head runs here, fused with the cross-entropy
  (fused_head_xent). Vocabulary-parallel when the mesh's `tensor` axis is larger than 1."""
  norm = normalizers(batch) if norm is None else norm
  vocab_parallel = mesh is not None and mesh.shape['tensor'] > 1
  if 'logits' in out or vocab_parallel:
    logits = out['logits'] if 'logits' in out else head_logits(out['features'], out['head'], out['vocab_size'])
    args = (logits, batch['targets'], batch['loss_weights'])
    nll, correct, _ = vocab_parallel_xent(*args, mesh) if vocab_parallel else weighted_xent(*args)
  else:
    h, w = out['features'], out['head']
    nll, correct, _ = fused_head_xent(h, w, batch['targets'], batch['loss_weights'], out['vocab_size'], mesh)
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
