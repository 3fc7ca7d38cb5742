"""Decoder-only models (decoder.py, hf_causal.py): parity with transformers' GPT-2 and Llama on random
weights of several shapes, Hugging Face round trips, packing without cross-document attention, and the
key/value cache against the whole-row forward."""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import save_random_causal_lm as save_random_hf
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from jaxlm import attention, decoder, hf_causal
from jaxlm.errors import UsageError

# (family, transformers config kwargs): the shapes parity is checked on.
SHAPES = {
  'gpt2': ('gpt2', dict(vocab_size=301, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
  'gpt2-inner': (
    'gpt2',
    dict(
      vocab_size=257,
      n_embd=48,
      n_layer=3,
      n_head=3,
      n_inner=80,
      n_positions=40,
      activation_function='gelu_pytorch_tanh',
      layer_norm_epsilon=1e-6,
    ),
  ),  # fmt: skip
  'llama-gqa': (
    'llama',
    dict(
      vocab_size=311,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=8,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
      rope_theta=500000.0,
    ),
  ),  # fmt: skip
  'llama-tied-mha': (
    'llama',
    dict(
      vocab_size=263,
      hidden_size=48,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=4,
      max_position_embeddings=64,
      tie_word_embeddings=True,
      rms_norm_eps=1e-5,
    ),
  ),  # fmt: skip
  # Qwen2: query / key / value biases (random, as every bias here), grouped-query attention, a tied head.
  'qwen2-bias': (
    'qwen2',
    dict(
      vocab_size=270,
      hidden_size=64,
      intermediate_size=80,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=True,
      rope_theta=1000000.0,
    ),
  ),  # fmt: skip
  # Mistral with a sliding window of 24 tokens: loaded with 24 positions, where attention is the causal one.
  'mistral-window': (
    'mistral',
    dict(
      vocab_size=280,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=8,
      num_key_value_heads=4,
      max_position_embeddings=64,
      sliding_window=24,
      tie_word_embeddings=False,
    ),
  ),  # fmt: skip
}


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf_causal')
  return {
    name: save_random_hf(fam, str(root / name), seed=i, **kw) for i, (name, (fam, kw)) in enumerate(SHAPES.items())
  }


def _torch_logits(path, ids, mask=None):
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.float().numpy()


@functools.cache
def _forward(graphdef):
  return jax.jit(
    lambda p, ids, mask, seg, pos: decoder.apply(graphdef, p, ids, mask, segment_ids=seg, position_ids=pos)
  )


def _logits(graphdef, params, ids, mask=None, segment_ids=None, position_ids=None):
  return np.asarray(_forward(graphdef)(params, ids, mask, segment_ids, position_ids)['logits'])


@pytest.mark.parametrize('shape', list(SHAPES))
def test_logits_match_transformers_on_random_weights(hf_dirs, shape):
  path = hf_dirs[shape]
  graphdef, params, _ = hf_causal.load(path)
  cfg = graphdef_cfg(graphdef, params)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # Right padding: the real tokens' logits are unaffected.
  ours = _logits(graphdef, params, ids, mask)
  theirs = _torch_logits(path, ids, mask)
  assert ours.shape == theirs.shape == (2, 11, cfg.vocab_size)
  np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ours[1, :7], theirs[1, :7], atol=1e-4, rtol=1e-4)
  assert np.abs(theirs).max() > 1.0  # Weights large enough that a wrong layout shows.


def graphdef_cfg(graphdef, params) -> decoder.DecoderConfig:
  return decoder.merge(graphdef, params).cfg


@pytest.mark.parametrize('shape', ['gpt2', 'llama-gqa', 'llama-tied-mha', 'qwen2-bias', 'mistral-window'])
def test_hugging_face_round_trip_is_bitwise(hf_dirs, shape, tmp_path):
  path = hf_dirs[shape]
  graphdef, params, _ = hf_causal.load(path, vocab_multiple=64)
  cfg = graphdef_cfg(graphdef, params)
  assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size > cfg.vocab_size
  hf_causal.save(params, cfg, str(tmp_path / 'out'))
  before = load_file(os.path.join(path, 'model.safetensors'))
  after = load_file(str(tmp_path / 'out' / 'model.safetensors'))
  assert sorted(after) == sorted(k for k in before if not k.endswith(('.attn.bias', '.attn.masked_bias')))
  for k in after:
    assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
  ids = np.arange(1, 9, dtype=np.int32)[None] % cfg.vocab_size
  np.testing.assert_allclose(_torch_logits(str(tmp_path / 'out'), ids), _torch_logits(path, ids), atol=0, rtol=0)


def test_scanned_and_unrolled_layers_agree(hf_dirs):
  graphdef, params, _ = hf_causal.load(hf_dirs['llama-gqa'], scan_layers=True)
  graphdef2, params2, _ = hf_causal.load(hf_dirs['llama-gqa'], scan_layers=False)
  ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8)
  np.testing.assert_allclose(_logits(graphdef, params, ids), _logits(graphdef2, params2, ids), atol=1e-5)


@pytest.mark.parametrize('shape', ['gpt2', 'llama-gqa'])
def test_a_packed_document_never_sees_its_neighbours(hf_dirs, shape):
  graphdef, params, _ = hf_causal.load(hf_dirs[shape])
  rng = np.random.default_rng(1)
  a, b, c = (rng.integers(3, 250, n).astype(np.int32) for n in (5, 6, 6))
  row = lambda second: np.concatenate([a, second, [0]])[None]  # noqa: E731 (two documents + padding)
  seg = np.array([[1] * 5 + [2] * 6 + [0]], np.int32)
  pos = np.array([list(range(5)) + list(range(6)) + [0]], np.int32)
  with_b = _logits(graphdef, params, row(b), segment_ids=seg, position_ids=pos)
  with_c = _logits(graphdef, params, row(c), segment_ids=seg, position_ids=pos)
  alone = _logits(graphdef, params, a[None])
  np.testing.assert_allclose(with_b[0, :5], alone[0], atol=1e-5)  # Document 1 as if it were alone.
  np.testing.assert_allclose(with_b[0, :5], with_c[0, :5], atol=1e-6)  # Changing document 2 changes nothing in it.
  second_alone = _logits(graphdef, params, b[None])
  np.testing.assert_allclose(with_b[0, 5:11], second_alone[0], atol=1e-5)  # Nor document 1 in document 2.


@pytest.mark.parametrize('shape', ['gpt2', 'llama-gqa', 'qwen2-bias'])
def test_cached_decoding_equals_the_whole_row(hf_dirs, shape):
  """A left-padded prefill then one token per call gives the logits of the unpadded whole-row forward."""
  graphdef, params, _ = hf_causal.load(hf_dirs[shape])
  model = decoder.merge(graphdef, params)
  cfg = model.cfg
  ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
  full = _logits(graphdef, params, ids)[0]
  pad = 3  # The prompt (first 5 tokens) is left-padded to 8 slots; 3 more tokens follow one by one.
  prompt = np.concatenate([np.zeros((1, pad), np.int32), ids[:, :5]], 1)
  valid = np.concatenate([np.zeros((1, pad), bool), np.ones((1, 5), bool), np.zeros((1, 3), bool)], 1)
  positions = np.maximum(np.cumsum(valid[:, :8], 1) - 1, 0).astype(np.int32)
  cache = decoder.init_cache(cfg, 1, 11)
  step = jax.jit(lambda p, i, pos, v, c, idx: decoder.merge(graphdef, p).decode(i, pos, v, c, idx))
  logits, cache = step(params, prompt, positions, jnp.asarray(valid), cache, 0)
  np.testing.assert_allclose(np.asarray(logits)[0, pad:], full[:5], atol=1e-4)
  last, _ = decoder.merge(graphdef, params).decode(prompt, positions, jnp.asarray(valid), cache, 0, last_only=True)
  np.testing.assert_allclose(np.asarray(last)[0], full[4:5], atol=1e-4)  # A prefill's head: the last position only.
  for t in range(3):
    valid[:, 8 + t] = True
    logits, cache = step(params, ids[:, 5 + t : 6 + t], np.array([[5 + t]], np.int32), jnp.asarray(valid), cache, 8 + t)
    np.testing.assert_allclose(np.asarray(logits)[0, 0], full[5 + t], atol=1e-4)


def test_mistral_and_qwen2_load_as_llama_shapes_and_export_as_themselves(hf_dirs, tmp_path):
  import json

  for shape, kind, positions in (('qwen2-bias', 'qwen2', 64), ('mistral-window', 'mistral', 24)):
    graphdef, params, _ = hf_causal.load(hf_dirs[shape])
    cfg = graphdef_cfg(graphdef, params)
    assert (cfg.family, cfg.hf_model_type, cfg.qkv_bias) == ('llama', kind, kind == 'qwen2')
    assert cfg.max_position_embeddings == positions  # Mistral's: its sliding window.
    hf_causal.save(params, cfg, str(tmp_path / kind))
    written = json.load(open(tmp_path / kind / 'config.json'))
    assert written['model_type'] == kind and written['architectures'] == [
      f'{"Qwen2" if kind == "qwen2" else "Mistral"}ForCausalLM'
    ]
    assert written['sliding_window'] is None
  # Qwen2 slides only with use_sliding_window, from layer max_window_layers on.
  hf = {'model_type': 'qwen2', 'vocab_size': 10, 'hidden_size': 8, 'num_hidden_layers': 2, 'num_attention_heads': 2,
        'intermediate_size': 8, 'max_position_embeddings': 64, 'sliding_window': 16}  # fmt: skip
  assert hf_causal.config_from_hf(hf).max_position_embeddings == 64
  assert (
    hf_causal.config_from_hf({**hf, 'use_sliding_window': True, 'max_window_layers': 2}).max_position_embeddings == 64
  )
  assert (
    hf_causal.config_from_hf({**hf, 'use_sliding_window': True, 'max_window_layers': 1}).max_position_embeddings == 16
  )
  with pytest.raises(UsageError, match='qwen2 has'):
    hf_causal.config_to_hf(decoder.preset('llama-tiny', qkv_bias=True))


def test_unsupported_hugging_face_configs_are_named(hf_dirs, tmp_path):
  with pytest.raises(UsageError, match='rope type'):
    hf_causal.config_from_hf({'model_type': 'llama', 'vocab_size': 10, 'hidden_size': 8, 'num_hidden_layers': 1,
                              'num_attention_heads': 2, 'intermediate_size': 8,
                              'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1.0}})  # fmt: skip
  with pytest.raises(UsageError, match='model_type'):
    hf_causal.config_from_hf({'model_type': 'bert', 'vocab_size': 10})
  with pytest.raises(UsageError, match='num_kv_heads'):
    decoder.preset('llama-tiny', num_kv_heads=3)
  tensors = load_file(os.path.join(hf_dirs['gpt2'], 'model.safetensors'))
  cfg = hf_causal.config_from_hf(hf_causal.hf_bert.read_config(hf_dirs['gpt2'], hf_causal.ARCHITECTURES))
  tensors['transformer.h.1.mlp.c_fc.weight'] = tensors['transformer.h.1.mlp.c_fc.weight'][:, :10]
  with pytest.raises(UsageError, match=r'layer 1 tensor for layers/wi_kernel has shape'):
    hf_causal.params_from_hf(tensors, cfg, 'model.safetensors')
  del tensors['transformer.h.1.mlp.c_fc.weight']
  with pytest.raises(UsageError, match=r"'h.1.mlp.c_fc.weight' is missing"):
    hf_causal.params_from_hf(tensors, cfg, 'model.safetensors')


@pytest.mark.parametrize(
  'scaling',
  [
    dict(
      rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
    dict(rope_type='linear', factor=4.0),
  ],
  ids=['llama3', 'linear'],
)
def test_scaled_rotary_embeddings_match_transformers_and_round_trip(tmp_path, scaling):
  """Llama 3.1 and later scale their rotary frequencies (rope_type llama3: with head size 16 and an original
  context of 16 tokens, some frequencies are divided, some kept, some blended); older models may scale linearly."""
  import json

  path = save_random_hf('llama', str(tmp_path / 'hf'), vocab_size=97, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        rope_parameters={**scaling, 'rope_theta': 10000.0})  # fmt: skip
  graphdef, params, _ = hf_causal.load(path)
  cfg = graphdef_cfg(graphdef, params)
  assert (cfg.rope_scaling, cfg.rope_factor) == (scaling['rope_type'], scaling['factor'])
  ids = np.random.default_rng(0).integers(0, 97, (1, 40)).astype(np.int32)
  theirs = _torch_logits(path, ids)
  np.testing.assert_allclose(_logits(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)
  unscaled = hf_causal.load(path, rope_scaling='none')[:2]
  assert np.abs(_logits(*unscaled, ids) - theirs).max() > 1e-2  # The scaling is not a no-op here.
  # A config.json of transformers 4 (rope_scaling beside rope_theta) reads the same.
  hf = json.load(open(os.path.join(path, 'config.json')))
  hf['rope_scaling'], hf['rope_theta'] = {k: v for k, v in hf.pop('rope_parameters').items() if k != 'rope_theta'}, 1e4
  assert hf_causal.config_from_hf(hf) == cfg
  hf_causal.save(params, cfg, str(tmp_path / 'out'))
  np.testing.assert_allclose(_torch_logits(str(tmp_path / 'out'), ids), theirs, atol=0, rtol=0)
  del hf['rope_scaling']['factor']
  with pytest.raises(UsageError, match=f"the '{scaling['rope_type']}' rotary scaling has no 'factor'"):
    hf_causal.config_from_hf(hf)


def _save_shards(tensors: dict, out, shards: int, kind: str):
  """`tensors` split over `shards` files with the index transformers writes beside them."""
  import json

  names = sorted(tensors)
  single, index = {'safetensors': ('model.safetensors', 'model.safetensors.index.json'),
                   'bin': ('pytorch_model.bin', 'pytorch_model.bin.index.json')}[kind]  # fmt: skip
  stem, ext = single.rsplit('.', 1)
  os.makedirs(out)
  weight_map = {}
  for i in range(shards):
    part, file = names[i::shards], f'{stem}-{i + 1:05d}-of-{shards:05d}.{ext}'
    if kind == 'bin':
      torch.save({n: torch.from_numpy(tensors[n]) for n in part}, os.path.join(out, file))
    else:
      from safetensors.numpy import save_file

      save_file({n: tensors[n] for n in part}, os.path.join(out, file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(part, file))
  with open(os.path.join(out, index), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return out, index


def test_a_sharded_hugging_face_directory_loads_as_its_single_file(hf_dirs, tmp_path):
  """Large models come in shards with an index (model.safetensors.index.json, or pytorch_model.bin.index.json
  in older checkpoints): the same parameters as one file, and a missing or mismatched shard is named."""
  from jaxlm import store

  path = hf_dirs['llama-gqa']
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  _, want = hf_causal.load(path)[:2]
  ids = np.arange(1, 12, dtype=np.int32)[None]
  for kind in ('safetensors', 'bin'):
    out, index = _save_shards(tensors, tmp_path / kind, 3, kind)
    os.link(os.path.join(path, 'config.json'), os.path.join(out, 'config.json'))
    graphdef, got, _ = hf_causal.load(str(out))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(_logits(graphdef, got, ids), _torch_logits(path, ids), atol=1e-4, rtol=1e-4)
  _, params, _, _ = store.load_model(str(out))  # What jaxlm.load, predict and model.init_from read.
  assert jax.tree.leaves(params)[0].shape == jax.tree.leaves(want)[0].shape
  with open(os.path.join(out, index)) as f:
    weight_map = f.read()
  first = 'pytorch_model-00001-of-00003.bin'
  moved = weight_map.replace(first, 'pytorch_model-00002-of-00003.bin', 1)
  with open(os.path.join(out, index), 'w') as f:
    f.write(moved)
  with pytest.raises(UsageError, match=r'pytorch_model.bin.index.json: \S+ is not in pytorch_model-00002-of-00003.bin'):
    hf_causal.load(str(out))
  os.remove(os.path.join(out, first))
  with pytest.raises(UsageError, match=f'names the shard {first}, which is not in'):
    hf_causal.load(str(out))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a GPU')
@pytest.mark.parametrize('name', ['gpt2-tiny', 'llama-tiny'])
def test_cudnn_causal_attention_matches_xla(name):
  ids = np.random.default_rng(0).integers(0, 200, (4, 128)).astype(np.int32)
  valid = (np.arange(128)[None] < np.array([[128], [97], [64], [5]])).astype(np.int32)  # Right padding.
  out = {}
  for impl in ('cudnn', 'xla'):
    graphdef, params = decoder.init(decoder.preset(name, dtype='bfloat16', attention_impl=impl), seed=0)
    fn = jax.jit(functools.partial(decoder.apply, graphdef))
    if impl == 'cudnn':  # The cuDNN custom call, not the XLA fallback.
      assert 'cudnn' in fn.lower(params, ids, valid).compile().as_text().lower()
    out[impl] = np.asarray(fn(params, ids, valid)['logits'], np.float32)
  real = valid.astype(bool)
  got, want = out['cudnn'][real], out['xla'][real]
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2  # bfloat16 attention in both.


def test_blocked_causal_attention_equals_the_explicit_one_values_and_gradients():
  """The training path (query blocks against the keys up to their own end, its own backward) against
  autodiff of the explicit softmax: right padding, packed documents, a length no block size divides."""
  B, T, N, K, groups = 3, 150, 4, 16, 2  # Grouped-query: 2 key/value heads for 4 query heads.
  rng = np.random.default_rng(0)
  q, do = (jnp.asarray(rng.normal(size=(B, T, N, K)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(B, groups, T, K)), jnp.float32) for _ in range(2))
  seg = np.zeros((B, T), np.int32)
  seg[0] = 1  # One full document,
  seg[1, :90] = 1  # one followed by padding,
  seg[2, :40], seg[2, 40:71], seg[2, 71:140] = 1, 2, 3  # three packed, then padding.
  causal = np.tril(np.ones((T, T), bool))
  mask = jnp.asarray(causal[None] & (seg[:, :, None] == seg[:, None, :]))

  def vjp(fn):
    def both(q, k, v):
      out, back = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
      return out, back(do)

    return jax.jit(both)(q, k, v)  # Arguments, not constants: XLA would fold them through the whole program.

  want, want_grads = vjp(attention.grouped_query)
  got, got_grads = vjp(functools.partial(attention.causal_blocks, block=32))
  assert T % 32 and T > 32 * 4  # Several blocks, the last one short.
  np.testing.assert_allclose(got, want, atol=1e-5)
  for name, g, w in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f'd{name}')
  # Only the keys up to a block's end are read: scores of 32 queries against 32, 64, ... keys, never
  # a [T, T] block.
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.causal_blocks(q, k, v, mask, block=32))(q, k, v))
  lead = f'f32[{B},{groups},{N // groups},'
  assert all(f'{lead}32,{e}]' in jaxpr for e in (32, 64, 96, 128)) and f'{lead}22,150]' in jaxpr
  assert f'{lead}{T},{T}]' not in jaxpr
  assert f'{lead}{T},{T}]' in str(jax.make_jaxpr(lambda q, k, v: attention.grouped_query(q, k, v, mask))(q, k, v))


def _packed_rows(B, T):
  """Segment ids of B rows of T: one document filling the row, one then padding, three then padding, one token."""
  seg = np.zeros((B, T), np.int32)
  seg[0], seg[1, : T - 90] = 1, 1
  seg[2, :40], seg[2, 40:171], seg[2, 171 : T - 20] = 1, 2, 3
  seg[3, :1] = 1
  return seg


@pytest.mark.parametrize('devices', ['one', 'mesh'])
def test_splash_causal_attention_equals_the_blocked_one_values_and_gradients(devices, monkeypatch):
  """The TPU kernel, run by the Pallas interpreter: grouped-query causal attention over right-padded rows and over
  packed documents (segment ids) against causal_blocks, values and gradients; vmapped on one device, and split by
  shard_map (batch over data x fsdp, key/value heads over tensor) under a 2x2x2 mesh."""
  from jaxlm import sharding

  monkeypatch.setattr(attention, 'INTERPRET', True)
  B, T, N, K, groups = 4, 384, 4, 16, 2  # Three tiles of 128 a row: the causal mask skips whole tiles.
  rng = np.random.default_rng(0)
  q, do = (jnp.asarray(rng.normal(size=(B, T, N, K)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(B, groups, T, K)), jnp.float32) for _ in range(2))
  seg = _packed_rows(B, T)
  valid = seg > 0
  causal = np.tril(np.ones((T, T), bool))
  for packed in (False, True):
    segments = jnp.asarray(seg) if packed else None
    mask = causal[None] & ((seg[:, :, None] == seg[:, None, :]) if packed else valid[:, None, :])
    real = valid[:, :, None, None]

    def vjp(fn):
      def both(q, k, v):
        out, back = jax.vjp(fn, q, k, v)
        return jnp.where(real, out, 0), back(do * real)  # noqa: B023

      return jax.jit(both)(q, k, v)  # Arguments, not constants: XLA would fold a constant kernel while compiling.

    want, want_grads = vjp(lambda q, k, v: attention.causal_blocks(q, k, v, jnp.asarray(mask)))  # noqa: B023
    if devices == 'one':  # The kernel vmapped over the rows and key/value heads, as on a single chip.
      mesh = contextlib.nullcontext()
      ids = jnp.asarray(seg if packed else valid.astype(np.int32))
      splash = lambda q, k, v: attention._splash_causal(q, k, v, ids, P())  # noqa: E731,B023
    else:  # Traced under a mesh, as the trainer traces its step.
      mesh = jax.set_mesh(sharding.make_mesh(2, 2, 2))
      splash = lambda q, k, v: attention.fused_causal(q, k, v, jnp.asarray(valid), segments, 'splash')  # noqa: E731,B023
    with mesh:
      jaxpr = str(jax.make_jaxpr(splash)(q, k, v))
      assert 'pallas_call' in jaxpr and ('shard_map' in jaxpr) == (devices == 'mesh')
      got, got_grads = vjp(splash)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f'packed={packed}')
    for name, g, w in zip('qkv', got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f'd{name}, packed={packed}')
  # Where splash cannot run, the decoder's own blocks do: a length no tile divides, or another backend's default.
  assert attention.fused_causal(q[:, :200], k[:, :, :200], v[:, :, :200], valid[:, :200], None, 'splash') is None
  assert attention.fused_causal(q, k, v, valid, None, '') is None  # CPU: XLA's blocks.


def test_a_decoder_on_splash_gives_the_loss_and_gradients_of_its_blocks(monkeypatch):
  """A Llama shape (grouped-query) on packed rows, its loss and gradients jitted as the trainer jits its step
  (sharded batch, traced in a 2x2x2 mesh): the splash kernels run per shard and agree with the blocks."""
  from jaxlm import losses, sharding, steps

  monkeypatch.setattr(attention, 'INTERPRET', True)
  B, T = 4, 256
  seg = _packed_rows(B, T)
  starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  positions = np.arange(T) - np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=1)
  rng = np.random.default_rng(0)
  batch = {
    'input_ids': rng.integers(0, 300, (B, T)).astype(np.int32),
    'targets': rng.integers(0, 300, (B, T)),
    'loss_weights': (seg > 0).astype(np.float32),
    'segment_ids': seg,
    'position_ids': positions.astype(np.int32),
  }
  mesh = sharding.make_mesh(2, 2, 2)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch}
  results = {}
  for impl in ('splash', 'xla'):
    cfg = decoder.preset('llama-tiny', vocab_size=300, attention_impl=impl)
    graphdef, params = decoder.init(cfg, seed=2)
    loss = lambda p, b: losses.causal_lm_loss(steps.forward(graphdef, p, b), b)[0]  # noqa: B023
    fn = jax.jit(sharding.in_mesh(mesh, jax.value_and_grad(loss)), in_shardings=(None, batch_sh))
    assert ('pallas_call' in str(jax.make_jaxpr(fn)(params, batch))) == (impl == 'splash')
    value, grads = fn(params, batch)
    results[impl] = float(value), {'/'.join(map(str, k)): v[...] for k, v in jax.tree_util.tree_leaves_with_path(grads)}
  (value, grads), (want, want_grads) = results['splash'], results['xla']
  with pytest.raises(UsageError, match="model.attention_impl='explicit': a decoder runs"):  # An encoder's path only.
    decoder.preset('llama-tiny', attention_impl='explicit')
  assert value == pytest.approx(want, rel=1e-5)
  for k, g in grads.items():
    np.testing.assert_allclose(g, want_grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_presets_have_the_published_sizes():
  # GPT-2 (Radford et al. 2019; transformers' counts), Llama 3.2 1B and Llama 2 7B: every weight, tied or not.
  want = {'gpt2': 124_439_808, 'gpt2-medium': 354_823_168, 'gpt2-large': 774_030_080, 'gpt2-xl': 1_557_611_200,
          'llama-1b': 1_235_814_400, 'llama-7b': 6_738_415_616}  # fmt: skip
  for name, count in want.items():
    _, params = decoder.abstract(decoder.preset(name))  # Shapes only: nothing is allocated.
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == count, name


def test_remat_and_scan_keep_the_training_loss_and_gradients_of_an_untied_head():
  # The training path (steps.forward: the head fused into the loss) on a Llama shape with its own LM head.
  from jaxlm import losses, steps

  rng = np.random.default_rng(0)
  batch = {'input_ids': rng.integers(0, 500, (2, 24)).astype(np.int32), 'targets': rng.integers(0, 500, (2, 24)),
           'loss_weights': (rng.random((2, 24)) > 0.2).astype(np.float32)}  # fmt: skip
  results = []
  for remat, scan in (('none', False), ('full', True), ('full', False)):
    cfg = decoder.preset('llama-tiny', vocab_size=500, vocab_multiple=128, remat=remat, scan_layers=scan)
    graphdef, params = decoder.init(cfg, seed=1)
    loss = lambda p: losses.causal_lm_loss(steps.forward(graphdef, p, batch), batch)[0]  # noqa: B023
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    flat = {'/'.join(map(str, k)): np.asarray(v[...]) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    results.append((float(value), flat))
    assert cfg.padded_vocab_size == 512 and not cfg.tie_embeddings
  (ref, ref_grads), *others = results
  assert any('lm_head' in k and np.abs(g).max() > 0 for k, g in ref_grads.items())
  for value, grads in others:
    assert value == pytest.approx(ref, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
      np.testing.assert_allclose(g, ref_grads[k], rtol=1e-4, atol=1e-6, err_msg=k)
