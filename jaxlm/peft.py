"""Parameter-efficient fine-tuning: train the head only, or LoRA or bottleneck adapters on a frozen encoder.

  full     every parameter trains (the default)
  head     only the pooler and the classifier train; the encoder is frozen (a decoder: its final
           norm and untied LM head train)
  lora     low-rank adapters (Hu et al. 2021) on the chosen dense matrices, plus the encoder's head
           (a decoder: the adapters alone)
  adapter  bottleneck adapters (Houlsby et al. 2019) in every encoder layer, plus the head and, with
           finetune.adapter_train_layernorm, the layers' LayerNorms (encoders only)

The adapters' kernels have the same names in both model families (a decoder's grouped-query k / v
kernels have G heads where q has N: an adapter's output is whatever its kernel's is).

A LoRA adapter of a kernel W [L, in..., out...] is a pair A [L, in, r], B [L, r, out]; the
layer uses W + (alpha / r) * A @ B. B starts at zero, so training starts from the pretrained
model. `merge` folds the adapters into the kernels (used inside the step, and for every
checkpoint that leaves the run: the best checkpoint and exports hold plain dense weights).

Bottleneck adapters are not linear, so they cannot be folded into the kernels: they are parameters
of the model itself (model.Layers, `adapter_size` in its config, set by `model_fields`), saved and
loaded with it; `drop_adapters` takes them out (a Hugging Face BERT has no place for them).

Frozen parameters are labelled 'freeze' for `optax.multi_transform`, whose `set_to_zero`
branch keeps no optimizer state, so they cost no Adam moments and stay bitwise unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import model as model_lib
from jaxlm.errors import UsageError

MODES = ('full', 'head', 'lora', 'adapter')
# Adapter name -> (stacked kernel in model.Layers, number of input axes after the layer axis).
LORA_TARGETS = {
  'q': ('q_kernel', 1), 'k': ('k_kernel', 1), 'v': ('v_kernel', 1), 'o': ('o_kernel', 2),
  'wi': ('wi_kernel', 1), 'wo': ('wo_kernel', 1), 'wg': ('wg_kernel', 1),
}  # fmt: skip
HEAD_PREFIXES = ('pooler/', 'classifier/')
LM_HEAD_PREFIXES = ('final_norm_', 'lm_head')  # A decoder's head: trained under finetune.mode=head only.
ADAPTER_PREFIX = 'layers/adapter_'
LAYER_NORMS = ('layers/attn_ln_scale', 'layers/attn_ln_bias', 'layers/mlp_ln_scale', 'layers/mlp_ln_bias')


def parse_targets(spec: str) -> tuple[str, ...]:
  """'q,v' -> ('q', 'v'); an error naming finetune.lora_targets for an unknown matrix."""
  names = tuple(s.strip() for s in spec.split(',') if s.strip())
  bad = [n for n in names if n not in LORA_TARGETS]
  if bad or not names:
    raise UsageError(f'finetune.lora_targets={spec!r}: expected a comma-separated subset of {sorted(LORA_TARGETS)}')
  return names


def _path_str(path) -> str:
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def init_adapters(params: nnx.State, targets: tuple[str, ...], rank: int, seed: int = 0) -> dict:
  """{name: {'a': [L, in, r], 'b': [L, r, out]}}: A uniform in +-1/sqrt(in) (as in PEFT), B zero."""
  flat = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
  out, key = {}, jax.random.key(seed)
  for i, name in enumerate(targets):
    kernel, n_in = LORA_TARGETS[name]
    if f'layers/{kernel}' not in flat:
      raise UsageError(f'finetune.lora_targets: {name!r} names layers/{kernel}, which this model has none of')
    shape = flat[f'layers/{kernel}'].shape
    L, d_in, d_out = shape[0], math.prod(shape[1 : 1 + n_in]), math.prod(shape[1 + n_in :])
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, rank), jnp.float32, -bound, bound)
    out[name] = {'a': a, 'b': jnp.zeros((L, rank, d_out), jnp.float32)}
  return out


def fold(w, ab: dict, scale: float):
  """One kernel with its adapter folded in: W + scale * A @ B, in W's shape and dtype."""
  delta = jnp.einsum('lir,lro->lio', ab['a'], ab['b']) * scale
  return w + delta.reshape(w.shape).astype(w.dtype)


def merge(params: nnx.State, adapters: dict, scale: float) -> nnx.State:
  """The parameters with every adapter folded in (same tree, same dtypes)."""
  by_kernel = {f'layers/{LORA_TARGETS[n][0]}': ab for n, ab in adapters.items()}

  def one(path, w):
    ab = by_kernel.get(_path_str(path))
    return w if ab is None else fold(w, ab, scale)

  return jax.tree_util.tree_map_with_path(one, params)


def model_fields(finetune, finetuning: bool) -> dict:
  """The model config fields that finetune.* sets: the bottleneck adapters of mode 'adapter' ({} otherwise)."""
  if not finetuning or finetune.mode != 'adapter':
    return {}
  return {'adapter_size': finetune.adapter_size, 'adapter_placement': finetune.adapter_placement}


def drop_adapters(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
  """The model without its bottleneck adapters (the same parameters otherwise); as it is when it has none."""
  cfg = nnx.merge(graphdef, params).cfg
  if not getattr(cfg, 'adapter_size', 0):
    return graphdef, params
  graphdef, plain = model_lib.abstract(cfg.replace(adapter_size=0))
  values = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(plain):
    var.set_value(values[path].get_value())
  return graphdef, plain


def labels(params: nnx.State, mode: str, train_layernorm: bool = False):
  """'train' / 'freeze' per parameter (same tree as `params`) for optax.multi_transform; `train_layernorm`: the
  layers' LayerNorms train too under mode 'adapter'."""
  if mode not in MODES:
    raise UsageError(f'finetune.mode={mode!r}: expected one of {MODES}')

  def label(path, _):
    name = _path_str(path)
    head = name.startswith(HEAD_PREFIXES) or (mode == 'head' and name.startswith(LM_HEAD_PREFIXES))
    adapter = mode == 'adapter' and (name.startswith(ADAPTER_PREFIX) or (train_layernorm and name in LAYER_NORMS))
    return 'train' if mode == 'full' or head or adapter else 'freeze'

  return jax.tree_util.tree_map_with_path(label, params)


def wrap_optimizer(tx, params_labels, with_adapters: bool):
  """tx on the trainable parameters (and the adapters), set_to_zero (no state) on the rest.

  The optimizer's target is `params`, or {'params': params, 'adapters': adapters} for LoRA."""
  if with_adapters:
    params_labels = {'params': params_labels, 'adapters': 'train'}
  label_fn = lambda tree: _broadcast_labels(params_labels, tree)
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, label_fn)


def _broadcast_labels(labels_tree, tree):
  """Expands a label given for a whole subtree (e.g. 'train' for all adapters) to its leaves."""
  if isinstance(labels_tree, str):
    return jax.tree.map(lambda _: labels_tree, tree)
  if isinstance(labels_tree, dict) and not isinstance(labels_tree, nnx.State):
    return {k: _broadcast_labels(labels_tree[k], tree[k]) for k in tree}
  return labels_tree


def frozen_mask(params_labels):
  """True where a parameter is frozen (its gradient is stopped in the step)."""
  return jax.tree.map(lambda s: s == 'freeze', params_labels)


def count(params, params_labels, adapters=None) -> tuple[int, int]:
  """(trainable, total) parameter counts; LoRA adapters count as trainable and in the total."""
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
  marks = jax.tree.leaves(params_labels)
  extra = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters or {}))
  trainable = sum(s for s, m in zip(sizes, marks) if m == 'train') + extra
  return trainable, sum(sizes) + extra
