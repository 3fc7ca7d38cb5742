"""The two model families side by side: the one place that tells an encoder from a decoder.

  encoder   model.py: BERT (ModelConfig, presets tiny ... large), masked LM and classifier heads
  decoder   decoder.py: GPT-2 / Llama-shaped causal LMs (DecoderConfig, presets gpt2-tiny ... llama-7b)

A run's `config.model.preset` names a preset of either family; everything that builds, initialises
or reads back a model of either kind goes through here (the trainer, the store). A saved model
config (checkpoint metadata, model_config.json) says its family: a decoder's dict has a `family`
field ('gpt2' / 'llama'), an encoder's has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jaxlm import decoder, model
from jaxlm.errors import UsageError

Config = model.ModelConfig | decoder.DecoderConfig
FAMILIES = ('encoder', 'decoder')


def family_of_preset(name: str) -> str:
  """'encoder' or 'decoder' for a preset name; one error naming model.preset for an unknown one."""
  if name in model.PRESETS:
    return 'encoder'
  if name in decoder.PRESETS:
    return 'decoder'
  raise UsageError(f'model.preset={name!r}: expected one of {sorted(model.PRESETS) + sorted(decoder.PRESETS)}')


def presets(family: str) -> dict[str, Config]:
  """The presets of a family."""
  return decoder.PRESETS if family == 'decoder' else model.PRESETS


def a(family: str) -> str:
  """'an encoder' / 'a decoder', for messages."""
  return f'an {family}' if family == 'encoder' else f'a {family}'


def family(cfg: Config) -> str:
  """'encoder' or 'decoder' for a model config."""
  return 'decoder' if isinstance(cfg, decoder.DecoderConfig) else 'encoder'


def from_config(m, vocab_size: int = 1, **fields: Any) -> Config:
  """The model config of a run's `config.model` part, of the preset's family: the preset, the keys that
  override it, the tokenizer's `vocab_size` and the task's `fields` (heads, special token ids)."""
  if family_of_preset(m.preset) == 'encoder':
    return model.from_config(m, vocab_size, **fields)
  if m.attention_dropout:
    raise UsageError(f'model.attention_dropout={m.attention_dropout}: decoders have no attention dropout; set 0.0')
  kw = dict(
    vocab_size=vocab_size, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
    attention_impl=m.attention_impl or None, hidden_dropout=m.hidden_dropout,
    max_position_embeddings=m.max_position_embeddings, vocab_multiple=m.vocab_multiple, **fields,
  )  # fmt: skip
  if m.hidden_act:
    kw['hidden_act'] = m.hidden_act
  return decoder.preset(m.preset, **kw)


def config_from_dict(d: dict, overrides: dict | None = None, lenient: bool = False) -> Config:
  """A saved model config dict (with `overrides`) as the config of its family. `lenient`: overrides the
  family has no field for are left out (the caller checks the family), else they are an error."""
  cls = decoder.DecoderConfig if 'family' in d else model.ModelConfig
  names = {f.name for f in dataclasses.fields(cls)}
  overrides = dict(overrides or {})
  unknown = sorted(k for k in overrides if k not in names)
  if unknown and not lenient:
    raise UsageError(f'{unknown[0]}: not a field of a {"decoder" if "family" in d else "BERT encoder"} config')
  return cls(**{**d, **{k: v for k, v in overrides.items() if k in names}})


def abstract(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs with their axes metadata), allocating nothing."""
  return (decoder if family(cfg) == 'decoder' else model).abstract(cfg)


def init(cfg: Config, seed: int = 0, out_shardings=None) -> tuple[nnx.GraphDef, nnx.State]:
  """A fresh model, split into (graphdef, params); jitted, so `out_shardings` can place it."""
  return (decoder if family(cfg) == 'decoder' else model).init(cfg, seed, out_shardings)


def fresh_params(cfg: Config, seed: int = 0) -> nnx.State:
  """A fresh model's parameters, made in the calling (jitted) function."""
  cls = decoder.Decoder if family(cfg) == 'decoder' else model.Bert
  return nnx.split(cls(cfg, rngs=nnx.Rngs(seed)))[1]


count_params = model.count_params
