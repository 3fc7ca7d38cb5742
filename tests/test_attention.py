"""Attention: packed rows (segment ids, restarting positions) equal separate padded rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model, steps

# Two documents packed into one row of 16: tokens 0-4 are the first, 5-11 the second, 12-15 padding.
LENGTHS = (5, 7)
T = 16


@pytest.fixture(scope='module')
def tiny():
  cfg = model.ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
    max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.2,
  )  # fmt: skip
  graphdef, params = model.init(cfg, seed=0)
  return cfg, params


def _packed_and_separate(seed: int = 0):
  """(packed batch of one row, separate batch of one row per document) as model inputs."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(5, 97, n).astype(np.int32) for n in LENGTHS]
  ids = np.zeros((1, T), np.int32)
  segments = np.zeros((1, T), np.int32)
  positions = np.zeros((1, T), np.int32)
  separate = np.zeros((len(docs), T), np.int32)
  mask = np.zeros((len(docs), T), np.int32)
  start = 0
  for i, doc in enumerate(docs):
    n = len(doc)
    ids[0, start : start + n], segments[0, start : start + n], positions[0, start : start + n] = (
      doc,
      i + 1,
      np.arange(n),
    )
    separate[i, :n], mask[i, :n] = doc, 1
    start += n
  return ids, segments, positions, separate, mask


@pytest.mark.parametrize('scan', [False, True])
def test_packed_documents_equal_separate_rows(tiny, scan):
  cfg, params = tiny
  graphdef, _ = model.abstract(cfg.replace(scan_layers=scan))
  ids, segments, positions, separate, mask = _packed_and_separate()
  # Through steps.forward: a batch dict from the data pipeline carries the packing keys.
  packed = steps.forward(graphdef, params, {'input_ids': ids, 'segment_ids': segments, 'position_ids': positions})
  packed = packed['hidden']
  alone = model.apply(graphdef, params, separate, mask)['hidden']
  start = 0
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(packed[0, start : start + n], alone[i, :n], atol=1e-5)
    start += n
  # Without segment ids the documents see each other, and without positions they sit elsewhere.
  mixed = model.apply(graphdef, params, ids, (segments > 0).astype(np.int32), None, position_ids=positions)['hidden']
  assert np.abs(np.asarray(mixed[0, : LENGTHS[0]]) - np.asarray(alone[0, : LENGTHS[0]])).max() > 1e-2
  shifted = model.apply(graphdef, params, ids, None, None, segment_ids=segments)['hidden']
  assert np.abs(np.asarray(shifted[0, LENGTHS[0] : sum(LENGTHS)]) - np.asarray(alone[1, : LENGTHS[1]])).max() > 1e-2


def test_explicit_and_fused_attention_mask_segments(tiny):
  """The explicit path (the one attention dropout takes) and the fused one, on the same packed row."""
  cfg, _ = tiny
  _, segments, _, _, mask = _packed_and_separate()
  N, K = cfg.num_heads, cfg.head_size
  q, k, v = (jax.random.normal(jax.random.key(i), (1, T, N, K)) for i in range(3))
  # Each document alone in its own row: the same q, k, v slices, right-padded.
  alone_q, alone_k, alone_v = (jnp.zeros((len(LENGTHS), T, N, K)) for _ in range(3))
  start = 0
  for i, n in enumerate(LENGTHS):
    alone_q, alone_k, alone_v = (
      a.at[i, :n].set(x[0, start : start + n]) for a, x in ((alone_q, q), (alone_k, k), (alone_v, v))
    )
    start += n
  valid = jnp.asarray(segments > 0)
  seg = jnp.asarray(segments)
  packed_mask = model._attention_mask(valid, seg)
  alone_mask = model._attention_mask(jnp.asarray(mask, bool), None)
  assert packed_mask.shape == (1, 1, T, T) and alone_mask.shape == (2, 1, 1, T)
  packed_explicit = model._explicit_attention(q, k, v, packed_mask, cfg, None)
  packed_fused = model._attention(q, k, v, valid, seg, cfg, None)
  alone = model._explicit_attention(alone_q, alone_k, alone_v, alone_mask, cfg, None)
  start = 0
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(packed_explicit[0, start : start + n], alone[i, :n], atol=1e-5)
    np.testing.assert_allclose(packed_fused[0, start : start + n], alone[i, :n], atol=1e-5)
    start += n
  # Padding attends to padding: no row is fully masked, so nothing is NaN.
  assert np.isfinite(np.asarray(packed_explicit)).all() and np.isfinite(np.asarray(packed_fused)).all()
