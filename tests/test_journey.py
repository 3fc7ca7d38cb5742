"""A user's journey across stages, each stage a fresh process as a user runs it:

the quickstart pretraining (twice: the same tokenizer and losses) -> fine-tune from the workdir -> export int8 ->
fine-tune again from that export -> predict -> export --format hf -> transformers loads it and
agrees -> jaxlm.load agrees. Stages that do not read each other's output run at the same time.
"""

import json
import os

import numpy as np
import pytest
from conftest import _write_jsonl, sentiment_examples, start_cli

from jaxlm import tokenizer

LABELS = ('negative', 'positive')


def _ok(proc, what):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, f'{what}\n{err[-3000:]}'
  assert 'Traceback' not in err, err[-3000:]
  return out


def _cli(module, *args, devices=2):
  return _ok(start_cli(module, *args, devices=devices), f'{module} {args}')


def _together(*commands):
  """Commands that do not depend on each other, started at once (each still a process of its own):
  (module, args, devices, optimized) each; `optimized`: XLA's default back end (conftest.xla_flags)."""
  procs = [(start_cli(module, *args, devices=devices, optimized=optimized), f'{module} {args}')
           for module, args, devices, optimized in commands]  # fmt: skip
  return [_ok(p, what) for p, what in procs]


def _losses(workdir):
  return [r['loss'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r]


# The quickstart command, shortened: a 3,000-token vocabulary, 20 steps, an evaluation and a profile.
PRETRAIN = [
  '--config', 'configs/quickstart.py', '--config.num_train_steps=20', '--config.log_every_steps=5',
  '--config.eval_every_steps=20', '--config.data.train_tokenizer_vocab=3000', '--config.profile_start_step=5',
  '--config.profile_num_steps=2',
]  # fmt: skip


def _finetune(init_from, workdir, data, steps=4):
  train, dev = data
  return [
    '--config', 'configs/finetune_files.py', '--workdir', workdir, f'--config.model.init_from={init_from}',
    f'--config.data.train=jsonl:{train}', f'--config.data.eval=jsonl:{dev}', f'--config.num_train_steps={steps}',
    '--config.global_batch_size=8', '--config.data.seq_len=32', '--config.learning_rate=1e-3',
    f'--config.eval_every_steps={steps}', '--config.log_every_steps=2', f'--config.checkpoint_every_steps={steps}',
    '--config.data.shuffle_buffer=96',  # The file's size: the default 10,000 reads it 100 times before a batch.
  ]  # fmt: skip


@pytest.fixture(scope='module')
def journey(tmp_path_factory):
  d = tmp_path_factory.mktemp('journey')
  rows = lambda examples: [{'text': t, 'label': LABELS[y]} for t, y in examples]  # noqa: E731
  data = (_write_jsonl(d / 'train.jsonl', rows(sentiment_examples(0, 96))),
          _write_jsonl(d / 'dev.jsonl', rows(sentiment_examples(1, 24))))  # fmt: skip
  runs = {name: d / name for name in ('pre_a', 'pre_b', 'ft1', 'ft1_int8', 'ft2', 'ft2_hf')}
  # 20 steps of 32 x 128 cost more than their compiles: XLA's optimizing back end.
  pretrain = lambda name: ('jaxlm.train', [*PRETRAIN, '--workdir', runs[name]], 1, True)  # noqa: E731
  (stdout,) = _together(pretrain('pre_a'))
  # The same command again (the programs pre_a compiled come from the persistent cache), beside the fine-tune.
  _together(pretrain('pre_b'), ('jaxlm.train', _finetune(runs['pre_a'], runs['ft1'], data), 2, False))
  _cli('jaxlm.export', '--checkpoint', runs['ft1'], '--out', runs['ft1_int8'], '--quantize', 'int8')
  _cli('jaxlm.train', *_finetune(runs['ft1_int8'], runs['ft2'], data))
  texts = [t for t, _ in sentiment_examples(5, 20)]
  _write_jsonl(d / 'inputs.jsonl', [{'text': t} for t in texts])
  predict = ['--checkpoint', runs['ft2'], '--input', d / 'inputs.jsonl', '--output', d / 'preds.jsonl']
  _together(
    ('jaxlm.predict', predict, 2, False),
    ('jaxlm.export', ['--checkpoint', runs['ft2'], '--out', runs['ft2_hf'], '--format', 'hf'], 2, False),
  )
  return runs, texts, d / 'preds.jsonl', stdout


def test_the_quickstart_trains_logs_evaluates_and_profiles(journey):
  runs, *_, stdout = journey
  workdir = runs['pre_a']
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  for key in ('step', 'loss', 'mlm_accuracy', 'learning_rate', 'grad_norm', 'tokens_per_s'):
    assert key in rows[0], key
  assert rows[-1]['step'] == 20 and 'eval_loss' in rows[-1]
  assert rows[-2]['loss'] < rows[0]['loss'] - 0.5  # The MLM loss is falling.
  assert 'tok/s' in stdout and 'MFU' in stdout and 'ETA' in stdout
  assert os.listdir(workdir / 'tensorboard')
  assert json.load(open(workdir / 'config.json'))['num_train_steps'] == 20
  assert tokenizer.load(str(workdir / 'tokenizer')).vocab_size > 1000
  traces = [f for _, _, fs in os.walk(workdir / 'profile') for f in fs]
  assert any(f.endswith('.xplane.pb') for f in traces), traces


def test_the_same_command_twice_gives_the_same_tokenizer_and_losses(journey):
  runs, *_ = journey
  a, b = (runs[n] / 'tokenizer' / 'tokenizer.json' for n in ('pre_a', 'pre_b'))
  assert a.read_bytes() == b.read_bytes()
  assert len(_losses(runs['pre_a'])) == 4
  assert _losses(runs['pre_a']) == _losses(runs['pre_b'])


def test_every_stage_is_self_contained(journey):
  runs, *_ = journey
  pretrain_vocab = (runs['pre_a'] / 'tokenizer' / 'vocab.txt').read_bytes()
  for name in ('ft1', 'ft2'):  # Fine-tuned runs hold their tokenizer and labels.
    assert (runs[name] / 'tokenizer' / 'vocab.txt').read_bytes() == pretrain_vocab, name
    assert json.loads((runs[name] / 'labels.json').read_text()) == list(LABELS)
  assert (runs['ft1_int8'] / 'tokenizer' / 'vocab.txt').read_bytes() == pretrain_vocab
  assert json.loads((runs['ft1_int8'] / 'model_config.json').read_text())['quantization'] == 'int8'
  assert (runs['ft2_hf'] / 'vocab.txt').read_bytes() == pretrain_vocab
  # The second fine-tune started from the int8 export's (dequantized) weights, not from scratch.
  log = (runs['ft2'] / 'metrics.jsonl').read_text()
  assert log and json.loads((runs['ft2'] / 'eval_results.json').read_text())['step'] == 4


def test_predict_export_transformers_and_load_agree(journey):
  import torch
  import transformers

  import jaxlm

  runs, texts, preds_path, _ = journey
  preds = [json.loads(line) for line in open(preds_path)]
  assert len(preds) == len(texts) and all(p['label'] in LABELS for p in preds)
  m = jaxlm.load(runs['ft2'])
  ours = m.predict(texts, return_logits=True)
  assert [p['label'] for p in ours] == [p['label'] for p in preds]
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(runs['ft2_hf']).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(runs['ft2_hf'])
  assert hf_model.config.id2label == dict(enumerate(LABELS))
  with torch.no_grad():
    enc = hf_tok(texts, padding=True, return_tensors='pt')
    theirs = hf_model(**enc).logits.numpy()
  np.testing.assert_allclose(np.array([p['logits'] for p in ours]), theirs, atol=1e-4)
  exported = jaxlm.load(runs['ft2_hf']).predict(texts, return_logits=True)
  np.testing.assert_allclose([p['logits'] for p in exported], [p['logits'] for p in ours], atol=1e-5)
