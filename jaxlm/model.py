"""The BERT encoder and its heads, in Flax NNX.

What lives here: `ModelConfig` (sizes, presets for the published BERT family, and every knob
a Hugging Face `BertConfig` can set), and `Bert`, the module: embeddings, a stack of
post-LayerNorm transformer layers, the pooler and the MLM / next-sentence / classification
heads. What does not: losses (losses.py), Hugging Face conversion (hf.py), sharding rules
(sharding.py), the fused attention kernels (attention.py; the explicit path, which attention
dropout needs, is here).

Parameters are float32 `nnx.Param`s whose `axes` metadata holds their logical axis names
(`vocab`, `embed`, `mlp`, `heads`, `kv`, `layers`); sharding.py maps those names onto a mesh.
With `quantization='int8'` (inference only; quant.py makes such parameters) the dense kernels
of the layers, the pooler and the MLM transform are int8, each with a float32 per-output-channel
`<name>_scale`, and are dequantized inside the forward, one layer at a time.
The layer parameters are stacked on a leading `layers` axis, so the stack can be run with
`jax.lax.scan` (compile time independent of depth) or unrolled, from the same checkpoint.
With `adapter_size > 0` every layer also holds bottleneck adapters (Houlsby et al. 2019): h + up(act(down(h)))
on the attention output and / or the feed-forward output (`adapter_placement`), before the residual add and
LayerNorm; their up-projection starts at zero, so a fresh adapter leaves the model's function unchanged
(peft.py trains them; transformers' BERT has no place for them, so a Hugging Face export must drop them).
The word embeddings and the MLM output bias have `padded_vocab_size` rows (`vocab_size` rounded
up to `vocab_multiple`) so that the `vocab` axis splits over any mesh; the padding rows start at
zero, no token id reaches them, and the MLM head gives them a large negative logit, so no loss,
accuracy or prediction ever sees them. `blocks.fit_vocab` / `blocks.vocab_rows` pad or cut those rows when
parameters move between multiples (loading, Hugging Face export).

Use it functionally: `graphdef, params = nnx.split(Bert(cfg, rngs=nnx.Rngs(0)))` once, then
`apply(graphdef, params, ...)` inside a jitted function.

Shape letters: B batch, T sequence length, D hidden, N heads, K head size, F feed-forward,
V vocabulary (padded_vocab_size), L layers, P masked positions per sequence, C classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import attention, blocks
from jaxlm.errors import UsageError

# adapter_placement -> the sublayers whose output passes through an adapter: attention ('attn'), feed-forward ('ffn').
ADAPTER_PLACEMENTS = {'both': ('attn', 'ffn'), 'attention': ('attn',), 'ffn': ('ffn',)}
# The layers' kernels that `quantization='int8'` stores as int8 (also the pooler and MLM transform).
INT8_KERNELS = ('q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'wi_kernel', 'wo_kernel')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes, heads and execution knobs of a BERT encoder."""

  vocab_size: int = 30522  # WordPiece vocabulary size (the tokenizer's; ids are below it).
  vocab_multiple: int = 1  # Embedding / MLM-bias rows are vocab_size rounded up to a multiple of
  #   this (V = padded_vocab_size), so that the `vocab` axis divides over the mesh (Megatron,
  #   MaxText); the padding rows are never predicted. 1 = no padding.
  hidden_size: int = 768  # D: width of the residual stream.
  num_layers: int = 12  # L: transformer layers.
  num_heads: int = 12  # N: attention heads; D must divide by N.
  intermediate_size: int = 3072  # F: feed-forward width.
  max_position_embeddings: int = 512  # Longest sequence the position table covers.
  type_vocab_size: int = 2  # Segment (token type) ids.
  hidden_act: str = 'gelu'  # 'gelu' (exact, erf), 'gelu_tanh', 'relu' or 'silu'.
  layer_norm_eps: float = 1e-12  # LayerNorm epsilon.
  hidden_dropout: float = 0.1  # Dropout on embeddings and residual branches.
  attention_dropout: float = 0.1  # Dropout on attention probabilities (training only); above 0,
  #   training takes the explicit attention path, 0.0 the fused kernel (attention_impl).
  initializer_range: float = 0.02  # Std of the truncated-normal weight init.
  pad_token_id: int = 0  # Padding id (for tokenizers and export).
  mlm_head: bool = True  # Masked-LM head tied to the word embeddings.
  nsp_head: bool = False  # Next-sentence head on the pooled output.
  pooler: bool = True  # Dense + tanh over [CLS].
  num_labels: int = 0  # Classifier outputs; 0 = no classifier, 1 = regression.
  classifier_dropout: float | None = None  # Dropout before the classifier; None = hidden_dropout.
  dtype: str = 'float32'  # Compute dtype ('bfloat16' on TPU); parameters stay float32.
  scan_layers: bool | None = None  # lax.scan over the layers (one compiled layer); None: scan
  #   stacks deeper than blocks.SCAN_ABOVE layers and unroll shallower ones, and every stack on a GPU (faster steps).
  remat: str = 'none'  # Rematerialisation: 'none', 'full', 'save_dots', 'save_dots_no_batch'.
  attention_impl: str | None = None  # Attention kernel when there is no attention dropout: 'xla',
  #   'cudnn' (GPU), 'splash' (TPU), 'explicit'; None / '' = the backend's own (attention.py).
  quantization: str = 'none'  # 'int8': weight-only int8 dense kernels with float32 scales (inference).
  adapter_size: int = 0  # Width of the bottleneck adapters in every layer (finetune.mode=adapter); 0 = none.
  adapter_placement: str = 'both'  # Adapters after the attention output ('attention'), the feed-forward ('ffn')
  #   or both; ignored without adapters.

  def __post_init__(self):
    if not isinstance(self.vocab_multiple, int) or self.vocab_multiple < 1:
      raise UsageError(f'model.vocab_multiple={self.vocab_multiple!r}: must be a positive integer')
    if self.hidden_size % self.num_heads:
      raise UsageError(f'model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}')
    if self.hidden_act not in blocks.ACTIVATIONS:
      raise UsageError(f'model.hidden_act={self.hidden_act!r}: expected one of {blocks.ACTIVATIONS}')
    if self.remat not in blocks.REMAT_POLICIES:
      raise UsageError(f'model.remat={self.remat!r}: expected one of {blocks.REMAT_POLICIES}')
    if (self.attention_impl or '') not in attention.IMPLS:
      raise UsageError(f'model.attention_impl={self.attention_impl!r}: expected one of {attention.IMPLS}')
    if self.quantization not in blocks.QUANTIZATIONS:
      raise UsageError(f'model.quantization={self.quantization!r}: expected one of {blocks.QUANTIZATIONS}')
    if not isinstance(self.adapter_size, int) or self.adapter_size < 0:
      raise UsageError(f'adapter_size={self.adapter_size!r}: must be an integer >= 0 (0: no adapters)')
    if self.adapter_placement not in ADAPTER_PLACEMENTS:
      raise UsageError(
        f'finetune.adapter_placement={self.adapter_placement!r}: expected one of {tuple(ADAPTER_PLACEMENTS)}'
      )
    if self.pooler is False and (self.nsp_head or self.num_labels):
      raise UsageError('model.pooler=False but the next-sentence or classifier head needs it')
    jnp.dtype(self.dtype)  # Raises on an unknown dtype name.

  @property
  def scanned(self) -> bool:
    """Whether the layer stack runs as a lax.scan."""
    return blocks.scan_by_default(self.num_layers) if self.scan_layers is None else self.scan_layers

  @property
  def padded_vocab_size(self) -> int:
    """V: rows of the word embeddings and the MLM bias, vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


def adapter_names(cfg: ModelConfig) -> tuple[str, ...]:
  """The stacked adapter parameters of `cfg`'s layers (model.Layers), e.g. 'adapter_attn_down_kernel'; () without."""
  if not cfg.adapter_size:
    return ()
  parts = ('down_kernel', 'down_bias', 'up_kernel', 'up_bias')
  return tuple(f'adapter_{site}_{part}' for site in ADAPTER_PLACEMENTS[cfg.adapter_placement] for part in parts)


def _preset(layers: int, hidden: int) -> ModelConfig:
  return ModelConfig(
    num_layers=layers, hidden_size=hidden, num_heads=max(2, hidden // 64), intermediate_size=4 * hidden
  )


# The published BERT family (Turc et al. 2019 for the small ones; Devlin et al. 2019).
PRESETS: dict[str, ModelConfig] = {
  'tiny': _preset(2, 128),
  'mini': _preset(4, 256),
  'small': _preset(4, 512),
  'medium': _preset(8, 512),
  'base': _preset(12, 768),
  'large': _preset(24, 1024),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """The named preset ('tiny' ... 'large'), with fields overridden."""
  if name not in PRESETS:
    raise UsageError(f'model.preset={name!r}: expected one of {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides)


def from_config(m, vocab_size: int = 1, **heads: Any) -> ModelConfig:
  """The ModelConfig of a run's `config.model` part: the preset, the keys that override it, the
  tokenizer's `vocab_size` and the task's `heads` (mlm_head, nsp_head, pooler, num_labels).
  Raises UsageError naming the first bad model.* key."""
  kw = dict(
    vocab_size=vocab_size, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
    attention_impl=m.attention_impl or None, hidden_dropout=m.hidden_dropout,
    attention_dropout=m.attention_dropout, max_position_embeddings=m.max_position_embeddings,
    vocab_multiple=m.vocab_multiple, **heads,
  )  # fmt: skip
  if m.hidden_act:
    kw['hidden_act'] = m.hidden_act
  return preset(m.preset, **kw)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, s = cfg.hidden_size, cfg.initializer_range
    # The real rows are drawn as for an unpadded table, so vocab_multiple does not change them.
    word = blocks.param(rngs, (cfg.vocab_size, D), ('vocab', 'embed'), std=s)
    self.word = word.replace(jnp.pad(word[...], ((0, cfg.padded_vocab_size - cfg.vocab_size), (0, 0))))
    self.position = blocks.param(rngs, (cfg.max_position_embeddings, D), (None, 'embed'), std=s)
    self.token_type = blocks.param(rngs, (cfg.type_vocab_size, D), (None, 'embed'), std=s)
    self.ln_scale = blocks.param(None, (D,), ('embed',), fill=1.0)
    self.ln_bias = blocks.param(None, (D,), ('embed',))

  def __call__(self, ids_BxT, types_BxT, cfg: ModelConfig, positions_BxT=None):
    T = ids_BxT.shape[1]
    if T > cfg.max_position_embeddings:
      raise UsageError(f'sequence length {T} exceeds model.max_position_embeddings={cfg.max_position_embeddings}')
    if positions_BxT is None:
      pos_BxTxD = self.position[...][:T][None]  # 0..T-1, the same in every row (B = 1, broadcast).
    else:  # Packed rows: each document's positions restart at 0.
      pos_BxTxD = jnp.take(self.position[...], positions_BxT, axis=0)
    x_BxTxD = jnp.take(self.word[...], ids_BxT, axis=0) + pos_BxTxD + jnp.take(self.token_type[...], types_BxT, axis=0)
    return blocks.layer_norm(x_BxTxD, self.ln_scale[...], self.ln_bias[...], cfg.layer_norm_eps)


class Layers(nnx.Module):
  """All L post-LayerNorm transformer layers, parameters stacked on a leading `layers` axis."""

  NAMES = (
    'q_kernel', 'q_bias', 'k_kernel', 'k_bias', 'v_kernel', 'v_bias', 'o_kernel', 'o_bias',
    'attn_ln_scale', 'attn_ln_bias', 'wi_kernel', 'wi_bias', 'wo_kernel', 'wo_bias',
    'mlp_ln_scale', 'mlp_ln_bias',
  )  # fmt: skip

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    L, D, N, K, F = (
      cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_size, cfg.intermediate_size
    )  # fmt: skip
    s = cfg.initializer_range
    for name in ('q', 'k', 'v'):
      setattr(self, f'{name}_kernel', blocks.param(rngs, (L, D, N, K), ('layers', 'embed', 'heads', 'kv'), std=s))
      setattr(self, f'{name}_bias', blocks.param(None, (L, N, K), ('layers', 'heads', 'kv')))
    self.o_kernel = blocks.param(rngs, (L, N, K, D), ('layers', 'heads', 'kv', 'embed'), std=s)
    self.o_bias = blocks.param(None, (L, D), ('layers', 'embed'))
    self.attn_ln_scale = blocks.param(None, (L, D), ('layers', 'embed'), fill=1.0)
    self.attn_ln_bias = blocks.param(None, (L, D), ('layers', 'embed'))
    self.wi_kernel = blocks.param(rngs, (L, D, F), ('layers', 'embed', 'mlp'), std=s)
    self.wi_bias = blocks.param(None, (L, F), ('layers', 'mlp'))
    self.wo_kernel = blocks.param(rngs, (L, F, D), ('layers', 'mlp', 'embed'), std=s)
    self.wo_bias = blocks.param(None, (L, D), ('layers', 'embed'))
    self.mlp_ln_scale = blocks.param(None, (L, D), ('layers', 'embed'), fill=1.0)
    self.mlp_ln_bias = blocks.param(None, (L, D), ('layers', 'embed'))
    A = cfg.adapter_size
    for site in ADAPTER_PLACEMENTS[cfg.adapter_placement] if A else ():
      # The bottleneck axis is small: replicated (no logical name). Up starts at zero: the identity.
      setattr(self, f'adapter_{site}_down_kernel', blocks.param(rngs, (L, D, A), ('layers', 'embed', None), std=s))
      setattr(self, f'adapter_{site}_down_bias', blocks.param(None, (L, A), ('layers', None)))
      setattr(self, f'adapter_{site}_up_kernel', blocks.param(None, (L, A, D), ('layers', None, 'embed')))
      setattr(self, f'adapter_{site}_up_bias', blocks.param(None, (L, D), ('layers', 'embed')))
    self.names = self.NAMES + adapter_names(cfg)
    if cfg.quantization == 'int8':
      for name in INT8_KERNELS:  # Scales over the layer axis and the output axes.
        n_out = {'q_kernel': 2, 'k_kernel': 2, 'v_kernel': 2}.get(name, 1)
        var = getattr(self, name)
        kernel, scale = blocks.int8_param(var, (0, *range(var.ndim - n_out, var.ndim)))
        setattr(self, name, kernel)
        setattr(self, f'{name}_scale', scale)
      self.names += tuple(f'{n}_scale' for n in INT8_KERNELS)

  def __call__(self, x_BxTxD, valid_BxT, segment_BxT, cfg: ModelConfig, rng, first_token_only: bool = False):
    stacked = {name: getattr(self, name)[...] for name in self.names}
    if first_token_only:  # Inference of the [CLS] vector: the last layer computes that one query.
      return self._first_token(stacked, x_BxTxD, valid_BxT, segment_BxT, cfg)
    rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

    def body(x, inputs):
      p, layer_rng = inputs
      return _layer(p, x, valid_BxT, segment_BxT, cfg, layer_rng), None

    body = blocks.remat(body, cfg.remat, cfg.scanned)
    if cfg.scanned:
      x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (stacked, rngs))
    else:
      for i in range(cfg.num_layers):
        layer_inputs = jax.tree.map(lambda a: a[i], (stacked, rngs))
        x_BxTxD, _ = body(x_BxTxD, layer_inputs)
    return x_BxTxD

  def _first_token(self, stacked, x_BxTxD, valid_BxT, segment_BxT, cfg: ModelConfig):
    """[B,1,D]: the first position's output, with the last layer's attention, projections and FFN
    computed for that position only (its keys and values still come from every token). No dropout."""
    L = cfg.num_layers
    layer = lambda i: jax.tree.map(lambda a: a[i], stacked)  # noqa: E731
    body = lambda x, i: (_layer(layer(i), x, valid_BxT, segment_BxT, cfg, None), None)  # noqa: E731
    if cfg.scanned:  # Indexes the whole stack: slicing off the last layer would copy the others' weights.
      x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, jnp.arange(L - 1))
    else:
      for i in range(L - 1):
        x_BxTxD, _ = body(x_BxTxD, i)
    return _layer(layer(L - 1), x_BxTxD, valid_BxT, segment_BxT, cfg, None, queries=1)


def _attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, segment_BxT, cfg: ModelConfig, rng):
  """Multi-head self-attention over the valid (non-padding) keys, or within each segment."""
  dropout = rng is not None and cfg.attention_dropout > 0.0
  if not dropout and cfg.attention_impl != 'explicit':
    # The fused path (attention.py): XLA on CPU, cuDNN flash attention on GPU, splash on TPU.
    return attention.fused(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, segment_BxT, cfg.attention_impl)
  mask_Bx1xTxT = attention.mask(valid_BxT, segment_BxT)  # T = 1 on the query axis without segments.
  return _explicit_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, mask_Bx1xTxT, cfg, rng)


def _explicit_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, mask_Bx1xTxT, cfg: ModelConfig, rng):
  """softmax(q k^T / sqrt(K)) v with the probabilities materialised: attention dropout needs them."""
  scale = 1.0 / math.sqrt(cfg.head_size)
  s_BxNxTxT = jnp.einsum('btnk,bsnk->bnts', q_BxTxNxK, k_BxTxNxK).astype(jnp.float32) * scale
  s_BxNxTxT = jnp.where(mask_Bx1xTxT, s_BxNxTxT, jnp.finfo(jnp.float32).min)
  p_BxNxTxT = blocks.dropout(jax.nn.softmax(s_BxNxTxT, axis=-1), cfg.attention_dropout, rng)
  return jnp.einsum('bnts,bsnk->btnk', p_BxNxTxT.astype(v_BxTxNxK.dtype), v_BxTxNxK)


def _adapter(p: dict, site: str, h_BxTxD, cfg: ModelConfig):
  """A bottleneck adapter (Houlsby et al. 2019) on a sublayer's output: h + up(act(down(h)))."""
  z_BxTxA = h_BxTxD @ p[f'adapter_{site}_down_kernel'] + blocks.bcast(p[f'adapter_{site}_down_bias'], 3)
  z_BxTxA = blocks.activation(cfg.hidden_act)(z_BxTxA)
  return h_BxTxD + z_BxTxA @ p[f'adapter_{site}_up_kernel'] + blocks.bcast(p[f'adapter_{site}_up_bias'], 3)


def _layer(p: dict, x_BxTxD, valid_BxT, segment_BxT, cfg: ModelConfig, rng, queries: int | None = None):
  """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)), each sublayer's output passed
  through its adapter first, if any. `queries`: only the first that many positions are computed (and
  returned), attending to every key; no dropout."""
  dt = x_BxTxD.dtype
  p = {
    k: blocks.weight(v, p.get(f'{k}_scale'), dt) if k.endswith(('kernel', 'bias')) else v
    for k, v in p.items()
  }  # fmt: skip
  attn_rng, drop1, drop2, drop3 = blocks.split_rng(rng, 4)
  proj = lambda x, n: jnp.einsum('btd,dnk->btnk', x, p[f'{n}_kernel']) + blocks.bcast(p[f'{n}_bias'], 4)  # noqa: E731
  k, v = proj(x_BxTxD, 'k'), proj(x_BxTxD, 'v')
  if queries is None:
    a_BxTxNxK = _attention(proj(x_BxTxD, 'q'), k, v, valid_BxT, segment_BxT, cfg, attn_rng)
  else:
    x_BxTxD = x_BxTxD[:, :queries]
    mask_Bx1xQxT = attention.mask(valid_BxT, segment_BxT)[:, :, :queries]
    a_BxTxNxK = _explicit_attention(proj(x_BxTxD, 'q'), k, v, mask_Bx1xQxT, cfg, None)
  a_BxTxD = jnp.einsum('btnk,nkd->btd', a_BxTxNxK, p['o_kernel']) + blocks.bcast(p['o_bias'], 3)
  a_BxTxD = blocks.dropout(a_BxTxD, cfg.hidden_dropout, drop1)
  if 'adapter_attn_down_kernel' in p:  # After the dropout, before the residual add (as Houlsby et al.'s code).
    a_BxTxD = _adapter(p, 'attn', a_BxTxD, cfg)
  x_BxTxD = blocks.layer_norm(x_BxTxD + a_BxTxD, p['attn_ln_scale'], p['attn_ln_bias'], cfg.layer_norm_eps)
  h_BxTxF = blocks.activation(cfg.hidden_act)(x_BxTxD @ p['wi_kernel'] + blocks.bcast(p['wi_bias'], 3))
  h_BxTxF = blocks.dropout(h_BxTxF, 0.0, drop2)  # BERT has no dropout inside the FFN.
  h_BxTxD = blocks.dropout(h_BxTxF @ p['wo_kernel'] + blocks.bcast(p['wo_bias'], 3), cfg.hidden_dropout, drop3)
  if 'adapter_ffn_down_kernel' in p:
    h_BxTxD = _adapter(p, 'ffn', h_BxTxD, cfg)
  return blocks.layer_norm(x_BxTxD + h_BxTxD, p['mlp_ln_scale'], p['mlp_ln_bias'], cfg.layer_norm_eps)


class Dense(nnx.Module):
  """x @ kernel + bias, with logical axis names."""

  def __init__(self, d_in: int, d_out: int, axes, std: float, *, rngs: nnx.Rngs, int8: bool = False):
    kernel, scale = blocks.param(rngs, (d_in, d_out), axes, std=std), None
    if int8:
      kernel, scale = blocks.int8_param(kernel, (1,))
    self.kernel, self.kernel_scale = kernel, nnx.data(scale)
    self.bias = blocks.param(None, (d_out,), axes[1:])

  def __call__(self, x):
    scale = None if self.kernel_scale is None else self.kernel_scale[...]
    return x @ blocks.weight(self.kernel[...], scale, x.dtype) + blocks.bcast(self.bias[...].astype(x.dtype), x.ndim)


class MLMHead(nnx.Module):
  """Dense + activation + LayerNorm, then the decoder tied to the word embeddings (own bias)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D = cfg.hidden_size
    int8 = cfg.quantization == 'int8'
    self.transform = Dense(D, D, ('embed', 'mlp'), cfg.initializer_range, rngs=rngs, int8=int8)
    self.ln_scale = blocks.param(None, (D,), ('embed',), fill=1.0)
    self.ln_bias = blocks.param(None, (D,), ('embed',))
    self.bias = blocks.param(None, (cfg.padded_vocab_size,), ('vocab',))

  def __call__(self, h_BxPxD, word_VxD, cfg: ModelConfig):
    h = blocks.activation(cfg.hidden_act)(self.transform(h_BxPxD))
    h = blocks.layer_norm(h, self.ln_scale[...], self.ln_bias[...], cfg.layer_norm_eps)
    logits_BxPxV = _tied_decoder(h, word_VxD.astype(h.dtype), self.bias[...].astype(h.dtype))
    if cfg.padded_vocab_size == cfg.vocab_size:
      return logits_BxPxV
    # One elementwise select that XLA fuses into the logits' consumers (no scatter, no extra
    # vocabulary-wide buffer); its gradient gives the padding rows exactly zero. Not -inf, and
    # with headroom below the dtype's minimum, so that shifting by a max cannot overflow (bfloat16).
    dt = logits_BxPxV.dtype
    real = jax.lax.broadcasted_iota(jnp.int32, logits_BxPxV.shape, logits_BxPxV.ndim - 1) < cfg.vocab_size
    return jnp.where(real, logits_BxPxV, jnp.asarray(blocks.PADDING_LOGIT * jnp.finfo(dt).max, dt))


@jax.custom_vjp
def _tied_decoder(h_BxPxD, word_VxD, bias_V):
  """h @ word.T + bias. Its gradient is written out: XLA's own reduces the bias gradient over
  the vocabulary-wide cotangent with a slow reduction and transposes it before the dot."""
  return h_BxPxD @ word_VxD.T + blocks.bcast(bias_V, h_BxPxD.ndim)


def _tied_decoder_fwd(h_BxPxD, word_VxD, bias_V):
  return _tied_decoder(h_BxPxD, word_VxD, bias_V), (h_BxPxD, word_VxD)


def _tied_decoder_bwd(res, g_BxPxV):
  h_BxPxD, word_VxD = res
  h_MxD, g_MxV = h_BxPxD.reshape(-1, h_BxPxD.shape[-1]), g_BxPxV.reshape(-1, g_BxPxV.shape[-1])
  d_word = jnp.einsum('mv,md->vd', g_MxV, h_MxD)
  d_bias = jnp.ones((1, g_MxV.shape[0]), g_MxV.dtype) @ g_MxV
  return g_BxPxV @ word_VxD, d_word, d_bias[0]


_tied_decoder.defvjp(_tied_decoder_fwd, _tied_decoder_bwd)


class Bert(nnx.Module):
  """BERT encoder with the heads that `cfg` asks for."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    s = cfg.initializer_range
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = Layers(cfg, rngs=rngs)
    D = cfg.hidden_size
    int8 = cfg.quantization == 'int8'
    self.pooler = Dense(D, D, ('embed', 'mlp'), s, rngs=rngs, int8=int8) if cfg.pooler else None
    self.mlm = MLMHead(cfg, rngs=rngs) if cfg.mlm_head else None
    self.nsp = Dense(D, 2, ('embed', None), s, rngs=rngs) if cfg.nsp_head else None
    self.classifier = Dense(D, cfg.num_labels, ('embed', None), s, rngs=rngs) if cfg.num_labels else None

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    masked_positions=None,
    *,
    segment_ids=None,
    position_ids=None,
    rng: jax.Array | None = None,
    first_token_only: bool = False,
  ) -> dict[str, jax.Array]:
    """Runs the encoder and every head present; dropout is on iff `rng` is given.

    `attention_mask` [B,T] (1 = real token) marks right padding. Packed rows instead give
    `segment_ids` [B,T] (0 = padding, 1, 2, ... = the document of each token; a token attends
    only to its own document, padding to padding; `attention_mask` is then ignored) and
    `position_ids` [B,T] (each document's positions from 0; None = 0..T-1).

    `first_token_only` (inference: `rng` None) computes the last layer for the first position
    alone, which is all that `pooled`, `nsp_logits` and `logits` read: `hidden` is then [B,1,D]
    and `mlm_logits` is left out.

    Returns a dict with `hidden` [B,T,D] and, where the heads exist, `pooled` [B,D],
    `mlm_logits` ([B,P,V] at `masked_positions` [B,P] if given, else [B,T,V]),
    `nsp_logits` [B,2] and `logits` [B,C]. Outputs are in the compute dtype.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    emb_rng, layers_rng, head_rng = blocks.split_rng(rng, 3)
    x_BxTxD = self.embeddings(input_ids, token_type_ids, cfg, position_ids).astype(dt)
    x_BxTxD = blocks.dropout(x_BxTxD, cfg.hidden_dropout, emb_rng)
    valid_BxT = attention_mask.astype(bool) if segment_ids is None else segment_ids > 0
    first_only = first_token_only and rng is None
    x_BxTxD = self.layers(x_BxTxD, valid_BxT, segment_ids, cfg, layers_rng, first_only)
    out = {'hidden': x_BxTxD}
    if self.pooler is not None:
      out['pooled'] = jnp.tanh(self.pooler(x_BxTxD[:, 0]))
    if self.mlm is not None and not first_only:
      h = x_BxTxD
      if masked_positions is not None:
        # Gather before the vocabulary projection: only P of T positions pay for it.
        h = jnp.take_along_axis(x_BxTxD, masked_positions[..., None], axis=1)
      out['mlm_logits'] = self.mlm(h, self.embeddings.word[...], cfg)
    if self.nsp is not None:
      out['nsp_logits'] = self.nsp(out['pooled'])
    if self.classifier is not None:
      rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
      out['logits'] = self.classifier(blocks.dropout(out['pooled'], rate, head_rng))
    return out


def init(cfg: ModelConfig, seed: int = 0, out_shardings=None) -> tuple[nnx.GraphDef, nnx.State]:
  """A fresh model, split into (graphdef, params); jitted, so `out_shardings` can place it."""
  graphdef, _ = abstract(cfg)
  make = jax.jit(lambda: nnx.split(Bert(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=out_shardings)
  return graphdef, make()


def apply(graphdef: nnx.GraphDef, params: nnx.State, *args, **kwargs) -> dict[str, jax.Array]:
  """Pure function of the parameter pytree: merges and runs the model."""
  return nnx.merge(graphdef, params)(*args, **kwargs)


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params as ShapeDtypeStructs with their axes metadata), allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0))))


def count_params(params: nnx.State) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
