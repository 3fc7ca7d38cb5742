"""Masked-LM pretraining (Devlin et al. 2019), with optional next-sentence prediction (data.nsp).

Batches come from data/pretrain.py (packed, dynamically masked; with data.separate_documents also
segment_ids and position_ids, which steps.forward hands to the model); the loss is losses.mlm_loss,
vocabulary-parallel when mesh.tensor > 1. Evaluation runs the same loss with unit normalizers
(sums of loss and correct predictions per batch), divided by the whole eval set's weights.
"""

from __future__ import annotations

import functools

from jaxlm import losses
from jaxlm.data import pretrain
from jaxlm.errors import UsageError
from jaxlm.tasks import Task, register

_UNIT = {'mlm': 1.0, 'nsp': 1.0}  # Normalizers that turn the loss's means into sums.


@register
class MaskedLM(Task):
  name = 'mlm'

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    d = config.data
    self.predictions = d.max_predictions
    self._data_kw = dict(
      seq_len=d.seq_len, max_predictions=d.max_predictions, global_batch_size=config.global_batch_size,
      mask_prob=d.mask_prob, nsp=d.nsp, whole_word=d.whole_word_masking, separate_documents=d.separate_documents,
      data_cfg=d.to_dict(), **self.shard,
    )  # fmt: skip

  @classmethod
  def check_config(cls, config) -> None:
    d = config.data
    if not 0.0 < d.mask_prob < 1.0:
      raise UsageError(f'data.mask_prob={d.mask_prob}: must be between 0 and 1')
    if d.max_predictions > d.seq_len - 2:
      raise UsageError(
        f'data.max_predictions={d.max_predictions} exceeds the maskable tokens of data.seq_len={d.seq_len}'
        f' ([CLS] and [SEP] are never masked): at most {d.seq_len - 2}'
      )
    pretrain.check_options(d.nsp, d.separate_documents)
    if d.pack_examples:
      raise UsageError('data.pack_examples=True packs causal LM examples (task=sft); masked-LM pretraining packs its'
                       ' documents already (data.separate_documents keeps them apart)')  # fmt: skip

  def heads(self) -> dict:
    nsp = self.config.data.nsp
    return dict(mlm_head=True, nsp_head=nsp, pooler=nsp, num_labels=0)

  def train_dataset(self, seed: int):
    d = self.config.data
    return pretrain.pretrain_dataset(d.train, self.tokenizer, seed=seed, shuffle_buffer=d.shuffle_buffer,
                                     **self._data_kw)  # fmt: skip

  def eval_sets(self) -> dict[str, list[dict]]:
    c = self.config
    return {'': pretrain.eval_batches(c.data.eval, self.tokenizer, seed=c.seed + 1, **self._data_kw)}

  def loss_fn(self, mesh):
    return functools.partial(losses.mlm_loss, mesh=mesh)

  def eval_step(self, out: dict, batch: dict, mesh) -> dict:
    _, sums = losses.mlm_loss(out, batch, _UNIT, mesh=mesh)
    weights = {'mlm': batch['masked_weights'].sum()}
    if 'nsp_labels' in batch:
      weights['nsp'] = batch['nsp_weights'].sum() if 'nsp_weights' in batch else batch['nsp_labels'].size * 1.0
    return {'sums': {k: v for k, v in sums.items() if k != 'loss'}, 'weights': weights}

  def summarize(self, split: str, outputs: list[dict]) -> dict[str, float]:
    totals = {k: sum(float(o['sums'][k]) for o in outputs) for k in outputs[0]['sums']}
    weights = {k: sum(float(o['weights'][k]) for o in outputs) for k in outputs[0]['weights']}
    out = {k: v / max(weights['nsp' if k.startswith('nsp') else 'mlm'], 1.0) for k, v in totals.items()}
    out['loss'] = out['mlm_loss'] + out.get('nsp_loss', 0.0)
    return out
