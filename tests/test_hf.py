"""Hugging Face interop, measured against transformers' PyTorch BERT on real and random weights."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxlm
from jaxlm import hf, model
from jaxlm.errors import UsageError

TEXTS = [
  'Hi.',
  'The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon, '
  'while children play football in the park and their parents chat about the weather, '
  'the price of bread, and the long winter that is surely coming to the valley this year.',
  'Padding matters.',
  'A sentence of middling length about encoders and their embeddings.',
]
PAIRS = [('Is it raining?', 'The sky is clear and blue.'), ('Short.', 'A much longer second segment, with commas.')]


def _torch_batch(path, inputs):
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if isinstance(inputs[0], tuple):
    return tok([a for a, _ in inputs], [b for _, b in inputs], padding=True, return_tensors='pt')
  return tok(inputs, padding=True, return_tensors='pt')


def test_minilm_mean_embedding_matches_transformers(minilm_dir):
  m = jaxlm.load(minilm_dir)
  assert m.config.num_layers == 6 and m.config.hidden_size == 384
  ours = m.embed(TEXTS, pooling='mean')
  batch = _torch_batch(minilm_dir, TEXTS)
  assert batch['attention_mask'].sum(1).max() > 5 * batch['attention_mask'].sum(1).min()  # Padding is exercised.
  with torch.no_grad():
    h = transformers.BertModel.from_pretrained(minilm_dir).eval()(**batch).last_hidden_state
  w = batch['attention_mask'][..., None].float()
  ref = ((h * w).sum(1) / w.sum(1)).numpy()
  assert ours.shape == (len(TEXTS), 384)
  assert np.abs(ours - ref).max() <= 1e-4
  np.testing.assert_allclose(m.embed(TEXTS, pooling='cls'), h[:, 0].numpy(), atol=1e-4)


def test_mlm_logits_match_transformers(hf_mlm_dir):
  graphdef, params, _, report = hf.load(hf_mlm_dir)
  assert report.missing == [] and report.unused == []
  batch = _torch_batch(hf_mlm_dir, TEXTS)
  with torch.no_grad():
    ref = transformers.BertForMaskedLM.from_pretrained(hf_mlm_dir).eval()(**batch).logits.numpy()
  ids, mask, types = (batch[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids'))
  ours = np.asarray(model.apply(graphdef, params, ids, mask, types)['mlm_logits'])
  valid = mask.astype(bool)
  assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_fill_mask_top5_matches_transformers(hf_mlm_dir):
  m = jaxlm.load(hf_mlm_dir)
  pipe = transformers.pipeline('fill-mask', model=hf_mlm_dir, tokenizer=hf_mlm_dir, device='cpu', top_k=5)
  for text in ('The capital of France is [MASK].', 'I [MASK] to the store yesterday with my friend.'):
    ours, ref = m.fill_mask(text, top_k=5), pipe(text)
    assert [r['token'] for r in ours] == [r['token'] for r in ref]
    np.testing.assert_allclose([r['score'] for r in ours], [r['score'] for r in ref], atol=1e-5)
    assert [r['token_str'] for r in ours] == [r['token_str'] for r in ref]
  two = m.fill_mask('[MASK] is a [MASK].', top_k=3)
  assert len(two) == 2 and all(len(x) == 3 for x in two)
  with pytest.raises(UsageError, match=r'no \[MASK\]'):
    m.fill_mask('nothing to fill')


def test_classifier_probabilities_match_transformers(hf_cls_dir):
  m = jaxlm.load(hf_cls_dir)
  assert m.labels == ['negative', 'neutral', 'positive']
  inputs = PAIRS
  ours = m.predict(inputs)
  batch = _torch_batch(hf_cls_dir, inputs)
  with torch.no_grad():
    logits = transformers.BertForSequenceClassification.from_pretrained(hf_cls_dir).eval()(**batch).logits
  ref = torch.softmax(logits, -1).numpy()
  got = np.array([[r['probabilities'][k] for k in m.labels] for r in ours])
  assert np.abs(got - ref).max() <= 1e-4
  assert [r['label'] for r in ours] == [m.labels[i] for i in ref.argmax(-1)]
  single = m.predict(['just one text', 'and another'])
  assert len(single) == 2 and abs(sum(single[0]['probabilities'].values()) - 1) < 1e-5


def test_pretraining_heads_and_tanh_gelu_match_transformers(hf_pretraining_dir):
  graphdef, params, _, report = hf.load(hf_pretraining_dir)
  assert report.missing == [] and report.unused == []
  batch = _torch_batch(hf_pretraining_dir, PAIRS)
  with torch.no_grad():
    ref = transformers.BertForPreTraining.from_pretrained(hf_pretraining_dir).eval()(**batch)
  ids, mask, types = (batch[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids'))
  out = model.apply(graphdef, params, ids, mask, types)
  valid = mask.astype(bool)
  assert np.abs(np.asarray(out['mlm_logits'])[valid] - ref.prediction_logits.numpy()[valid]).max() <= 1e-4
  assert np.abs(np.asarray(out['nsp_logits']) - ref.seq_relationship_logits.numpy()).max() <= 1e-4


@pytest.mark.parametrize('which', ['hf_mlm_dir', 'hf_cls_dir', 'hf_pretraining_dir'])
def test_hf_to_jaxlm_to_hf_is_identical(which, request, tmp_path):
  src = request.getfixturevalue(which)
  graphdef, params, hf_cfg, _ = hf.load(src)
  cfg = nnx.merge(graphdef, params).cfg
  id2label = {int(k): v for k, v in hf_cfg.get('id2label', {}).items()} or None
  hf.save(str(tmp_path), params, cfg, tokenizer_dir=src, id2label=id2label if cfg.num_labels else None)
  before, after = load_file(os.path.join(src, 'model.safetensors')), load_file(str(tmp_path / 'model.safetensors'))
  assert sorted(before) == sorted(after)
  for k in before:
    assert np.array_equal(before[k], after[k]), k
  assert json.load(open(tmp_path / 'config.json'))['architectures'] == hf_cfg['architectures']


@pytest.mark.parametrize('vocab_multiple', [1, 128])
def test_jaxlm_export_loads_in_transformers_with_no_missing_weight(vocab_multiple, tmp_path, minilm_dir, caplog):
  cfg = model.preset('tiny', max_position_embeddings=64, nsp_head=True, hidden_act='gelu_tanh',
                     vocab_multiple=vocab_multiple)  # fmt: skip
  graphdef, params = model.init(cfg, seed=7)
  if vocab_multiple > 1:  # 30,522 rows padded to 30,592; Hugging Face gets the 30,522 real ones.
    assert params['embeddings']['word'][...].shape[0] == cfg.padded_vocab_size == 30592
    word = params['embeddings']['word']  # Padding rows that are not zero must not leak out either.
    word.set_value(word[...].at[30522:].set(1.0))
  hf.save(str(tmp_path), params, cfg, tokenizer_dir=minilm_dir)
  assert json.load(open(tmp_path / 'config.json'))['vocab_size'] == 30522
  with caplog.at_level(logging.WARNING):
    pt, info = transformers.BertForPreTraining.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  assert 'newly initialized' not in caplog.text
  batch = _torch_batch(str(tmp_path), PAIRS)
  with torch.no_grad():
    ref = pt.eval()(**batch)
  assert ref.prediction_logits.shape[-1] == 30522
  ids, mask, types = (batch[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids'))
  out = model.apply(graphdef, params, ids, mask, types)
  valid = mask.astype(bool)
  ours = np.asarray(out['mlm_logits'])[..., :30522]
  assert np.abs(ours[valid] - ref.prediction_logits.numpy()[valid]).max() <= 1e-4
  assert np.abs(np.asarray(out['nsp_logits']) - ref.seq_relationship_logits.numpy()).max() <= 1e-4


def test_hugging_face_vocabulary_padded_on_load_and_trimmed_on_save(hf_mlm_dir, tmp_path):
  graphdef, params, _, _ = hf.load(hf_mlm_dir)
  p_graphdef, padded, _, report = hf.load(hf_mlm_dir, vocab_multiple=128)
  assert report.missing == [] and report.unused == []
  cfg = nnx.merge(p_graphdef, padded).cfg
  assert (cfg.vocab_size, cfg.vocab_multiple, cfg.padded_vocab_size) == (30522, 128, 30592)
  word, bias = np.asarray(padded['embeddings']['word'][...]), np.asarray(padded['mlm']['bias'][...])
  assert word.shape == (30592, 64) and bias.shape == (30592,)
  np.testing.assert_array_equal(word[:30522], params['embeddings']['word'][...])
  assert not word[30522:].any() and not bias[30522:].any()
  batch = _torch_batch(hf_mlm_dir, TEXTS[:2])
  ids, mask, types = (batch[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids'))
  ref = np.asarray(model.apply(graphdef, params, ids, mask, types)['mlm_logits'])
  out = np.asarray(model.apply(p_graphdef, padded, ids, mask, types)['mlm_logits'])
  np.testing.assert_allclose(out[..., :30522], ref, atol=1e-5)
  assert (out[..., 30522:] < -1e37).all()
  text = 'The capital of France is [MASK].'
  fills = jaxlm.load(hf_mlm_dir, vocab_multiple=128).fill_mask(text, top_k=5)
  assert [f['token'] for f in fills] == [f['token'] for f in jaxlm.load(hf_mlm_dir).fill_mask(text, top_k=5)]
  hf.save(str(tmp_path), padded, cfg, tokenizer_dir=hf_mlm_dir)
  before, after = (
    load_file(os.path.join(hf_mlm_dir, 'model.safetensors')),
    load_file(str(tmp_path / 'model.safetensors')),
  )
  assert sorted(before) == sorted(after)
  for k in before:
    assert np.array_equal(before[k], after[k]), k


def test_pytorch_model_bin_and_old_layernorm_names(hf_mlm_dir, tmp_path):
  tensors = load_file(os.path.join(hf_mlm_dir, 'model.safetensors'))
  renamed = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): torch.from_numpy(v)
             for k, v in tensors.items()}  # fmt: skip
  torch.save(renamed, tmp_path / 'pytorch_model.bin')
  shutil.copyfile(os.path.join(hf_mlm_dir, 'config.json'), tmp_path / 'config.json')
  _, params, _, report = hf.load(str(tmp_path))
  _, ref, _, _ = hf.load(hf_mlm_dir)
  assert report.missing == [] and report.unused == []
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_load_reports_missing_and_unused(hf_mlm_dir, hf_pretraining_dir):
  _, _, _, report = hf.load(hf_mlm_dir, num_labels=2)  # MLM checkpoint, fresh pooler + classifier.
  assert set(report.missing) == {'pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias'}
  _, _, _, report = hf.load(hf_pretraining_dir, mlm_head=False, nsp_head=False)
  assert 'cls.seq_relationship.weight' in report.unused
  assert 'cls.predictions.transform.dense.weight' in report.unused


def test_bad_directories_give_one_clear_error(tmp_path, hf_mlm_dir):
  with pytest.raises(UsageError, match='config.json: missing'):
    hf.load(str(tmp_path))
  with pytest.raises(UsageError, match='no such'):
    jaxlm.load(str(tmp_path / 'nope'))
  bad = tmp_path / 'roberta'
  shutil.copytree(hf_mlm_dir, bad)
  cfg = json.load(open(bad / 'config.json'))
  json.dump({**cfg, 'model_type': 'roberta'}, open(bad / 'config.json', 'w'))
  with pytest.raises(UsageError, match="model_type='roberta' is not supported"):
    hf.load(str(bad))
  json.dump({**cfg, 'architectures': ['BertForQuestionAnswering']}, open(bad / 'config.json', 'w'))
  with pytest.raises(UsageError, match="architecture 'BertForQuestionAnswering' is not supported"):
    hf.load(str(bad))
  json.dump({**cfg, 'position_embedding_type': 'relative_key'}, open(bad / 'config.json', 'w'))
  with pytest.raises(UsageError, match='position_embedding_type'):
    hf.load(str(bad))
  json.dump(cfg, open(bad / 'config.json', 'w'))
  tensors = load_file(str(bad / 'model.safetensors'))
  tensors['bert.encoder.layer.1.intermediate.dense.weight'] = np.zeros((100, 64), np.float32)
  save_file(tensors, str(bad / 'model.safetensors'))
  with pytest.raises(UsageError) as e:
    hf.load(str(bad))
  msg = str(e.value)
  assert 'model.safetensors' in msg and 'bert.encoder.layer.1.intermediate.dense.weight' in msg
  assert '(100, 64)' in msg and 'layers/wi_kernel' in msg and '(64, 128)' in msg
  del tensors['bert.encoder.layer.1.intermediate.dense.weight']
  save_file(tensors, str(bad / 'model.safetensors'))
  with pytest.raises(UsageError, match='bert.encoder.layer.1.intermediate.dense.weight is missing'):
    hf.load(str(bad))  # Never a silent partial load of the encoder.
  tensors = {k: v for k, v in tensors.items() if 'intermediate.dense.weight' not in k}
  save_file(tensors, str(bad / 'model.safetensors'))
  with pytest.raises(UsageError, match='the encoder is incomplete, no tensor for layers/wi_kernel'):
    hf.load(str(bad))
  os.remove(bad / 'model.safetensors')
  with pytest.raises(UsageError, match='no model.safetensors or pytorch_model.bin'):
    hf.load(str(bad))


def test_heads_that_are_absent_refuse_clearly(minilm_dir):
  m = jaxlm.load(minilm_dir)
  with pytest.raises(UsageError, match='MLM head'):
    m.fill_mask('a [MASK] b')
  with pytest.raises(UsageError, match='classifier head'):
    m.predict(['text'])
