"""Hugging Face causal-LM directories <-> jaxlm decoder parameters, both directions.

Reads a directory saved by transformers' `GPT2LMHeadModel` / `GPT2Model`, `LlamaForCausalLM` /
`LlamaModel`, or the Llama-shaped `MistralForCausalLM` and `Qwen2ForCausalLM` (and their base models)
(config.json plus model.safetensors or pytorch_model.bin, or their shards: `hf.read_tensors`) and
writes one back, of the model type it came from, that transformers loads with no missing weight.
Qwen2's query, key and value biases are the decoder's `qkv_bias`. A sliding attention window (Mistral's
`sliding_window`, Qwen2's with `use_sliding_window`) lets no token see further back than the window,
which only sequences longer than it reach: such a model loads with max_position_embeddings cut to the
window, where its attention is the plain causal one, and exports so (`sliding_window: null`). GPT-2's
fused `c_attn` Conv1D is split into the query, key and value kernels; Llama's [out, in] Linear
weights are transposed into jaxlm's [in, heads, head size] layout (the rotate-half rotary form is the same on both sides, so the
query and key kernels need no permutation). Vocabulary tables are padded to the model's
`vocab_multiple` on loading and cut back on writing; every tensor is checked against the shape
the model expects, and a mismatch names the file, the tensor and both shapes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from jaxlm import blocks, decoder
from jaxlm import hf as hf_bert
from jaxlm.errors import UsageError

MODEL_TYPES = ('gpt2', 'llama', 'mistral', 'qwen2')
_CLASSES = {'gpt2': 'GPT2', 'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2'}  # transformers' class prefixes.
ARCHITECTURES = ('GPT2LMHeadModel', 'GPT2Model', 'LlamaForCausalLM', 'LlamaModel', 'MistralForCausalLM', 'MistralModel',
                 'Qwen2ForCausalLM', 'Qwen2Model')  # fmt: skip
_GPT2_ACT = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh', 'gelu': 'gelu',
             'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}  # fmt: skip
_TO_GPT2_ACT = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu', 'silu': 'silu'}
# Buffers old GPT-2 checkpoints hold; never reported as unused.
_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')


def is_causal_dir(path: str) -> bool:
  """True for a Hugging Face directory whose config.json names a causal LM of MODEL_TYPES."""
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    return False
  try:
    with open(cfg_path) as f:
      return json.load(f).get('model_type') in MODEL_TYPES
  except (OSError, ValueError):
    return False  # The BERT reader names what is wrong with it.


def _rope(hf: dict, source: str) -> dict:
  """The rotary fields of a LlamaConfig dict (`rope_parameters`, or the older `rope_scaling` + `rope_theta`)."""
  rp = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rp.get('rope_type', rp.get('type', 'default'))
  out = dict(rope_theta=float(rp.get('rope_theta', hf.get('rope_theta', 10000.0))))
  if kind == 'default':
    return out
  if kind not in ('linear', 'llama3'):
    raise UsageError(f'{source}: rope type {kind!r} is not supported (the default, "linear" or "llama3")')

  def need(key):
    if key not in rp:
      raise UsageError(f'{source}: the {kind!r} rotary scaling has no {key!r}')
    return rp[key]

  out.update(rope_scaling=kind, rope_factor=float(need('factor')))
  if kind == 'llama3':
    out.update(rope_low_freq_factor=float(need('low_freq_factor')),
               rope_high_freq_factor=float(need('high_freq_factor')),
               rope_original_max_positions=int(need('original_max_position_embeddings')))  # fmt: skip
  return out


def _rope_to_hf(cfg: decoder.DecoderConfig) -> dict:
  """`rope_parameters` (transformers 5) and, for a scaled one, `rope_scaling` (transformers 4) of `cfg`."""
  rp = {'rope_type': 'default' if cfg.rope_scaling == 'none' else cfg.rope_scaling, 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'none':
    return dict(rope_theta=cfg.rope_theta, rope_parameters=rp)
  rp['factor'] = cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    rp.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
              original_max_position_embeddings=cfg.rope_original_max_positions)  # fmt: skip
  return dict(
    rope_theta=cfg.rope_theta, rope_parameters=rp, rope_scaling={k: v for k, v in rp.items() if k != 'rope_theta'}
  )


def _ids(value) -> list[int]:
  """An `eos_token_id` of a Hugging Face config: one id, a list of them, or None."""
  return [] if value is None else list(value) if isinstance(value, list) else [value]


def _window(hf: dict, kind: str) -> int | None:
  """The sliding attention window of a Mistral / Qwen2 config, or None when every layer attends to all before."""
  if kind == 'mistral':
    return hf.get('sliding_window', 4096)  # MistralConfig's default when the key is absent.
  if kind == 'qwen2' and hf.get('use_sliding_window'):
    first = hf.get('max_window_layers', 28)  # Qwen2Config: the layers from this one on slide, unless layer_types says.
    types = hf.get('layer_types') or ['sliding_attention' for i in range(hf['num_hidden_layers']) if i >= first]
    return hf.get('sliding_window', 4096) if 'sliding_attention' in types else None
  return None


def config_from_hf(hf: dict, source: str = 'config.json', **overrides) -> decoder.DecoderConfig:
  """A DecoderConfig from a GPT2Config, LlamaConfig, MistralConfig or Qwen2Config dict; `overrides` win."""
  kind = hf.get('model_type')
  eos = _ids(hf.get('eos_token_id'))  # Several in instruct models: the end of text and of a turn.
  common = dict(vocab_size=hf['vocab_size'], bos_token_id=hf.get('bos_token_id'), eos_token_id=(eos or [None])[0],
                stop_token_ids=tuple(eos[1:]),
                pad_token_id=hf.get('pad_token_id'), initializer_range=hf.get('initializer_range', 0.02))  # fmt: skip
  if kind == 'gpt2':
    act = hf.get('activation_function', 'gelu_new')
    if act not in _GPT2_ACT:
      raise UsageError(f'{source}: activation_function={act!r} is not supported')
    for key in ('scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn'):
      if hf.get(key):
        raise UsageError(f'{source}: {key}=true is not supported')
    kw = dict(family='gpt2', hidden_size=hf['n_embd'], num_layers=hf['n_layer'], num_heads=hf['n_head'],
              intermediate_size=hf.get('n_inner') or 4 * hf['n_embd'], max_position_embeddings=hf['n_positions'],
              norm_eps=hf.get('layer_norm_epsilon', 1e-5), hidden_act=_GPT2_ACT[act],
              tie_embeddings=hf.get('tie_word_embeddings', True), **common)  # fmt: skip
  elif kind in ('llama', 'mistral', 'qwen2'):
    if hf.get('attention_bias') or hf.get('mlp_bias'):
      raise UsageError(f'{source}: attention_bias / mlp_bias are not supported (the Llama shape has no biases)')
    if hf.get('hidden_act', 'silu') != 'silu':
      raise UsageError(f'{source}: hidden_act={hf["hidden_act"]!r} is not supported (only "silu")')
    positions, window = hf.get('max_position_embeddings', 2048), _window(hf, kind)
    kw = dict(family='llama', hidden_size=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
              num_heads=hf['num_attention_heads'], num_kv_heads=hf.get('num_key_value_heads'),
              head_dim=hf.get('head_dim'), intermediate_size=hf['intermediate_size'],
              max_position_embeddings=min(positions, window or positions), norm_eps=hf.get('rms_norm_eps', 1e-6),
              **_rope(hf, source), tie_embeddings=hf.get('tie_word_embeddings', False), qkv_bias=kind == 'qwen2',
              hf_model_type='' if kind == 'llama' else kind, **common)  # fmt: skip
  else:
    raise UsageError(f'{source}: model_type={kind!r} is not a causal LM jaxlm reads (expected one of {MODEL_TYPES})')
  if kw.get('head_dim') == kw['hidden_size'] // kw['num_heads']:
    kw['head_dim'] = None
  return decoder.DecoderConfig(**{**kw, **overrides})


def config_to_hf(cfg: decoder.DecoderConfig) -> dict:
  """The config.json of `cfg` for transformers."""
  eos = [cfg.eos_token_id, *cfg.stop_token_ids] if cfg.stop_token_ids else cfg.eos_token_id
  ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
  if cfg.family == 'gpt2':
    return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
                n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
                activation_function=_TO_GPT2_ACT[cfg.activation], tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.initializer_range, resid_pdrop=cfg.hidden_dropout,
                embd_pdrop=cfg.hidden_dropout, attn_pdrop=0.0, **ids)  # fmt: skip
  kind = cfg.hf_model_type or 'llama'
  if cfg.qkv_bias and kind != 'qwen2':
    raise UsageError(f"model.qkv_bias: transformers' {kind} has no query / key / value biases (qwen2 has)")
  extra = dict(attention_bias=False, mlp_bias=False)  # LlamaConfig's; Mistral and Qwen2 fix their biases.
  if kind != 'llama':
    extra = dict(sliding_window=None) if kind == 'mistral' else dict(use_sliding_window=False, sliding_window=None)
  return dict(model_type=kind, architectures=[f'{_CLASSES[kind]}ForCausalLM'], vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, intermediate_size=cfg.intermediate_size,
              max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
              **_rope_to_hf(cfg), tie_word_embeddings=cfg.tie_embeddings, hidden_act='silu', **extra,
              initializer_range=cfg.initializer_range, **ids)  # fmt: skip


# ----------------------------------------------------------------------------- tensors


def _layer_names(cfg: decoder.DecoderConfig, i: int) -> dict[str, str]:
  """jaxlm layer parameter -> HF tensor name of layer i (GPT-2's q/k/v are slices of c_attn)."""
  if cfg.family == 'gpt2':
    h = f'h.{i}.'
    return {
      'attn_norm_scale': h + 'ln_1.weight', 'attn_norm_bias': h + 'ln_1.bias',
      'o_kernel': h + 'attn.c_proj.weight', 'o_bias': h + 'attn.c_proj.bias',
      'mlp_norm_scale': h + 'ln_2.weight', 'mlp_norm_bias': h + 'ln_2.bias',
      'wi_kernel': h + 'mlp.c_fc.weight', 'wi_bias': h + 'mlp.c_fc.bias',
      'wo_kernel': h + 'mlp.c_proj.weight', 'wo_bias': h + 'mlp.c_proj.bias',
    }  # fmt: skip
  m = f'model.layers.{i}.'
  return {
    'attn_norm_scale': m + 'input_layernorm.weight', 'mlp_norm_scale': m + 'post_attention_layernorm.weight',
    'q_kernel': m + 'self_attn.q_proj.weight', 'k_kernel': m + 'self_attn.k_proj.weight',
    'v_kernel': m + 'self_attn.v_proj.weight', 'o_kernel': m + 'self_attn.o_proj.weight',
    'q_bias': m + 'self_attn.q_proj.bias', 'k_bias': m + 'self_attn.k_proj.bias', 'v_bias': m + 'self_attn.v_proj.bias',
    'wg_kernel': m + 'mlp.gate_proj.weight', 'wi_kernel': m + 'mlp.up_proj.weight',
    'wo_kernel': m + 'mlp.down_proj.weight',
  }  # fmt: skip


def _top_names(cfg: decoder.DecoderConfig) -> dict[str, str]:
  if cfg.family == 'gpt2':
    return {'word': 'wte.weight', 'position': 'wpe.weight', 'final_norm_scale': 'ln_f.weight',
            'final_norm_bias': 'ln_f.bias', 'lm_head': 'lm_head.weight'}  # fmt: skip
  return {'word': 'model.embed_tokens.weight', 'final_norm_scale': 'model.norm.weight', 'lm_head': 'lm_head.weight'}


def _normalise(tensors: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
  """Tensor names without the base-model prefix transformers adds or leaves out (GPT2Model saves
  `h.0...`, GPT2LMHeadModel `transformer.h.0...`; LlamaModel `layers.0...`, the LM `model.layers...`)."""
  out = {}
  for k, v in tensors.items():
    if family == 'gpt2' and k.startswith('transformer.'):
      k = k[len('transformer.') :]
    elif family == 'llama' and not k.startswith(('model.', 'lm_head.')):
      k = 'model.' + k
    out[k] = v
  return out


def _to_jaxlm(name: str, t: np.ndarray, cfg: decoder.DecoderConfig) -> np.ndarray:
  """One HF layer tensor in jaxlm's layout (without the layer axis)."""
  D, N, G, K = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_size
  if cfg.family == 'gpt2':  # Conv1D weights are already [in, out].
    if name == 'o_kernel':
      return t.reshape(N, K, D)
    return t
  heads = {'q_kernel': N, 'k_kernel': G, 'v_kernel': G}
  if name in heads:  # [heads * K, D] -> [D, heads, K]
    return t.T.reshape(D, heads[name], K)
  if name in ('q_bias', 'k_bias', 'v_bias'):  # [heads * K] -> [heads, K]
    return t.reshape(-1, K)
  if name == 'o_kernel':  # [D, N * K] -> [N, K, D]
    return t.T.reshape(N, K, D)
  if name.endswith('kernel'):
    return t.T
  return t


def _to_hf(name: str, t: np.ndarray, cfg: decoder.DecoderConfig) -> np.ndarray:
  """The inverse of _to_jaxlm."""
  D = cfg.hidden_size
  if cfg.family == 'gpt2':
    return t.reshape(-1, D) if name == 'o_kernel' else t
  if name in ('q_kernel', 'k_kernel', 'v_kernel'):
    return t.reshape(D, -1).T
  if name in ('q_bias', 'k_bias', 'v_bias'):
    return t.reshape(-1)
  if name == 'o_kernel':
    return t.reshape(-1, D).T
  return t.T if name.endswith('kernel') else t


def params_from_hf(tensors: dict[str, np.ndarray], cfg: decoder.DecoderConfig, source: str) -> nnx.State:
  """The float32 parameter pytree of `cfg` from HF tensors; one UsageError naming the first missing
  or misshapen tensor."""
  graphdef, abstract = decoder.abstract(cfg)
  t = _normalise(tensors, cfg.family)
  used = set()

  def get(name: str) -> np.ndarray:
    if name not in t:
      raise UsageError(f'{source}: tensor {name!r} is missing')
    used.add(name)
    return np.asarray(t[name], np.float32)

  values: dict[tuple, np.ndarray] = {}
  for path, var in nnx.to_flat_state(abstract):
    if path[0] == 'layers':
      name = path[1]
      per_layer = []
      for i in range(cfg.num_layers):
        names = _layer_names(cfg, i)
        if cfg.family == 'gpt2' and name[0] in 'qkv' and name[1] == '_':
          qkv = get(f'h.{i}.attn.c_attn.' + ('weight' if name.endswith('kernel') else 'bias'))
          part = np.split(qkv, 3, axis=-1)['qkv'.index(name[0])]
          per_layer.append(part.reshape(*part.shape[:-1], cfg.num_heads, cfg.head_size))
        else:
          per_layer.append(_to_jaxlm(name, get(names[name]), cfg))
      for i, v in enumerate(per_layer):
        if v.shape != tuple(var.shape[1:]):
          raise UsageError(f'{source}: layer {i} tensor for layers/{name} has shape {v.shape},'
                           f' the model expects {tuple(var.shape[1:])}')  # fmt: skip
      value = np.stack(per_layer)
    else:
      name = path[0]
      hf_name = _top_names(cfg)[name]
      value = get(hf_name)
      if name == 'lm_head':
        value = value.T
      value = blocks.fit_vocab(value, var.get_metadata().get('axes'), cfg)
    if value.shape != tuple(var.shape):
      raise UsageError(f'{source}: tensor for {"/".join(map(str, path))} has shape {value.shape},'
                       f' the model expects {tuple(var.shape)}')  # fmt: skip
    values[path] = value
  unused = sorted(k for k in t if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if cfg.tie_embeddings:
    unused = [k for k in unused if k != 'lm_head.weight']
  if unused:
    raise UsageError(f'{source}: tensors the model has no place for, e.g. {unused[0]!r} ({len(unused)} in all)')
  flat = [(p, v.replace(values[p])) for p, v in nnx.to_flat_state(abstract)]
  return nnx.from_flat_state(flat)


def params_to_hf(params: nnx.State, cfg: decoder.DecoderConfig) -> dict[str, np.ndarray]:
  """HF tensors (named as GPT2LMHeadModel / LlamaForCausalLM save them) of a float parameter pytree."""
  if cfg.quantization != 'none':
    raise UsageError(f'model.quantization={cfg.quantization!r}: dequantize first (quant.dequantize)')
  out: dict[str, np.ndarray] = {}
  prefix = 'transformer.' if cfg.family == 'gpt2' else ''
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(var.get_value(), np.float32)
    value = blocks.vocab_rows(value, var.get_metadata().get('axes'), cfg.vocab_size)
    if path[0] == 'layers':
      name = path[1]
      for i in range(cfg.num_layers):
        if cfg.family == 'gpt2' and name[0] in 'qkv' and name[1] == '_':
          continue
        out[prefix + _layer_names(cfg, i)[name]] = np.ascontiguousarray(_to_hf(name, value[i], cfg))
    elif path[0] == 'lm_head':
      out['lm_head.weight'] = np.ascontiguousarray(value.T)
    else:
      out[prefix + _top_names(cfg)[path[0]]] = value
  if cfg.family == 'gpt2':
    layers = params['layers']
    for i in range(cfg.num_layers):
      for kind in ('kernel', 'bias'):
        parts = [np.asarray(layers[f'{n}_{kind}'][...][i], np.float32) for n in 'qkv']
        parts = [p.reshape(*p.shape[:-2], -1) for p in parts]
        out[f'{prefix}h.{i}.attn.c_attn.' + ('weight' if kind == 'kernel' else 'bias')] = np.concatenate(parts, -1)
  return out


def load(path: str, seed: int = 0, **overrides) -> tuple[nnx.GraphDef, nnx.State, dict]:
  """(graphdef, params, the HF config dict) of a GPT-2, Llama, Mistral or Qwen2 directory; `overrides` set DecoderConfig fields.
  The parameters are float (store.load_model quantizes them for `quantization='int8'`)."""
  if overrides.get('quantization', 'none') != 'none':
    raise UsageError(f'{path}: holds float tensors; quantize them after loading (quant.quantize)')
  hf = hf_bert.read_config(path, ARCHITECTURES)
  cfg = config_from_hf(hf, os.path.join(path, 'config.json'), **overrides)
  cfg = _with_generation_config(cfg, path, overrides)
  tensors, source = hf_bert.read_tensors(path)
  params = params_from_hf(tensors, cfg, source)
  graphdef, _ = decoder.abstract(cfg)
  return graphdef, params, hf


def _with_generation_config(cfg: decoder.DecoderConfig, path: str, overrides: dict) -> decoder.DecoderConfig:
  """`cfg` with the end-of-sequence ids that generation_config.json adds to config.json's (what transformers'
  `generate` stops at), unless `overrides` set them."""
  file = os.path.join(path, 'generation_config.json')
  if not os.path.exists(file) or {'eos_token_id', 'stop_token_ids'} & set(overrides):
    return cfg
  try:
    with open(file) as f:
      eos = _ids(json.load(f).get('eos_token_id'))
  except (ValueError, AttributeError) as e:
    raise UsageError(f'{file}: not a JSON object') from e
  known = [cfg.eos_token_id, *cfg.stop_token_ids]
  more = tuple(i for i in dict.fromkeys(eos) if i not in known)
  if cfg.eos_token_id is None and more:
    return cfg.replace(eos_token_id=more[0], stop_token_ids=cfg.stop_token_ids + more[1:])
  return cfg.replace(stop_token_ids=cfg.stop_token_ids + more) if more else cfg


def save(
  params: nnx.State, cfg: decoder.DecoderConfig, out_dir: str, tokenizer_dir: str | None = None, dtype: str = 'float32'
) -> None:
  """Writes config.json, model.safetensors (tensors in `dtype`, hf.DTYPES) and the tokenizer's files."""
  tensors = params_to_hf(params, cfg)
  if cfg.tie_embeddings:
    tensors.pop('lm_head.weight', None)
  hf_bert.write_weights(out_dir, tensors, config_to_hf(cfg), dtype)
  hf_bert.copy_tokenizer_files(tokenizer_dir, out_dir)
