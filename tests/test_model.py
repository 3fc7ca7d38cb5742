"""The encoder and heads: shapes, logical axes, masked gather, scan/remat/padding invariance, dtypes,
vocabulary padding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import blocks, losses, model
from jaxlm.errors import UsageError

LOGICAL = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'layers', None}

# The model run as one compiled program (eagerly, each of its operations would compile on its own).
_apply = jax.jit(model.apply, static_argnums=0)


@pytest.fixture(scope='module')
def tiny():
  cfg = model.ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
    max_position_embeddings=64, nsp_head=True, num_labels=3,
  )  # fmt: skip
  graphdef, params = model.init(cfg, seed=0)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 97, (3, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  mask[2, 4:] = 0
  types = np.zeros_like(ids)
  types[:, 8:] = 1
  return cfg, graphdef, params, ids, mask, types


def test_presets_match_the_published_family():
  sizes = {k: (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) for k, c in model.PRESETS.items()}
  assert sizes == {
    'tiny': (2, 128, 2, 512), 'mini': (4, 256, 4, 1024), 'small': (4, 512, 8, 2048),
    'medium': (8, 512, 8, 2048), 'base': (12, 768, 12, 3072), 'large': (24, 1024, 16, 4096),
  }  # fmt: skip
  assert all(c.vocab_size == 30522 for c in model.PRESETS.values())
  # BERT-base with its pooler and MLM head: 110M parameters (the decoder is tied).
  _, params = model.abstract(model.preset('base'))
  assert 109_000_000 < model.count_params(params) < 111_000_000


def test_every_parameter_has_logical_axes(tiny):
  cfg, _, params, *_ = tiny
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata().get('axes')
    assert axes is not None and len(axes) == var.ndim, (path, axes)
    assert set(axes) <= LOGICAL, (path, axes)
    assert var[...].dtype == jnp.float32


def test_output_shapes(tiny):
  cfg, graphdef, params, ids, mask, types = tiny
  out = _apply(graphdef, params, ids, mask, types)
  assert out['hidden'].shape == (3, 16, 32)
  assert out['pooled'].shape == (3, 32)
  assert out['mlm_logits'].shape == (3, 16, 97)
  assert out['nsp_logits'].shape == (3, 2)
  assert out['logits'].shape == (3, 3)


def test_masked_positions_gather_before_the_vocabulary(tiny):
  cfg, graphdef, params, ids, mask, types = tiny
  pos = np.array([[1, 5, 9], [0, 2, 3], [3, 3, 1]], np.int32)
  full = _apply(graphdef, params, ids, mask, types)['mlm_logits']
  gathered = _apply(graphdef, params, ids, mask, types, pos)['mlm_logits']
  assert gathered.shape == (3, 3, 97)
  np.testing.assert_allclose(gathered, np.take_along_axis(np.asarray(full), pos[..., None], 1), atol=1e-5)


def test_padding_does_not_change_valid_positions(tiny):
  cfg, graphdef, params, ids, mask, types = tiny
  short = _apply(graphdef, params, ids[:, :10], mask[:, :10], types[:, :10])['hidden']
  padded_ids = ids.copy()
  padded_ids[:, 10:] = 0  # Whatever sits in padding must not leak into the valid positions.
  padded_mask = mask.copy()
  padded_mask[:, 10:] = 0
  long = _apply(graphdef, params, padded_ids, padded_mask, types)['hidden']
  for row in range(3):
    n = int(padded_mask[row].sum())
    np.testing.assert_allclose(long[row, :n], short[row, :n], atol=1e-5)


def _loss(graphdef, params, ids, mask, types):
  out = model.apply(graphdef, params, ids, mask, types)
  return out['mlm_logits'].astype(jnp.float32).mean() + out['logits'].sum()


def test_scan_unroll_and_remat_agree(tiny):
  cfg, graphdef, params, ids, mask, types = tiny
  ref_out = _apply(graphdef, params, ids, mask, types)['hidden']
  ref_grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(graphdef, params, ids, mask, types)
  assert not cfg.scanned and model.preset('base').scanned  # Unrolled up to 6 layers by default.
  for variant in (dict(scan_layers=True), dict(remat='full', scan_layers=True), dict(remat='save_dots')):
    g, _ = model.abstract(cfg.replace(**variant))
    np.testing.assert_allclose(_apply(g, params, ids, mask, types)['hidden'], ref_out, atol=1e-5)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(g, params, ids, mask, types)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_dropout_only_with_an_rng(tiny):
  cfg, graphdef, params, ids, mask, types = tiny
  det = _apply(graphdef, params, ids, mask, types)['hidden']
  a = _apply(graphdef, params, ids, mask, types, rng=jax.random.key(1))['hidden']
  b = _apply(graphdef, params, ids, mask, types, rng=jax.random.key(1))['hidden']
  c = _apply(graphdef, params, ids, mask, types, rng=jax.random.key(2))['hidden']
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(det)).max() > 1e-2
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params(tiny):
  cfg, _, params, ids, mask, types = tiny
  g, _ = model.abstract(cfg.replace(dtype='bfloat16'))
  out = jax.jit(lambda p: model.apply(g, p, ids, mask, types))(params)
  assert out['hidden'].dtype == jnp.bfloat16
  ref = _apply(model.abstract(cfg)[0], params, ids, mask, types)['hidden']
  assert np.abs(np.asarray(out['hidden'], np.float32) - np.asarray(ref)).max() < 0.1
  grads = jax.jit(jax.grad(lambda p: model.apply(g, p, ids, mask, types)['logits'].astype(jnp.float32).sum()))(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads))


def test_bad_configs_name_the_key():
  with pytest.raises(UsageError, match='model.hidden_size=100 is not divisible by model.num_heads=3'):
    model.ModelConfig(hidden_size=100, num_heads=3)
  with pytest.raises(UsageError, match='model.hidden_act'):
    model.ModelConfig(hidden_act='swiglu')
  with pytest.raises(UsageError, match='model.preset'):
    model.preset('huge')
  with pytest.raises(UsageError, match='model.vocab_multiple=0: must be a positive integer'):
    model.ModelConfig(vocab_multiple=0)
  with pytest.raises(UsageError, match='max_position_embeddings'):
    cfg = model.preset('tiny', max_position_embeddings=8, vocab_size=50)
    g, p = model.init(cfg)
    model.apply(g, p, np.ones((1, 9), np.int32))


def test_dropout_bits_are_uniform_and_independent_of_sharding():
  key = jax.random.key(7)
  raw = blocks.random_u16(key, (16, 8, 128, 128))
  assert raw.dtype == jnp.uint16 and raw.shape == (16, 8, 128, 128)
  u = np.asarray(raw).astype(np.float64)
  for lane in range(4):  # The four 16-bit parts of each threefry evaluation.
    part = u[..., lane::4]
    assert abs(part.mean() / 65535 - 0.5) < 0.002, lane
    assert abs(np.mean(part < 0.9 * 65536) - 0.9) < 0.002, lane
  flat = u.reshape(-1, 4)
  assert np.abs(np.corrcoef(flat.T) - np.eye(4)).max() < 0.01
  assert not np.array_equal(np.asarray(blocks.random_u16(jax.random.key(8), (4, 8))), u[0, 0, 0, :8])
  # The same values whichever way the array is split across devices.
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((4, 2), ('a', 'b'))
  one = blocks.random_u16(key, (8, 6, 32))
  split = jax.jit(lambda k: blocks.random_u16(k, (8, 6, 32)), out_shardings=NamedSharding(mesh, P('a', None, 'b')))(key)
  np.testing.assert_array_equal(np.asarray(split), np.asarray(one))
  # Other key types and odd widths use jax.random.bits.
  rbg = jax.random.key(7, impl='rbg')
  np.testing.assert_array_equal(blocks.random_u16(rbg, (4, 8)), jax.random.bits(rbg, (4, 8), jnp.uint16))
  np.testing.assert_array_equal(blocks.random_u16(key, (4, 7)), jax.random.bits(key, (4, 7), jnp.uint16))


# ----------------------------------------------------------------------------- vocabulary padding


def _mlm_loss_and_grads(cfg, params, ids, pos, weights):
  graphdef, _ = model.abstract(cfg)
  batch = {'masked_ids': np.take_along_axis(ids, pos, -1), 'masked_weights': weights}

  @jax.jit
  def f(params):
    def loss(p):
      out = model.apply(graphdef, p, ids, None, None, pos)
      return losses.mlm_loss(out, batch)[0], (out['mlm_logits'], losses.mlm_loss(out, batch)[1])

    return jax.value_and_grad(loss, has_aux=True)(params)

  hlo = f.lower(params).compile().as_text()
  (loss, (logits, metrics)), grads = f(params)
  return float(loss), metrics, np.asarray(logits), grads, hlo


def test_padded_vocabulary_changes_no_loss_gradient_or_prediction():
  cfg = model.ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=32,
    hidden_dropout=0.0, attention_dropout=0.0,
  )  # fmt: skip
  padded_cfg = cfg.replace(vocab_multiple=64)
  assert (cfg.padded_vocab_size, padded_cfg.padded_vocab_size, cfg.replace(vocab_multiple=97).padded_vocab_size) == (
    97, 128, 97,
  )  # fmt: skip
  _, params = model.init(cfg, seed=0)
  _, padded = model.init(padded_cfg, seed=0)
  word, bias = padded['embeddings']['word'][...], padded['mlm']['bias'][...]
  assert word.shape == (128, 32) and bias.shape == (128,)
  # A fresh padded model is the unpadded one plus zero rows: vocab_multiple changes no initial value.
  np.testing.assert_array_equal(word[:97], params['embeddings']['word'][...])
  assert not np.asarray(word[97:]).any() and not np.asarray(bias[97:]).any()
  for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(padded)):
    if path not in (('embeddings', 'word'), ('mlm', 'bias')):
      np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
  # Whatever the padding rows hold, they take no part: large values there change nothing.
  rng = np.random.default_rng(0)
  padded['embeddings']['word'].set_value(word.at[97:].set(rng.normal(0, 10.0, (31, 32)).astype(np.float32)))
  padded['mlm']['bias'].set_value(bias.at[97:].set(50.0))
  ids = rng.integers(0, 97, (4, 16)).astype(np.int32)
  pos = np.sort(rng.choice(np.arange(16), (4, 5)), -1).astype(np.int32)
  weights = np.ones((4, 5), np.float32)
  weights[3, 2:] = 0
  loss, metrics, logits, grads, ref_hlo = _mlm_loss_and_grads(cfg, params, ids, pos, weights)
  p_loss, p_metrics, p_logits, p_grads, hlo = _mlm_loss_and_grads(padded_cfg, padded, ids, pos, weights)
  assert abs(p_loss - loss) < 1e-6 and float(p_metrics['mlm_accuracy']) == float(metrics['mlm_accuracy'])
  np.testing.assert_allclose(p_logits[..., :97], logits, atol=1e-6)
  assert (p_logits[..., 97:] < -1e37).all() and (p_logits.argmax(-1) < 97).all()
  for (path, g), (_, pg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(p_grads)):
    g, pg = np.asarray(g[...]), np.asarray(pg[...])
    if path in (('embeddings', 'word'), ('mlm', 'bias')):
      assert not pg[97:].any(), path  # Padding rows get exactly zero gradient ...
      pg = pg[:97]  # ... and the real rows the gradient of the unpadded model.
    np.testing.assert_allclose(pg, g, atol=1e-6, rtol=1e-5, err_msg=str(path))
  # The mask is a select that XLA fuses into the loss's existing passes over the logits: the
  # compiled step has the same top-level operations (no new vocabulary-wide buffer, no scatter).
  top_level = lambda text: re.findall(r'\n\s+\S+ = \S+ (\w[\w-]*)\(', text[text.index('ENTRY') :])  # noqa: E731
  assert top_level(hlo) == top_level(ref_hlo) and 'select' not in top_level(hlo)
  # In bfloat16 the padding logit is finite and the loss stays finite.
  g16, _ = model.abstract(padded_cfg.replace(dtype='bfloat16'))
  out16 = _apply(g16, padded, ids, None, None, pos)
  batch = {'masked_ids': np.take_along_axis(ids, pos, -1), 'masked_weights': weights}
  assert np.isfinite(np.asarray(out16['mlm_logits'], np.float32)).all()
  assert abs(float(losses.mlm_loss(out16, batch)[0]) - loss) < 0.05


def test_vocab_rows_pad_and_trim_only_the_vocabulary_axis():
  table = np.arange(12, dtype=np.float32).reshape(6, 2)
  cfg = model.ModelConfig(vocab_size=5, hidden_size=2, num_heads=1, vocab_multiple=4)
  assert cfg.padded_vocab_size == 8
  padded = blocks.fit_vocab(table, ('vocab', 'embed'), cfg)  # Saved with 6 rows, this model has 8.
  np.testing.assert_array_equal(padded, np.concatenate([table, np.zeros((2, 2), np.float32)]))
  np.testing.assert_array_equal(blocks.fit_vocab(table, ('vocab', 'embed'), cfg.replace(vocab_multiple=1)), table[:5])
  np.testing.assert_array_equal(blocks.vocab_rows(padded, ('vocab', 'embed'), 5), table[:5])
  np.testing.assert_array_equal(blocks.fit_vocab(table, (None, 'embed'), cfg), table)  # Not a vocabulary table.
  # Fewer rows than the real vocabulary is another vocabulary, left for the caller to name.
  np.testing.assert_array_equal(blocks.fit_vocab(table[:4], ('vocab', 'embed'), cfg), table[:4])


# ----------------------------------------------------------------------------- bottleneck adapters


def _with_adapters(cfg, params, **adapter):
  """(graphdef, params): the model of `params` with fresh adapters (`adapter`: size, placement) added."""
  g, fresh = model.init(cfg.replace(**adapter), seed=1)
  values = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(fresh):
    if path in values:
      var.set_value(values[path].get_value())
  return g, fresh


@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scanned'])
def test_fresh_adapters_leave_the_output_equal_and_sit_before_the_residual_add(tiny, scan_layers):
  cfg, _, params, ids, mask, types = tiny
  cfg = cfg.replace(scan_layers=scan_layers)
  g0 = model.abstract(cfg)[0]
  ref = _apply(g0, params, ids, mask, types)
  first_token = jax.jit(lambda g, p: model.apply(g, p, ids, mask, types, first_token_only=True), static_argnums=0)
  ref_first = first_token(g0, params)
  placements = (('both', ('attn', 'ffn')), ('attention', ('attn',)), ('ffn', ('ffn',)))
  for placement, sites in placements[:1] if scan_layers else placements:  # Scanned: the placements share code.
    g, p = _with_adapters(cfg, params, adapter_size=5, adapter_placement=placement)
    names = sorted(k for k in p['layers'] if k.startswith('adapter_'))
    assert names == sorted(
      f'adapter_{s}_{n}' for s in sites for n in ('down_bias', 'down_kernel', 'up_bias', 'up_kernel')
    )
    assert p['layers'][f'adapter_{sites[0]}_down_kernel'][...].shape == (3, 32, 5)
    out = _apply(g, p, ids, mask, types)
    for k in ('hidden', 'pooled', 'mlm_logits', 'nsp_logits', 'logits'):  # Up-projection zero: the identity.
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f'{placement} {k}')
    if placement != 'both':
      continue  # The one-site placements run a subset of 'both''s code: its first-token path and gradients.
    np.testing.assert_array_equal(first_token(g, p)['logits'], ref_first['logits'])
    # From zero, the up-projections get a gradient (and the down-projections not yet): training starts.
    grads = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(g, p, ids, mask, types)['layers']
    for s in sites:
      assert np.abs(grads[f'adapter_{s}_up_kernel'][...]).max() > 0
      assert not np.asarray(grads[f'adapter_{s}_down_kernel'][...]).any()
  if scan_layers:
    return
  # With a zero down-projection an adapter adds its up bias to the sublayer's output, before the residual add and
  # the LayerNorm: what the attention output's (o) or the feed-forward output's (wo) bias would do.
  shift = np.broadcast_to(np.linspace(-0.5, 0.5, 32, dtype=np.float32), (3, 32))
  g, p = _with_adapters(cfg, params, adapter_size=5, adapter_placement='both')
  for site, bias in (('attn', 'o_bias'), ('ffn', 'wo_bias')):
    moved = jax.tree.map(lambda x: x, p)
    moved['layers'][f'adapter_{site}_down_kernel'].set_value(jnp.zeros((3, 32, 5)))
    moved['layers'][f'adapter_{site}_up_bias'].set_value(jnp.asarray(shift))
    same = jax.tree.map(lambda x: x, params)
    same['layers'][bias].set_value(same['layers'][bias][...] + shift)
    np.testing.assert_allclose(
      _apply(g, moved, ids, mask, types)['logits'], _apply(g0, same, ids, mask, types)['logits'], atol=1e-5
    )
    assert np.abs(np.asarray(_apply(g, moved, ids, mask, types)['logits'] - ref['logits'])).max() > 1e-3
