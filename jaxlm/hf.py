"""Hugging Face BERT directories <-> jaxlm parameters, both directions.

Reads a directory saved by transformers' `BertModel`, `BertForMaskedLM`, `BertForPreTraining`
or `BertForSequenceClassification` (config.json plus model.safetensors or pytorch_model.bin, or
the shards of either and their index) and writes one back that transformers loads with no
missing weight. The vocabulary tables are padded with zero rows to the model's `vocab_multiple`
on loading (`vocab_multiple=128` as a `load` override) and cut back to `vocab_size` rows on
writing. Every tensor is checked against the shape the model expects; a mismatch names the
file, the tensor and both shapes.
Nothing here imports TensorFlow; torch is imported only to read PyTorch weight files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlm import blocks
from jaxlm import model as model_lib
from jaxlm.errors import UsageError

log = logging.getLogger(__name__)

_HF_ACT = {
  'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu_fast': 'gelu_tanh', 'relu': 'relu', 'silu': 'silu', 'swish': 'silu',
}  # fmt: skip
_TO_HF_ACT = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'relu': 'relu', 'silu': 'silu'}
TOKENIZER_FILES = (
  'tokenizer.json', 'vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
  'chat_template.jinja',
)  # fmt: skip
# Tensors transformers keeps as buffers or ties; never reported as unused.
_IGNORED = ('embeddings.position_ids', 'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')


@dataclass
class LoadReport:
  """What a load used: parameters newly initialised and checkpoint tensors left unused."""

  missing: list[str] = field(default_factory=list)  # jaxlm parameter paths, initialised fresh.
  unused: list[str] = field(default_factory=list)  # Checkpoint tensor names nobody asked for.


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = 'config.json', **overrides) -> model_lib.ModelConfig:
  """A ModelConfig from a Hugging Face BertConfig dict; `overrides` win."""
  if hf.get('model_type', 'bert') != 'bert':
    raise UsageError(f'{source}: model_type={hf.get("model_type")!r} is not supported (only "bert")')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise UsageError(
      f'{source}: position_embedding_type={hf["position_embedding_type"]!r} is not supported (only "absolute")'
    )
  act = hf.get('hidden_act', 'gelu')
  if act not in _HF_ACT:
    raise UsageError(f'{source}: hidden_act={act!r} is not supported; expected one of {sorted(_HF_ACT)}')
  kw = dict(
    vocab_size=hf['vocab_size'],
    hidden_size=hf['hidden_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=hf['num_attention_heads'],
    intermediate_size=hf['intermediate_size'],
    max_position_embeddings=hf.get('max_position_embeddings', 512),
    type_vocab_size=hf.get('type_vocab_size', 2),
    hidden_act=_HF_ACT[act],
    layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
    hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
    attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
    initializer_range=hf.get('initializer_range', 0.02),
    pad_token_id=hf.get('pad_token_id') or 0,
    classifier_dropout=hf.get('classifier_dropout'),
  )
  kw.update(overrides)
  return model_lib.ModelConfig(**kw)


def architecture(cfg: model_lib.ModelConfig) -> str:
  """The transformers class whose parameters match the heads of `cfg`."""
  if cfg.num_labels:
    return 'BertForSequenceClassification'
  if cfg.mlm_head and cfg.nsp_head:
    return 'BertForPreTraining'
  if cfg.mlm_head:
    return 'BertForMaskedLM'
  return 'BertModel'


def config_to_hf(cfg: model_lib.ModelConfig, id2label: dict[int, str] | None = None) -> dict:
  """A Hugging Face BertConfig dict for `cfg`."""
  hf = {
    'architectures': [architecture(cfg)],
    'model_type': 'bert',
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.hidden_size,
    'num_hidden_layers': cfg.num_layers,
    'num_attention_heads': cfg.num_heads,
    'intermediate_size': cfg.intermediate_size,
    'max_position_embeddings': cfg.max_position_embeddings,
    'type_vocab_size': cfg.type_vocab_size,
    'hidden_act': _TO_HF_ACT[cfg.hidden_act],
    'layer_norm_eps': cfg.layer_norm_eps,
    'hidden_dropout_prob': cfg.hidden_dropout,
    'attention_probs_dropout_prob': cfg.attention_dropout,
    'initializer_range': cfg.initializer_range,
    'pad_token_id': cfg.pad_token_id,
    'position_embedding_type': 'absolute',
    'classifier_dropout': cfg.classifier_dropout,
    'tie_word_embeddings': True,
  }
  if cfg.num_labels:
    labels = id2label or {i: f'LABEL_{i}' for i in range(cfg.num_labels)}
    hf['id2label'] = {str(i): str(v) for i, v in labels.items()}
    hf['label2id'] = {str(v): int(i) for i, v in labels.items()}
    hf['problem_type'] = 'regression' if cfg.num_labels == 1 else 'single_label_classification'
  return hf


# ----------------------------------------------------------------------------- tensor names

# Per-layer tensors: jaxlm name -> (HF name inside encoder.layer.{i}., to jaxlm, to HF).
# HF Linear weights are [out, in]; ours are [in, ...out] with heads split out.


def _layer_map(cfg: model_lib.ModelConfig):
  D, N, K = cfg.hidden_size, cfg.num_heads, cfg.head_size
  m = {}
  for n, hf in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    m[f'{n}_kernel'] = (f'attention.self.{hf}.weight', lambda w: w.T.reshape(D, N, K), lambda w: w.reshape(D, N * K).T)
    m[f'{n}_bias'] = (f'attention.self.{hf}.bias', lambda b: b.reshape(N, K), lambda b: b.reshape(N * K))
  ident, tr = (lambda x: x), (lambda w: w.T)
  m['o_kernel'] = ('attention.output.dense.weight', lambda w: w.T.reshape(N, K, D), lambda w: w.reshape(N * K, D).T)
  m['o_bias'] = ('attention.output.dense.bias', ident, ident)
  m['attn_ln_scale'] = ('attention.output.LayerNorm.weight', ident, ident)
  m['attn_ln_bias'] = ('attention.output.LayerNorm.bias', ident, ident)
  m['wi_kernel'] = ('intermediate.dense.weight', tr, tr)
  m['wi_bias'] = ('intermediate.dense.bias', ident, ident)
  m['wo_kernel'] = ('output.dense.weight', tr, tr)
  m['wo_bias'] = ('output.dense.bias', ident, ident)
  m['mlp_ln_scale'] = ('output.LayerNorm.weight', ident, ident)
  m['mlp_ln_bias'] = ('output.LayerNorm.bias', ident, ident)
  return m  # fmt: skip


def _flat_map(cfg: model_lib.ModelConfig, prefix: str):
  """Non-layer tensors: jaxlm path -> (HF name, to jaxlm, to HF)."""
  ident, tr = (lambda x: x), (lambda w: w.T)
  p = prefix
  m = {
    ('embeddings', 'word'): (f'{p}embeddings.word_embeddings.weight', ident, ident),
    ('embeddings', 'position'): (f'{p}embeddings.position_embeddings.weight', ident, ident),
    ('embeddings', 'token_type'): (f'{p}embeddings.token_type_embeddings.weight', ident, ident),
    ('embeddings', 'ln_scale'): (f'{p}embeddings.LayerNorm.weight', ident, ident),
    ('embeddings', 'ln_bias'): (f'{p}embeddings.LayerNorm.bias', ident, ident),
  }
  if cfg.pooler:
    m[('pooler', 'kernel')] = (f'{p}pooler.dense.weight', tr, tr)
    m[('pooler', 'bias')] = (f'{p}pooler.dense.bias', ident, ident)
  if cfg.mlm_head:
    m[('mlm', 'transform', 'kernel')] = ('cls.predictions.transform.dense.weight', tr, tr)
    m[('mlm', 'transform', 'bias')] = ('cls.predictions.transform.dense.bias', ident, ident)
    m[('mlm', 'ln_scale')] = ('cls.predictions.transform.LayerNorm.weight', ident, ident)
    m[('mlm', 'ln_bias')] = ('cls.predictions.transform.LayerNorm.bias', ident, ident)
    m[('mlm', 'bias')] = ('cls.predictions.bias', ident, ident)
  if cfg.nsp_head:
    m[('nsp', 'kernel')] = ('cls.seq_relationship.weight', tr, tr)
    m[('nsp', 'bias')] = ('cls.seq_relationship.bias', ident, ident)
  if cfg.num_labels:
    m[('classifier', 'kernel')] = ('classifier.weight', tr, tr)
    m[('classifier', 'bias')] = ('classifier.bias', ident, ident)
  return m


def _normalise_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old TF-converted checkpoints say LayerNorm.gamma/beta; the decoder bias may stand alone."""
  out = {}
  for k, v in tensors.items():
    k = k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    out[k] = v
  if 'cls.predictions.bias' not in out and 'cls.predictions.decoder.bias' in out:
    out['cls.predictions.bias'] = out['cls.predictions.decoder.bias']
  return out


def _prefix(tensors) -> str:
  return 'bert.' if any(k.startswith('bert.') for k in tensors) else ''


# ----------------------------------------------------------------------------- reading


# One file, or the shards that an index names (what transformers writes for a large model), safetensors first.
WEIGHT_FILES = (
  ('model.safetensors', 'model.safetensors.index.json'), ('pytorch_model.bin', 'pytorch_model.bin.index.json'),
)  # fmt: skip


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of an HF directory as numpy arrays, and the file they came from (a sharded one's index)."""
  for single, index in WEIGHT_FILES:
    if os.path.exists(os.path.join(path, single)):
      return _read_weights(os.path.join(path, single)), os.path.join(path, single)
    if os.path.exists(os.path.join(path, index)):
      return _read_shards(path, os.path.join(path, index)), os.path.join(path, index)
  raise UsageError(f'{path}: no model.safetensors or pytorch_model.bin, nor the index of a sharded one')


def _read_weights(file: str) -> dict[str, np.ndarray]:
  if file.endswith('.safetensors'):
    return {k: np.asarray(v) for k, v in load_file(file).items()}
  try:
    import torch  # lazy: optional (the test extra), needed only for a pytorch_model.bin
  except ImportError as e:
    raise UsageError(f'{file}: reading a PyTorch weight file needs torch (pip install torch)') from e
  sd = torch.load(file, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _read_shards(path: str, index: str) -> dict[str, np.ndarray]:
  """The tensors of every shard that `index`'s weight_map names, each checked to be in the shard named for it."""
  try:
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    shards = sorted(set(weight_map.values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UsageError(f'{index}: not a weight index (a JSON object with a "weight_map" of tensor: file)') from e
  tensors, where = {}, {}
  for shard in shards:
    file = os.path.join(path, shard)
    if not os.path.exists(file):
      raise UsageError(f'{index}: names the shard {shard}, which is not in {path}')
    for name, value in _read_weights(file).items():
      tensors[name], where[name] = value, shard
  wrong = sorted(n for n, shard in weight_map.items() if where.get(n) != shard)
  if wrong:
    raise UsageError(f'{index}: {wrong[0]} is not in {weight_map[wrong[0]]}, the shard the index names for it')
  return tensors


SUPPORTED_ARCHITECTURES = ('BertModel', 'BertForMaskedLM', 'BertForPreTraining', 'BertForSequenceClassification')


def read_config(path: str, supported: tuple[str, ...] = SUPPORTED_ARCHITECTURES) -> dict:
  """config.json of an HF directory, checked to be one of the `supported` architectures."""
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isdir(path):
    raise UsageError(f'{path}: no such directory')
  if not os.path.exists(cfg_path):
    raise UsageError(f'{cfg_path}: missing (not a Hugging Face model directory)')
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise UsageError(f'{cfg_path}: not valid JSON ({e})') from e
  for arch in cfg.get('architectures') or []:
    if arch not in supported:
      raise UsageError(f'{cfg_path}: architecture {arch!r} is not supported; expected one of {supported}')
  return cfg


def heads_in(tensors: dict[str, np.ndarray], hf: dict) -> dict:
  """The head settings that match what a checkpoint holds."""
  prefix = _prefix(tensors)
  kw = {
    'pooler': f'{prefix}pooler.dense.weight' in tensors,
    'mlm_head': 'cls.predictions.transform.dense.weight' in tensors,
    'nsp_head': 'cls.seq_relationship.weight' in tensors,
    'num_labels': 0,
  }
  if 'classifier.weight' in tensors:
    kw['num_labels'] = int(tensors['classifier.weight'].shape[0])
  return kw


def params_from_hf(
  tensors: dict[str, np.ndarray], cfg: model_lib.ModelConfig, seed: int = 0, source: str = 'checkpoint'
) -> tuple[nnx.GraphDef, nnx.State, LoadReport]:
  """Builds the model for `cfg` and fills it from HF tensors; returns (graphdef, params, report)."""
  tensors = _normalise_names(tensors)
  graphdef, params = model_lib.abstract(cfg)  # Filled below; fresh values only where missing.
  flat = dict(nnx.to_flat_state(params))
  prefix = _prefix(tensors)
  used, report, missing = set(), LoadReport(), []

  def fetch(hf_name, path, to_jax):
    var = flat[path]
    if hf_name not in tensors:
      missing.append(path)
      return
    value = np.asarray(to_jax(np.asarray(tensors[hf_name], np.float32)))
    value = blocks.fit_vocab(value, var.get_metadata()['axes'], cfg)  # Zero rows up to vocab_multiple.
    if value.shape != var.shape:
      raise UsageError(
        f'{source}: {hf_name} has shape {tuple(tensors[hf_name].shape)}, which does not fit'
        f' {"/".join(map(str, path))} of shape {tuple(var.shape)} (converted: {value.shape})'
      )
    var.set_value(jnp.asarray(value))
    used.add(hf_name)

  for path, (hf_name, to_jax, _) in _flat_map(cfg, prefix).items():
    fetch(hf_name, path, to_jax)
  for name, (hf_suffix, to_jax, _) in _layer_map(cfg).items():
    var = flat[('layers', name)]
    names = [f'{prefix}encoder.layer.{i}.{hf_suffix}' for i in range(cfg.num_layers)]
    present = [n in tensors for n in names]
    if not any(present):
      missing.append(('layers', name))
      continue
    if not all(present):
      raise UsageError(f'{source}: {names[present.index(False)]} is missing (other layers have it)')
    slices = []
    for n in names:
      v = np.asarray(to_jax(np.asarray(tensors[n], np.float32)))
      if v.shape != var.shape[1:]:
        raise UsageError(
          f'{source}: {n} has shape {tuple(tensors[n].shape)}, which does not fit layers/{name}'
          f' of shape {tuple(var.shape[1:])} per layer'
        )
      slices.append(v)
    var.set_value(jnp.asarray(np.stack(slices)))
    used.update(names)
  extra_layers = f'{prefix}encoder.layer.{cfg.num_layers}.'
  if any(k.startswith(extra_layers) for k in tensors):
    raise UsageError(f'{source}: holds more than num_hidden_layers={cfg.num_layers} layers')
  encoder_missing = [p for p in missing if p[0] in ('embeddings', 'layers')]
  if encoder_missing:
    names = ', '.join('/'.join(map(str, p)) for p in encoder_missing)
    raise UsageError(f'{source}: the encoder is incomplete, no tensor for {names}')
  missing += [('layers', name) for name in model_lib.adapter_names(cfg)]  # A BERT has no bottleneck adapters.
  if missing:  # Heads and adapters only: freshly initialised, and reported.
    fresh = dict(nnx.to_flat_state(model_lib.init(cfg, seed)[1]))
    for path in missing:
      flat[path].set_value(fresh[path][...])
  report.missing = ['/'.join(map(str, p)) for p in missing]
  report.unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED))
  return graphdef, params, report


def load(path: str, seed: int = 0, **overrides) -> tuple[nnx.GraphDef, nnx.State, dict, LoadReport]:
  """Loads an HF BERT directory: (graphdef, params, hf config dict, report).

  Heads follow what the checkpoint holds unless `overrides` set them (e.g. `num_labels=3` for
  a fresh classifier); parameters the checkpoint lacks are initialised and listed in the report.
  """
  hf = read_config(path)
  tensors, source = read_tensors(path)
  heads = heads_in(tensors, hf)
  heads.update(overrides)
  if (heads['num_labels'] or heads['nsp_head']) and 'pooler' not in overrides:
    heads['pooler'] = True  # Those heads read the pooled [CLS]; a fresh pooler if the checkpoint has none.
  cfg = config_from_hf(hf, os.path.join(path, 'config.json'), **heads)
  graphdef, params, report = params_from_hf(tensors, cfg, seed, source)
  if report.missing:
    log.info('%s: newly initialised: %s', path, ', '.join(report.missing))
  if report.unused:
    log.info('%s: unused tensors: %s', path, ', '.join(report.unused))
  return graphdef, params, hf, report


# ----------------------------------------------------------------------------- writing


def params_to_hf(params: nnx.State, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """HF tensor dict (names as the transformers class of `architecture(cfg)` saves them)."""
  if cfg.quantization != 'none':
    raise UsageError(f'model.quantization={cfg.quantization!r}: dequantize first (quant.dequantize)')
  if cfg.adapter_size:
    raise UsageError(
      f"adapter_size={cfg.adapter_size}: the model has bottleneck adapters, which transformers' BERT has no"
      ' layers for; drop them first (peft.drop_adapters) or keep the jaxlm format'
    )
  # Hugging Face tables have vocab_size rows: the padding rows (vocab_multiple) are cut.
  flat = {
    path: blocks.vocab_rows(np.asarray(v[...], np.float32), v.get_metadata().get('axes', ()), cfg.vocab_size)
    for path, v in nnx.to_flat_state(params)
  }
  prefix = 'bert.' if architecture(cfg) != 'BertModel' else ''
  out = {}
  for path, (hf_name, _, to_hf) in _flat_map(cfg, prefix).items():
    out[hf_name] = to_hf(flat[path])
  for name, (hf_suffix, _, to_hf) in _layer_map(cfg).items():
    for i in range(cfg.num_layers):
      out[f'{prefix}encoder.layer.{i}.{hf_suffix}'] = to_hf(flat[('layers', name)][i])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(
  out_dir: str,
  params: nnx.State,
  cfg: model_lib.ModelConfig,
  tokenizer_dir: str | None = None,
  id2label: dict[int, str] | None = None,
  dtype: str = 'float32',
) -> None:
  """Writes config.json, model.safetensors (its tensors in `dtype`) and the tokenizer files to `out_dir`."""
  write_weights(out_dir, params_to_hf(params, cfg), config_to_hf(cfg, id2label), dtype)
  copy_tokenizer_files(tokenizer_dir, out_dir)


# The tensor types of a Hugging Face export: float32 as trained, or half the size in 16 bits (what a model hub
# usually holds; transformers loads it in that type, or in float32 with dtype=torch.float32).
DTYPES = ('float32', 'bfloat16', 'float16')


def write_weights(out_dir: str, tensors: dict[str, np.ndarray], config: dict, dtype: str = 'float32') -> None:
  """config.json (naming `dtype`, as transformers does) and model.safetensors with `tensors` in `dtype`."""
  if dtype not in DTYPES:
    raise UsageError(f'--dtype {dtype}: expected one of {DTYPES}')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump({**config, 'dtype': dtype, 'torch_dtype': dtype}, f, indent=2)  # transformers 5 and 4's names.
  cast = {k: v.astype(jnp.dtype(dtype)) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
  save_file(cast, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})


def copy_tokenizer_files(tokenizer_dir: str | None, out_dir: str) -> None:
  """Copies the tokenizer files (TOKENIZER_FILES) of `tokenizer_dir`, if any, into `out_dir`."""
  if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
