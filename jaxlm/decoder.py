"""Decoder-only (causal) language models in Flax NNX: the GPT-2 family and the Llama shape.

What lives here: `DecoderConfig` (sizes, the two families' presets, every knob a Hugging Face
`GPT2Config` / `LlamaConfig` of those shapes sets) and `Decoder`, the module: token (and, for
GPT-2, learned position) embeddings, a stack of pre-norm layers with causal attention, the
final norm and the LM head (tied to the embeddings or its own). What does not: Hugging Face
conversion (hf_causal.py), generation and perplexity (generate.py), losses (losses.py).

  gpt2   LayerNorm with biases, learned positions, tanh GELU MLP, biases everywhere, tied head
  llama  RMSNorm, rotary positions (rotate-half form, as transformers; frequencies optionally scaled,
         ROPE_SCALINGS), SwiGLU MLP, no biases (or on the query, key and value projections only:
         qkv_bias, as Qwen2), grouped-query attention (num_kv_heads < num_heads), tied or untied head.
         Mistral and Qwen2 checkpoints are of this family (hf_model_type keeps which, for export)

The building blocks (parameters with logical axis names, LayerNorm, dropout, vocabulary padding)
are those the encoder shares (blocks.py), and so are the execution knobs: layers stacked on a `layers` axis
and run as a `lax.scan` or unrolled, remat policies, the compute dtype. The word embeddings (and
an untied head) have `padded_vocab_size` rows; the padding rows get a large negative logit.

With `quantization='int8'` (inference only; quant.py makes such parameters) the layers' dense
kernels (INT8_KERNELS) are int8, each with a float32 per-output-channel `<name>_scale`, and are
dequantized into the compute dtype inside the forward and `decode`, one layer at a time. The
embeddings, norms, biases and the LM head (tied or untied) stay float32.

Two ways to run it: `__call__` (training, evaluation, perplexity) over whole rows, optionally
packed (`segment_ids`: no attention across documents, `position_ids` restarting per document);
`decode` over a preallocated key/value cache, for the prefill of a prompt batch and then one
token per call (generate.py loops it inside one jitted while loop). Over whole rows attention runs
cuDNN's fused kernel on a GPU (16-bit, unpacked rows), splash attention on a TPU (padded or packed rows whose
length divides by 128; grouped-query as one multi-query kernel per key/value head), else blocks of queries against
the keys up to each block's end (`attention.causal_blocks`), skipping the keys the causal mask hides from a whole
block.

Shape letters: B batch, T tokens in this call, S cache length, D hidden, N query heads, G key/value
heads, K head size, F feed-forward, V vocabulary (padded), L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention, blocks, losses
from jaxlm.errors import UsageError

FAMILIES = ('gpt2', 'llama')
# Hugging Face model types of each family: what a checkpoint was read from and an export writes.
HF_MODEL_TYPES = {'gpt2': ('gpt2',), 'llama': ('llama', 'mistral', 'qwen2')}
# Rotary frequency scalings (llama): 'linear' divides every frequency by rope_factor (positions / factor);
# 'llama3' (Llama 3.1 and later) divides the low ones only, those whose wavelength exceeds
# rope_original_max_positions / rope_low_freq_factor, keeps those below rope_original_max_positions /
# rope_high_freq_factor, and blends the two in between.
ROPE_SCALINGS = ('none', 'linear', 'llama3')
ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'silu')
# The layers' kernels that `quantization='int8'` stores as int8 (wg: the llama family's gate).
INT8_KERNELS = ('q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'wi_kernel', 'wo_kernel', 'wg_kernel')


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes, family and execution knobs of a decoder-only language model."""

  family: str = 'gpt2'  # 'gpt2' or 'llama' (module docstring).
  vocab_size: int = 50257  # Tokenizer vocabulary size.
  vocab_multiple: int = 1  # Embedding rows rounded up to a multiple of this (model.ModelConfig).
  hidden_size: int = 768  # D.
  num_layers: int = 12  # L.
  num_heads: int = 12  # N: query heads.
  num_kv_heads: int | None = None  # G: key/value heads (grouped-query attention); None = num_heads.
  head_dim: int | None = None  # K; None = hidden_size // num_heads.
  intermediate_size: int = 3072  # F.
  max_position_embeddings: int = 1024  # Longest sequence (the learned table's rows for gpt2).
  hidden_act: str = ''  # '' = the family's: gelu_tanh (gpt2), silu (llama, gated).
  norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon.
  rope_theta: float = 10000.0  # Rotary base (llama).
  rope_scaling: str = 'none'  # One of ROPE_SCALINGS, with the four fields below (llama).
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only, as the next two.
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192  # The context length the scaling extends.
  tie_embeddings: bool = True  # LM head = word embeddings transposed.
  qkv_bias: bool = False  # llama: biases on the query, key and value projections (Qwen2); gpt2 has all biases.
  hf_model_type: str = ''  # The Hugging Face model_type read / exported ('' = the family's; HF_MODEL_TYPES).
  hidden_dropout: float = 0.0  # Dropout on embeddings and residual branches (training only).
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  stop_token_ids: tuple[int, ...] = ()  # More ids that end a generation (an instruct model's end of turn).
  pad_token_id: int | None = None
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.
  scan_layers: bool | None = None  # As model.ModelConfig.
  remat: str = 'none'  # As model.ModelConfig.
  attention_impl: str | None = None  # '' / None: the backend's own (cuDNN on GPU, splash on TPU), else 'xla'.
  quantization: str = 'none'  # 'int8': weight-only int8 layer kernels with float32 scales (inference; quant.py).

  def __post_init__(self):
    try:  # A list read from model_config.json: a tuple, as the config is hashed (a static jit argument).
      object.__setattr__(self, 'stop_token_ids', tuple(int(i) for i in self.stop_token_ids))
    except (TypeError, ValueError) as e:
      raise UsageError(f'model.stop_token_ids={self.stop_token_ids!r}: expected a list of token ids') from e
    if self.family not in FAMILIES:
      raise UsageError(f'model.family={self.family!r}: expected one of {FAMILIES}')
    if not isinstance(self.vocab_multiple, int) or self.vocab_multiple < 1:
      raise UsageError(f'model.vocab_multiple={self.vocab_multiple!r}: must be a positive integer')
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise UsageError(f'model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}')
    if self.num_heads % self.kv_heads:
      raise UsageError(f'model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}')
    if self.family == 'gpt2' and self.kv_heads != self.num_heads:
      raise UsageError('model.num_kv_heads: the gpt2 family has no grouped-query attention')
    if self.hf_model_type and self.hf_model_type not in HF_MODEL_TYPES[self.family]:
      raise UsageError(f'model.hf_model_type={self.hf_model_type!r}: the {self.family} family exports as one of'
                       f' {HF_MODEL_TYPES[self.family]}')  # fmt: skip
    if self.qkv_bias and self.family != 'llama':
      raise UsageError('model.qkv_bias: only the llama family has it (gpt2 has biases everywhere)')
    if self.activation not in ACTIVATIONS:
      raise UsageError(f'model.hidden_act={self.hidden_act!r}: expected one of {ACTIVATIONS}')
    if self.remat not in blocks.REMAT_POLICIES:
      raise UsageError(f'model.remat={self.remat!r}: expected one of {blocks.REMAT_POLICIES}')
    if (self.attention_impl or '') not in ('', 'xla', 'cudnn', 'splash'):
      raise UsageError(f'model.attention_impl={self.attention_impl!r}: a decoder runs "", "xla", "cudnn" or "splash"')
    if self.quantization not in blocks.QUANTIZATIONS:
      raise UsageError(f'model.quantization={self.quantization!r}: expected one of {blocks.QUANTIZATIONS}')
    if self.rope_scaling not in ROPE_SCALINGS:
      raise UsageError(f'model.rope_scaling={self.rope_scaling!r}: expected one of {ROPE_SCALINGS}')
    if self.rope_scaling != 'none' and not self.rope_factor > 0:
      raise UsageError(f'model.rope_factor={self.rope_factor!r}: must be positive')
    if self.rope_scaling == 'llama3' and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise UsageError(f'model.rope_low_freq_factor={self.rope_low_freq_factor!r}, model.rope_high_freq_factor='
                       f'{self.rope_high_freq_factor!r}: llama3 scaling needs 0 < low < high')  # fmt: skip
    jnp.dtype(self.dtype)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def activation(self) -> str:
    return self.hidden_act or ('gelu_tanh' if self.family == 'gpt2' else 'silu')

  @property
  def scanned(self) -> bool:
    return blocks.scan_by_default(self.num_layers) if self.scan_layers is None else self.scan_layers

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def replace(self, **kw) -> DecoderConfig:
    return dataclasses.replace(self, **kw)


def _gpt2(layers: int, hidden: int, heads: int, **kw) -> DecoderConfig:
  return DecoderConfig(family='gpt2', num_layers=layers, hidden_size=hidden, num_heads=heads,
                       intermediate_size=4 * hidden, **kw)  # fmt: skip


def _llama(layers: int, hidden: int, heads: int, kv: int, ff: int, **kw) -> DecoderConfig:
  kw = dict(vocab_size=32000, max_position_embeddings=2048, norm_eps=1e-5, tie_embeddings=False) | kw
  return DecoderConfig(family='llama', num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                       intermediate_size=ff, **kw)  # fmt: skip


# GPT-2 (Radford et al. 2019) and Llama-shaped models (Touvron et al. 2023; the 1B of Llama 3.2's sizes).
PRESETS: dict[str, DecoderConfig] = {
  'gpt2-tiny': _gpt2(2, 128, 2, max_position_embeddings=256),
  'gpt2-mini': _gpt2(4, 256, 4, max_position_embeddings=512),
  'gpt2': _gpt2(12, 768, 12),
  'gpt2-medium': _gpt2(24, 1024, 16),
  'gpt2-large': _gpt2(36, 1280, 20),
  'gpt2-xl': _gpt2(48, 1600, 25),
  'llama-tiny': _llama(2, 128, 4, 2, 352, max_position_embeddings=256),
  'llama-mini': _llama(4, 256, 8, 2, 704, max_position_embeddings=512),
  'llama-160m': _llama(12, 768, 12, 4, 2048),
  'llama-1b': _llama(
    16, 2048, 32, 8, 8192, vocab_size=128256, rope_theta=500000.0, tie_embeddings=True, max_position_embeddings=8192
  ),  # fmt: skip
  'llama-7b': _llama(32, 4096, 32, 32, 11008, max_position_embeddings=4096),
}


def preset(name: str, **overrides: Any) -> DecoderConfig:
  """The named preset, with fields overridden."""
  if name not in PRESETS:
    raise UsageError(f'model.preset={name!r}: expected one of {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------- blocks


def _norm(x, scale, bias, cfg: DecoderConfig):
  """LayerNorm (gpt2) or RMSNorm (llama), computed in float32, returned in the input dtype."""
  if cfg.family == 'gpt2':
    return blocks.layer_norm(x, scale, bias, cfg.norm_eps)
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
  return (y * blocks.bcast(scale, x.ndim)).astype(x.dtype)


def rope_frequencies(cfg: DecoderConfig) -> jax.Array:
  """The K/2 rotary frequencies (float32), scaled as `cfg.rope_scaling` says (ROPE_SCALINGS)."""
  K = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
  if cfg.rope_scaling == 'linear':
    return inv_freq / cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    wavelength = 2 * math.pi / inv_freq
    old, low, high = cfg.rope_original_max_positions, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    scaled = jnp.where(wavelength > old / low, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (old / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    between = (wavelength >= old / high) & (wavelength <= old / low)
    return jnp.where(between, blended, scaled)
  return inv_freq


def rope(x_BxTxHxK, positions_BxT, inv_freq_K2):
  """Rotary position embedding in the rotate-half layout (transformers' Llama), in float32."""
  K = x_BxTxHxK.shape[-1]
  angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_K2[None, None]
  cos = jnp.cos(jnp.concatenate([angles_BxTxK2] * 2, -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles_BxTxK2] * 2, -1))[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  half = K // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x * cos + rotated * sin).astype(x_BxTxHxK.dtype)


class Decoder(nnx.Module):
  """A decoder-only language model of `cfg.family`."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, N, G, K, F = (
      cfg.num_layers,
      cfg.hidden_size,
      cfg.num_heads,
      cfg.kv_heads,
      cfg.head_size,
      cfg.intermediate_size,
    )
    s, p = cfg.initializer_range, blocks.param
    gpt2 = cfg.family == 'gpt2'
    word = p(rngs, (cfg.vocab_size, D), ('vocab', 'embed'), std=s)
    self.word = word.replace(jnp.pad(word[...], ((0, cfg.padded_vocab_size - cfg.vocab_size), (0, 0))))
    self.position = p(rngs, (cfg.max_position_embeddings, D), (None, 'embed'), std=s) if gpt2 else None
    layers = {
      'attn_norm_scale': p(None, (L, D), ('layers', 'embed'), fill=1.0),
      'q_kernel': p(rngs, (L, D, N, K), ('layers', 'embed', 'heads', 'kv'), std=s),
      'k_kernel': p(rngs, (L, D, G, K), ('layers', 'embed', 'kv_heads', 'kv'), std=s),
      'v_kernel': p(rngs, (L, D, G, K), ('layers', 'embed', 'kv_heads', 'kv'), std=s),
      'o_kernel': p(rngs, (L, N, K, D), ('layers', 'heads', 'kv', 'embed'), std=s),
      'mlp_norm_scale': p(None, (L, D), ('layers', 'embed'), fill=1.0),
      'wi_kernel': p(rngs, (L, D, F), ('layers', 'embed', 'mlp'), std=s),
      'wo_kernel': p(rngs, (L, F, D), ('layers', 'mlp', 'embed'), std=s),
    }
    if gpt2:
      layers |= {
        'attn_norm_bias': p(None, (L, D), ('layers', 'embed')),
        'q_bias': p(None, (L, N, K), ('layers', 'heads', 'kv')),
        'k_bias': p(None, (L, G, K), ('layers', 'kv_heads', 'kv')),
        'v_bias': p(None, (L, G, K), ('layers', 'kv_heads', 'kv')),
        'o_bias': p(None, (L, D), ('layers', 'embed')),
        'mlp_norm_bias': p(None, (L, D), ('layers', 'embed')),
        'wi_bias': p(None, (L, F), ('layers', 'mlp')),
        'wo_bias': p(None, (L, D), ('layers', 'embed')),
      }
    else:
      layers['wg_kernel'] = p(rngs, (L, D, F), ('layers', 'embed', 'mlp'), std=s)
      if cfg.qkv_bias:
        layers |= {
          'q_bias': p(None, (L, N, K), ('layers', 'heads', 'kv')),
          'k_bias': p(None, (L, G, K), ('layers', 'kv_heads', 'kv')),
          'v_bias': p(None, (L, G, K), ('layers', 'kv_heads', 'kv')),
        }
    if cfg.quantization == 'int8':
      for name in INT8_KERNELS:
        if name in layers:  # Scales over the layer axis and the output axes (a head's [G|N, K] for q/k/v).
          var, n_out = layers[name], 2 if name[0] in 'qkv' else 1
          layers[name], layers[f'{name}_scale'] = blocks.int8_param(var, (0, *range(var.ndim - n_out, var.ndim)))
    self.layers = nnx.Dict(layers)
    self.final_norm_scale = p(None, (D,), ('embed',), fill=1.0)
    self.final_norm_bias = p(None, (D,), ('embed',)) if gpt2 else None
    head = None
    if not cfg.tie_embeddings:
      head = p(rngs, (D, cfg.vocab_size), ('embed', 'vocab'), std=s)
      head = head.replace(jnp.pad(head[...], ((0, 0), (0, cfg.padded_vocab_size - cfg.vocab_size))))
    self.lm_head = head

  # --------------------------------------------------------------------------- pieces

  def _embed(self, ids_BxT, positions_BxT, rng):
    cfg = self.cfg
    x = jnp.take(self.word[...], ids_BxT, axis=0)
    if self.position is not None:
      x = x + jnp.take(self.position[...], positions_BxT, axis=0)
    return blocks.dropout(x.astype(cfg.dtype), cfg.hidden_dropout, rng)

  def features(self, h_BxTxD):
    """The final norm over the last layer's hidden states: what the LM head multiplies."""
    cfg = self.cfg
    bias = None if self.final_norm_bias is None else self.final_norm_bias[...]
    return _norm(h_BxTxD, self.final_norm_scale[...], bias, cfg)

  def head_VxD(self):
    """The LM head's weight as [V,D] (padded vocabulary): the word embeddings when tied."""
    return self.word[...] if self.lm_head is None else self.lm_head[...].T

  def logits(self, h_BxTxD):
    """The LM head over final hidden states: [B,T,V] in float32, padding rows at a large negative value."""
    return losses.head_logits(self.features(h_BxTxD), self.head_VxD(), self.cfg.vocab_size)

  def _block(self, p: dict, x, positions_BxT, rng, attend):
    """One pre-norm layer: x += Attn(Norm(x)); x += MLP(Norm(x)). `attend(q, k, v)` -> [B,T,N,K]
    (and whatever it returns beside, e.g. the updated cache)."""
    cfg = self.cfg
    dt = x.dtype
    p = {k: blocks.weight(v, p.get(f'{k}_scale'), dt) if k.endswith(('kernel', 'bias')) else v for k, v in p.items()}
    drop1, drop2 = blocks.split_rng(rng, 2)
    h = _norm(x, p['attn_norm_scale'], p.get('attn_norm_bias'), cfg)

    B, T, D = x.shape

    def proj(n):  # Kernels as [D, heads * K] matrices: one plain dot, no transposed copy of the weights.
      w = p[f'{n}_kernel']
      y = (h.reshape(B * T, D) @ w.reshape(D, -1)).reshape(B, T, *w.shape[1:])
      return y + blocks.bcast(p[f'{n}_bias'], 4) if f'{n}_bias' in p else y

    q, k, v = proj('q'), proj('k'), proj('v')
    if cfg.family == 'llama':
      inv_freq = rope_frequencies(cfg)
      q, k = rope(q, positions_BxT, inv_freq), rope(k, positions_BxT, inv_freq)
    a, extra = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    a = (a.reshape(B * T, -1) @ p['o_kernel'].reshape(-1, D)).reshape(B, T, D)
    if 'o_bias' in p:
      a = a + blocks.bcast(p['o_bias'], 3)
    x = x + blocks.dropout(a, cfg.hidden_dropout, drop1)
    h = _norm(x, p['mlp_norm_scale'], p.get('mlp_norm_bias'), cfg)
    act = blocks.activation(cfg.activation)
    if cfg.family == 'llama':
      f = act(h @ p['wg_kernel']) * (h @ p['wi_kernel'])
    else:
      f = act(h @ p['wi_kernel'] + blocks.bcast(p['wi_bias'], 3))
    f = f @ p['wo_kernel']
    if 'wo_bias' in p:
      f = f + blocks.bcast(p['wo_bias'], 3)
    return x + blocks.dropout(f, cfg.hidden_dropout, drop2), extra

  def _stacked(self) -> dict:
    return {k: v[...] for k, v in self.layers.items()}

  def layer_params(self) -> list[dict]:
    """Each layer's parameters, sliced out of the stack: what a decode loop takes once, before it
    starts (slicing in every step copies every layer's weights in every step)."""
    stacked = self._stacked()
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.num_layers)]

  # --------------------------------------------------------------------------- whole rows

  def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, position_ids=None, rng=None,
               return_hidden: bool = False, logits: bool = True) -> dict[str, jax.Array]:  # fmt: skip
    """Runs the model over whole rows; dropout is on iff `rng` is given.

    `attention_mask` [B,T] (1 = real token) marks right padding; packed rows give `segment_ids`
    (0 = padding, 1, 2, ... per document: no attention across documents) and `position_ids`
    (each document's from 0). Returns {'logits': [B,T,V] float32} (and 'hidden' [B,T,D]). With
    `logits=False` the LM head is left to the loss (losses.fused_head_xent): {'features': the final
    norm's output [B,T,D], 'head': the head's weight [V,D] over the padded vocabulary, 'vocab_size': the
    real one}.
    """
    cfg = self.cfg
    B, T = input_ids.shape
    if T > cfg.max_position_embeddings and cfg.family == 'gpt2':
      raise UsageError(f'sequence length {T} exceeds model.max_position_embeddings={cfg.max_position_embeddings}')
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    emb_rng, layers_rng = blocks.split_rng(rng, 2)
    x = self._embed(input_ids, position_ids, emb_rng)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids is not None:
      valid_BxT = segment_ids > 0
      mask_BxTxT = causal_TxT[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      valid_BxT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
      mask_BxTxT = causal_TxT[None] & valid_BxT[:, None, :]

    def attend(q, k, v):  # k, v: [B,G,T,K]
      fused = attention.fused_causal(q, k, v, valid_BxT, segment_ids, cfg.attention_impl)
      return (attention.causal_blocks(q, k, v, mask_BxTxT) if fused is None else fused), None

    def body(x, inputs):
      p, layer_rng = inputs
      return self._block(p, x, position_ids, layer_rng, attend)[0], None

    body = blocks.remat(body, cfg.remat, cfg.scanned)
    stacked = self._stacked()
    rngs = None if layers_rng is None else jax.random.split(layers_rng, cfg.num_layers)
    if cfg.scanned:
      x, _ = jax.lax.scan(body, x, (stacked, rngs))
    else:
      for i in range(cfg.num_layers):
        x, _ = body(x, jax.tree.map(lambda a: a[i], (stacked, rngs)))
    if logits:
      out = {'logits': self.logits(x)}
    else:
      out = {'features': self.features(x), 'head': self.head_VxD(), 'vocab_size': self.cfg.vocab_size}
    if return_hidden:
      out['hidden'] = x
    return out

  # --------------------------------------------------------------------------- cached decoding

  def decode(self, ids_BxT, positions_BxT, valid_BxS, cache: dict, index, last_only: bool = False, layers=None):
    """T new tokens at cache slots [index, index+T): their keys and values are written into
    `cache` ({'k', 'v'}: [L,B,G,S,K] each, init_cache) and each attends to the valid slots
    (`valid_BxS`, which must already mark the new ones) at or before its own.
    Returns (logits [B,T,V] float32, the updated cache); with `last_only` the logits of the last
    position alone, [B,1,V] (a prefill needs no others: the LM head over every prompt token is
    most of a prefill's arithmetic). `layers`: layer_params(), taken by the unrolled stack."""
    cfg = self.cfg
    T, S = ids_BxT.shape[1], valid_BxS.shape[1]
    x = self._embed(ids_BxT, positions_BxT, None)
    slot_T = index + jnp.arange(T)
    mask_BxTxS = valid_BxS[:, None, :] & (jnp.arange(S)[None, None, :] <= slot_T[None, :, None])
    stacked = self._stacked()

    def layer(i, x, ck, cv):
      def attend(q, k, v):  # k, v: [B,G,T,K], written at slots [index, index + T) of layer i.
        at = (i, 0, 0, index, 0)
        ck2 = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
        cv2 = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
        return attention.grouped_query(q, ck2[i], cv2[i], mask_BxTxS), (ck2, cv2)

      p = jax.tree.map(lambda a: a[i], stacked) if layers is None or cfg.scanned else layers[i]
      return self._block(p, x, positions_BxT, None, attend)

    ck, cv = cache['k'], cache['v']
    if cfg.scanned:

      def body(carry, i):
        x, ck, cv = carry
        x, (ck, cv) = layer(i, x, ck, cv)
        return (x, ck, cv), None

      (x, ck, cv), _ = jax.lax.scan(body, (x, ck, cv), jnp.arange(cfg.num_layers))
    else:
      for i in range(cfg.num_layers):
        x, (ck, cv) = layer(i, x, ck, cv)
    return self.logits(x[:, -1:] if last_only else x), {'k': ck, 'v': cv}


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> dict:
  """An empty key/value cache of `length` slots per row, in the compute dtype."""
  shape = (cfg.num_layers, batch, cfg.kv_heads, length, cfg.head_size)
  return {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}


def init(cfg: DecoderConfig, seed: int = 0, out_shardings=None) -> tuple[nnx.GraphDef, nnx.State]:
  """A fresh model, split into (graphdef, params); jitted, so `out_shardings` can place it."""
  graphdef, _ = abstract(cfg)
  make = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=out_shardings)
  return graphdef, make()


def abstract(cfg: DecoderConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs with their axes metadata), allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> Decoder:
  return nnx.merge(graphdef, params)


def apply(graphdef: nnx.GraphDef, params: nnx.State, *args, **kwargs) -> dict[str, jax.Array]:
  """Pure function of the parameter pytree: merges and runs the model over whole rows."""
  return nnx.merge(graphdef, params)(*args, **kwargs)
