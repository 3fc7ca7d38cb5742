"""Causal language modelling with a decoder (decoder.py): pretraining (task=causal_lm) and supervised
fine-tuning on prompt / response pairs (task=sft).

  causal_lm  data.train / data.eval are text sources; documents are tokenized, each followed by the
             end-of-text token, and packed into rows of data.seq_len (data/causal.py); with
             data.separate_documents no token attends across documents (segment_ids, position_ids)
  sft        data.train / data.eval are prompt / response records (jsonl:, csv:, tsv:, parquet:, hf: or tfds:;
             fields data.prompt_field, data.response_field), one per row (with data.pack_examples several a
             training row, each attending only to itself: segment_ids, position_ids); only the response's
             tokens (and its end-of-text) weigh in the loss. Or, with data.messages_field, conversations
             rendered by the tokenizer's chat template (data.chat_template, or the one init_from's
             tokenizer ships), the loss on the assistant's turns. Starts from model.init_from (a Hugging
             Face GPT-2 / Llama directory or a jaxlm run), so finetune.mode (full, lora, head) applies.
             A batch is cut to the smallest of data.bucket_lengths that holds its weighted targets

The loss is losses.causal_lm_loss: next-token cross-entropy weighted by loss_weights, vocabulary-
parallel when mesh.tensor > 1. Evaluation runs it with a unit normalizer (sums per batch), divided
by the whole eval set's weights: eval_loss, eval_perplexity = exp(eval_loss) and eval_accuracy.
"""

from __future__ import annotations

import functools
import math

from jaxlm import losses
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import split_spec
from jaxlm.data import causal, classify
from jaxlm.errors import UsageError
from jaxlm.tasks import Task, register

_UNIT = {'lm': 1.0}  # A normalizer that turns the loss's mean into a sum.
_RECORD_KINDS = ('jsonl', 'csv', 'tsv', 'parquet', 'hf', 'tfds')


@register
class CausalLM(Task):
  name = 'causal_lm'
  family = 'decoder'

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if tokenizer.kind != 'bpe' or tokenizer.eos_id is None:
      key = 'data.tokenizer' if config.data.tokenizer else 'model.init_from'
      raise UsageError(f'{key}: the tokenizer ({tokenizer.source}) is {tokenizer.kind} without an end-of-text'
                       f' token; task={config.task!r} needs a byte-level BPE (data.train_tokenizer_vocab trains one)')  # fmt: skip
    d = config.data
    self.predictions = d.seq_len  # Every position pays for the LM head.
    self._data_kw = dict(seq_len=d.seq_len, global_batch_size=config.global_batch_size, data_cfg=d.to_dict(),
                         **self.shard)  # fmt: skip

  @classmethod
  def check_config(cls, config) -> None:
    d = config.data
    if d.nsp:
      raise UsageError(f'data.nsp=True is for masked-LM pretraining; task={config.task!r}')
    if d.pack_examples and not cls.finetuning:
      raise UsageError(f'data.pack_examples=True packs fine-tuning examples (task=sft); task={config.task!r} packs'
                       ' its documents already (data.separate_documents keeps them apart)')  # fmt: skip
    if d.tokenizer:  # Cheap to read: a WordPiece vocabulary is refused before any work.
      tok = tokenizer_lib.load(d.tokenizer)
      if tok.kind != 'bpe' or tok.eos_id is None:
        raise UsageError(f'data.tokenizer={d.tokenizer!r}: a {tok.kind} vocabulary without an end-of-text token;'
                         f' task={config.task!r} needs a byte-level BPE (tools/train_tokenizer.py --kind bpe)')  # fmt: skip

  def heads(self) -> dict:
    t = self.tokenizer
    return dict(bos_token_id=t.bos_id, eos_token_id=t.eos_id, pad_token_id=t.pad_id)

  def train_dataset(self, seed: int):
    d = self.config.data
    return causal.causal_dataset(d.train, self.tokenizer, seed=seed, shuffle_buffer=d.shuffle_buffer,
                                 separate_documents=d.separate_documents, **self._data_kw)  # fmt: skip

  def eval_sets(self) -> dict[str, list[dict]]:
    d = self.config.data
    return {'': causal.eval_batches(d.eval, self.tokenizer, separate_documents=d.separate_documents, **self._data_kw)}

  def loss_fn(self, mesh):
    return functools.partial(losses.causal_lm_loss, mesh=mesh)

  def eval_step(self, out: dict, batch: dict, mesh) -> dict:
    _, sums = losses.causal_lm_loss(out, batch, _UNIT, mesh=mesh)
    return {'sums': sums, 'weight': batch['loss_weights'].sum()}

  def summarize(self, split: str, outputs: list[dict]) -> dict[str, float]:
    weight = max(sum(float(o['weight']) for o in outputs), 1.0)
    out = {k: sum(float(o['sums'][k]) for o in outputs) / weight for k in outputs[0]['sums']}
    out['perplexity'] = math.exp(min(out['loss'], 700.0))  # exp overflows a float past ~709.
    return out


@register
class SFT(CausalLM):
  name = 'sft'
  finetuning = True

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    d = config.data
    if d.messages_field and tokenizer.chat_template is None:
      raise UsageError(f'data.messages_field={d.messages_field!r}: the tokenizer ({tokenizer.source}) has no chat'
                       ' template to render conversations with; name one in data.chat_template')  # fmt: skip
    self._data_kw.update(prompt_field=d.prompt_field, response_field=d.response_field, messages_field=d.messages_field,
                         buckets=self.batch_lengths())  # fmt: skip

  @classmethod
  def check_config(cls, config) -> None:
    super().check_config(config)
    d = config.data
    if d.separate_documents:
      raise UsageError(f'data.separate_documents=True is for pretraining; task={config.task!r} has one example a row')
    classify.check_config(d.to_dict())  # data.bucket_lengths
    for key in ('train', 'eval'):
      spec = d[key]
      if spec and split_spec(spec, f'data.{key}')[0] not in _RECORD_KINDS:
        raise UsageError(f'data.{key}={spec!r}: supervised fine-tuning reads prompt / response records'
                         f' ({", ".join(k + ":" for k in _RECORD_KINDS)}), e.g. jsonl:/data/*.jsonl')  # fmt: skip
    if not (config.model.init_from or d.tokenizer):
      raise UsageError('model.init_from is empty: supervised fine-tuning starts from a causal LM (a Hugging Face'
                       ' GPT-2 / Llama directory or a jaxlm run)')  # fmt: skip

  def batch_lengths(self) -> tuple[int, ...]:
    return classify.bucket_lengths(self.config.data.to_dict(), self.config.data.seq_len)

  def train_dataset(self, seed: int):
    d = self.config.data
    return causal.sft_dataset(d.train, self.tokenizer, seed=seed, shuffle_buffer=d.shuffle_buffer,
                              pack=d.pack_examples, **self._data_kw)  # fmt: skip

  def eval_sets(self) -> dict[str, list[dict]]:
    return {'': causal.sft_eval_batches(self.config.data.eval, self.tokenizer, **self._data_kw)}
