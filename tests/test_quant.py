"""int8 weight-only quantization: export size on disk, agreement with the float model, int8 in the jitted forward."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import checkpoint, export, hf, model, quant, store
from jaxlm.errors import UsageError

KERNELS = ('q_kernel', 'k_kernel', 'v_kernel', 'o_kernel', 'wi_kernel', 'wo_kernel')


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope='module')
def exports(finetuned_cls_dir, tmp_path_factory):
  """The fine-tuned classifier exported from its HF directory as float32 and as int8."""
  out = tmp_path_factory.mktemp('exports')
  for name, extra in (('float', []), ('int8', ['--quantize', 'int8'])):
    assert export.main(['--checkpoint', finetuned_cls_dir, '--out', str(out / name), *extra]) == 0
  return str(out / 'float'), str(out / 'int8')


def test_int8_export_is_smaller_on_disk(exports, tmp_path):
  import orbax.checkpoint as ocp

  f_dir, q_dir = exports
  assert json.load(open(os.path.join(q_dir, 'model_config.json')))['quantization'] == 'int8'
  total_f, total_q = _du(os.path.join(f_dir, 'params')), _du(os.path.join(q_dir, 'params'))
  # The encoder's kernels alone, as Orbax writes them: float32 vs int8 + float32 scales.
  raw_f = ocp.StandardCheckpointer().restore(os.path.join(f_dir, 'params'))['layers']
  raw_q = ocp.StandardCheckpointer().restore(os.path.join(q_dir, 'params'))['layers']
  assert all(raw_q[k].dtype == np.int8 and raw_q[f'{k}_scale'].dtype == np.float32 for k in KERNELS)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'enc_f', {k: raw_f[k] for k in KERNELS})
  ckptr.save(tmp_path / 'enc_q', {k: raw_q[k] for k in KERNELS} | {f'{k}_scale': raw_q[f'{k}_scale'] for k in KERNELS})
  ckptr.wait_until_finished()
  enc_f, enc_q = _du(tmp_path / 'enc_f'), _du(tmp_path / 'enc_q')
  print(f'\nparams/ on disk: float32 {total_f / 1e6:.1f} MB, int8 {total_q / 1e6:.1f} MB ({total_q / total_f:.2f}x);'
        f' encoder kernels: {enc_f / 1e6:.1f} MB -> {enc_q / 1e6:.1f} MB ({enc_q / enc_f:.3f}x)')  # fmt: skip
  assert enc_q < 0.3 * enc_f  # int8 is a quarter of float32, plus one scale per output channel.
  # The word embeddings (11.7M of MiniLM's 22.7M parameters) stay float32: the whole export is smaller by what
  # its kernels save (the fine-tuned MiniLM is half zeros, which compress: 0.74x of the float export here).
  assert total_f - total_q > 0.9 * (enc_f - enc_q) and total_q < 0.8 * total_f


def test_int8_classifier_agrees_with_float(exports, finetuned_cls_dir):
  rows = [json.loads(line) for line in open(os.path.join(finetuned_cls_dir, 'eval.jsonl'))]
  texts = [r['text'] for r in rows]
  f_model, q_model = jaxlm.load(exports[0]), jaxlm.load(exports[1])
  assert q_model.config.quantization == 'int8'
  flat = dict(nnx.to_flat_state(q_model.params))
  assert all(flat[('layers', k)].get_value().dtype == jnp.int8 for k in KERNELS)  # int8 in memory.
  ref, got = f_model.predict(texts), q_model.predict(texts)
  same = np.mean([a['label'] == b['label'] for a, b in zip(ref, got)])
  p_ref = np.array([r['probabilities']['positive'] for r in ref])
  p_got = np.array([r['probabilities']['positive'] for r in got])
  labelled = [i for i, r in enumerate(rows) if r['label'] is not None]
  acc = {name: np.mean([res[i]['label'] == ('positive' if rows[i]['label'] else 'negative') for i in labelled])
         for name, res in (('float', ref), ('int8', got))}  # fmt: skip
  info = json.load(open(os.path.join(finetuned_cls_dir, 'finetune.json')))
  print(f'\nfine-tuned ({info["steps"]} steps, {info["seconds"]:.0f}s): accuracy float {acc["float"]:.3f},'
        f' int8 {acc["int8"]:.3f}; same label on {same:.4f} of {len(texts)};'
        f' max |p_int8 - p_float| = {np.abs(p_got - p_ref).max():.4f}')  # fmt: skip
  assert acc['float'] >= 0.9  # Fine-tuning worked (chance is 0.5).
  assert same >= 0.99
  assert np.abs(p_got - p_ref).max() < 0.05
  # The same from the HF directory, quantized on loading.
  for kw in (dict(quantize='int8'), dict(quantization='int8')):
    onload = jaxlm.load(finetuned_cls_dir, **kw).predict(texts[:16])
    np.testing.assert_allclose([r['probabilities']['positive'] for r in onload], p_got[:16], atol=1e-6)


def test_int8_stays_int8_inside_the_jitted_forward(exports):
  m = jaxlm.load(exports[1])
  ids = np.full((2, 16), 101, np.int32)
  hlo = m._fn('classify').lower(m.params, ids, np.ones_like(ids), np.zeros_like(ids)).as_text()
  main = next(line for line in hlo.splitlines() if 'func.func public @main' in line)
  # The program takes the int8 kernels as inputs ([L, D, N, K] and so on) and dequantizes them itself.
  assert main.count('tensor<6x384x12x32xi8>') == 3 and main.count('tensor<6x384x1536xi8>') == 1
  assert 'tensor<6x384x12x32xf32>' not in main and 'tensor<6x384x1536xf32>' not in main
  bf16 = jaxlm.load(exports[1], dtype='bfloat16')
  p32, p16 = m.predict(['what a wonderful day']), bf16.predict(['what a wonderful day'])
  assert p32[0]['label'] == p16[0]['label']


def test_mlm_top1_agreement(hf_mlm_dir):
  graphdef, params, _, _ = hf.load(hf_mlm_dir)
  qgraphdef, qparams = quant.quantize(graphdef, params)
  tok = jaxlm.load(hf_mlm_dir).tokenizer
  texts = [
    'The capital of France is Paris, and the capital of Italy is Rome.',
    'I went to the store yesterday with my friend to buy some bread and milk.',
    'Neural networks learn representations of language from large amounts of text.',
    'The weather this weekend will be sunny with a light breeze from the west.',
    'She plays the piano every evening after dinner, mostly pieces by Chopin.',
    'A quick brown fox jumps over the lazy dog near the river bank.',
  ]
  rows, positions = [], []
  for i, _ in tok.encode(texts, 64):  # Every word-piece masked in turn, one per sequence.
    for j in range(1, len(i) - 1):
      rows.append(i[:j] + [tok.mask_id] + i[j + 1 :])
      positions.append([j])
  T = max(map(len, rows))
  ids, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
  for r, i in enumerate(rows):
    ids[r, : len(i)], mask[r, : len(i)] = i, 1
  pos = np.array(positions, np.int32)
  ref = np.asarray(model.apply(graphdef, params, ids, mask, None, pos)['mlm_logits'])[:, 0]
  got = np.asarray(model.apply(qgraphdef, qparams, ids, mask, None, pos)['mlm_logits'])[:, 0]
  agree = np.mean(ref.argmax(-1) == got.argmax(-1))
  top2 = np.sort(ref, -1)[:, -2:]
  margin = (top2[:, 1] - top2[:, 0])[ref.argmax(-1) != got.argmax(-1)]  # Of the float model, where they differ.
  print(f'\nMLM top-1 agreement int8 vs float32: {agree:.4f} over {len(rows)} masked texts'
        f' (max |logit diff| {np.abs(ref - got).max():.4f}, logit std {ref.std():.3f};'
        f' float top-2 margins where they differ: {[f"{x:.3f}" for x in margin]})')  # fmt: skip
  # A random model's top two are often near ties; int8 only swaps such ones.
  assert len(rows) >= 80 and agree >= 0.93 and np.all(margin < 2 * np.abs(ref - got).max())


def test_quantize_kernel_error_and_dequantize_roundtrip():
  w = np.random.default_rng(0).normal(size=(3, 8, 5)).astype(np.float32)
  w[1, :, 2] = 0.0  # A dead channel: scale 1, all zeros.
  q, scale = quant.quantize_kernel(w, (1,))
  assert q.dtype == np.int8 and scale.shape == (3, 5) and np.abs(q).max() == 127
  assert np.all(np.abs(q * scale[:, None, :] - w) <= scale[:, None, :] / 2 + 1e-7)
  assert np.all(q[1, :, 2] == 0)
  cfg = model.preset('tiny', vocab_size=128, max_position_embeddings=32, num_labels=3)
  graphdef, params = model.init(cfg, 0)
  qgraphdef, qparams = quant.quantize(graphdef, params)
  s = quant.summary(qparams)
  assert len(s['int8_kernels']) == 8 and s['int8_bytes'] < 0.26 * s['float32_bytes']
  dgraphdef, dparams = quant.dequantize(qgraphdef, qparams)
  assert nnx.merge(dgraphdef, dparams).cfg.quantization == 'none'
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) + 5
  a = model.apply(qgraphdef, qparams, ids)['logits']
  b = model.apply(dgraphdef, dparams, ids)['logits']
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(UsageError, match='dequantize first'):
    hf.params_to_hf(qparams, nnx.merge(qgraphdef, qparams).cfg)


def test_a_run_starts_from_an_int8_export_in_float_and_new_heads_are_named(exports, finetuned_cls_dir):
  q_graphdef, q_params, _, _ = store.load_model(exports[1])
  graphdef, params, new = store.load_for_init(exports[1], seed=0)
  assert nnx.merge(graphdef, params).cfg.quantization == 'none' and new == []
  assert checkpoint.is_array_tree_equal(params, quant.dequantize(q_graphdef, q_params)[1])
  # A head the source lacks is initialised fresh and named: from a jaxlm export and from a Hugging Face directory.
  for path in (exports[0], finetuned_cls_dir):
    graphdef, params, new = store.load_for_init(path, seed=0, mlm_head=True)
    assert nnx.merge(graphdef, params).cfg.mlm_head and new and all(n.startswith('mlm/') for n in new), (path, new)


def test_export_int8_to_hf_and_refusals(exports, tmp_path, capsys):
  assert export.main(['--checkpoint', exports[1], '--out', str(tmp_path / 'hf'), '--format', 'hf']) == 0
  back = jaxlm.load(str(tmp_path / 'hf'))  # Dequantized float tensors, readable by transformers.
  assert back.config.quantization == 'none' and back.labels == ['negative', 'positive']
  rc = export.main(['--checkpoint', exports[0], '--out', str(tmp_path / 'x'), '--format', 'hf', '--quantize', 'int8'])
  assert rc == 2 and 'holds float tensors' in capsys.readouterr().err
  # A float export read as an int8 model: the dtype mismatch is named.
  with pytest.raises(UsageError, match='is float32, the model expects int8'):
    jaxlm.load(exports[0], quantization='int8')
  with pytest.raises(UsageError, match='model.quantization'):
    model.ModelConfig(quantization='int4')


def test_int8_runs_sharded_over_a_mesh(exports):
  from jaxlm import sharding

  m = jaxlm.load(exports[1])
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  placed = jax.device_put(m.params, sharding.param_shardings(m.params, mesh))
  ids = np.full((4, 16), 2000, np.int32)
  ids[:, 0] = 101
  args = (ids, np.ones_like(ids), np.zeros_like(ids))
  np.testing.assert_allclose(np.asarray(m._fn('classify')(placed, *args)), np.asarray(m.logits(*args)), atol=1e-5)
