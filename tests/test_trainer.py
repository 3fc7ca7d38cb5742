"""jaxlm/trainer.py stage by stage, in this process: check_config, setup, restore_or_init, evaluate (the tasks'
evaluation against their training loss), itstime and the loop (logging, evaluation, checkpoints, NaN policies,
meshes), on conftest's tiny run. Stages share one set-up per module, compiled once."""

import ast
import contextlib
import dataclasses
import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
  _write_jsonl,
  config_file,
  logged,
  saved_arrays,
  sentiment_examples,
  tiny_config,
)
from flax import nnx

import jaxlm
from jaxlm import checkpoint, losses, steps, tasks, tokenizer, trainer
from jaxlm.data import classify as data_classify
from jaxlm.errors import UsageError

# ----------------------------------------------------------------------------- check_config

# One bad key per owner: the config's cross-part checks, the mesh, the optimizer, the model, the task, the data.
BAD = [
  ({'mesh.data': 3}, 'mesh.data*mesh.fsdp*mesh.tensor = 3*1*1 = 3, but there are 8 devices'),
  ({'global_batch_size': 12}, 'global_batch_size=12 is not divisible by the data-parallel size'),
  ({'data.seq_len': 1024}, 'data.seq_len=1024 exceeds model.max_position_embeddings=128'),
  ({'learning_rate': float('nan')}, 'learning_rate=nan: must be a finite number'),
  ({'optimizer.name': 'sgd'}, "optimizer.name='sgd'"),
  ({'warmup_ratio': 1.5}, 'warmup_ratio=1.5: must be between 0 and 1'),
  ({'model.preset': 'huge'}, "model.preset='huge'"),
  ({'model.hidden_act': 'swish'}, "model.hidden_act='swish'"),
  ({'task': 'translation'}, "task='translation'"),
  ({'data.max_predictions': 127}, 'data.max_predictions=127 exceeds the maskable tokens of data.seq_len=128'),
  ({'data.mask_prob': 1.0}, 'data.mask_prob=1.0: must be between 0 and 1'),
  ({'data.nsp': True, 'data.separate_documents': True}, 'data.separate_documents=True cannot be combined with'),
  ({'task': 'classification', 'model.init_from': '/m', 'data.nsp': True}, 'data.nsp=True is for pretraining'),
  (
    {'task': 'classification', 'model.init_from': '/m', 'data.separate_documents': True},
    'data.separate_documents=True is for pretraining',
  ),
  ({'task': 'classification', 'model.init_from': '/m', 'data.length_window': 0}, 'data.length_window=0: must be'),
  ({'data.pack_examples': True}, 'data.pack_examples=True packs causal LM examples (task=sft); masked-LM'),
  (
    {'task': 'classification', 'model.init_from': '/m', 'data.pack_examples': True},
    "data.pack_examples=True packs causal LM examples (task=sft); task='classification' has one example a row",
  ),
  ({'data.train': 'corpus.txt'}, "data.train='corpus.txt': expected KIND:SPEC"),
  ({'data.eval': 'ftp:x'}, "data.eval='ftp:x': expected KIND:SPEC"),
  ({'wandb.entity': 'me'}, "wandb.entity='me' is set but wandb.project is empty"),
  ({'wandb.project': 'a/b'}, "wandb.project='a/b': a W&B project name cannot contain"),
]


@pytest.mark.parametrize('overrides, message', BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_check_config_stops_a_bad_config_before_any_work(overrides, message, tmp_path):
  config = config_file('quickstart', overrides)  # Let through, it would train an 8,000-token vocabulary first.
  with pytest.raises(UsageError) as e:
    trainer.train(config, str(tmp_path))
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert os.listdir(tmp_path) == []  # No vocabulary trained, nothing written, the lock released.


# ----------------------------------------------------------------------------- setup, restore_or_init, evaluate


@pytest.fixture(scope='module')
def tiny(vocab_dir, eval_text, tmp_path_factory):
  """setup() of the tiny run with an eval set: built once, its functions compiled once for the module."""
  config = tiny_config(vocab_dir, {'data.eval': eval_text, 'eval_every_steps': 6})
  return trainer.setup(config, str(tmp_path_factory.mktemp('tiny')))


def _fresh(run, workdir):
  """restore_or_init of `run` on another workdir: (state, start, input iterator, checkpointer)."""
  return trainer.restore_or_init(dataclasses.replace(run, workdir=str(workdir)))


def test_setup_builds_the_run_and_writes_nothing(tiny, vocab_dir):
  assert dict(tiny.mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert tiny.task.name == 'mlm' and tiny.task.predictions == 5
  assert tiny.tokenizer.vocab_size == tokenizer.load(vocab_dir).vocab_size
  m = tiny.mcfg
  assert (m.num_layers, m.hidden_size, m.mlm_head, m.nsp_head) == (2, 128, True, False)
  assert set(tiny.batch_sh) == set(tiny.train_ds.element_spec) and tiny.init is None
  assert list(tiny.eval_sets) == [''] and len(tiny.eval_sets['']) > 1
  assert os.listdir(tiny.workdir) == []  # The workdir is written only once restore_or_init succeeded.


def test_restore_or_init_initialises_a_fresh_sharded_state(tiny, tmp_path):
  states = []
  for name in ('a', 'b'):
    state, start, _, ckpt = _fresh(tiny, tmp_path / name)
    ckpt.close()
    assert start == 0 and int(state['step']) == 0
    states.append(state)
  assert checkpoint.is_array_tree_equal(states[0], states[1])  # Seeded: the same parameters every time.
  word = states[0]['params']['embeddings']['word']
  assert word[...].sharding.mesh.shape == tiny.mesh.shape
  workdir = tmp_path / 'a'
  assert json.loads((workdir / 'model_config.json').read_text())['hidden_size'] == 128
  assert json.loads((workdir / 'config.json').read_text())['num_train_steps'] == 12
  assert (workdir / 'tokenizer' / 'tokenizer.json').exists()


def test_the_step_trains(tiny, tmp_path):
  state, _, train_iter, ckpt = _fresh(tiny, tmp_path)
  ckpt.close()
  batch = tiny.to_global(next(train_iter))
  curve = []
  for _ in range(8):  # The same batch again and again: its loss must fall.
    state, metrics = tiny.step_fn(state, batch)
    curve.append(float(metrics['loss']))
  assert {'loss', 'mlm_accuracy', 'learning_rate', 'grad_norm'} <= set(metrics)
  assert int(state['step']) == 8
  assert curve[-1] < curve[0] - 0.2, curve  # Dropout is on: not every step, but the run, goes down.


def test_setup_for_a_given_batch_reads_no_input_and_builds_the_same_step(tiny, tmp_path):
  state, _, train_iter, ckpt = _fresh(tiny, tmp_path / 'a')
  ckpt.close()
  local = next(train_iter)
  given = trainer.setup(tiny.config, str(tmp_path / 'b'), example_batch=local)
  assert given.train_ds is None and given.eval_sets == {} and set(given.batch_sh) == set(tiny.batch_sh)
  fresh = trainer.fresh_state(given)
  assert checkpoint.is_array_tree_equal(fresh, state)  # The same seeded state as restore_or_init's.
  _, want = tiny.step_fn(state, tiny.to_global(local))
  _, got = given.step_fn(fresh, given.to_global(local))
  assert float(got['loss']) == float(want['loss']) and float(got['grad_norm']) == float(want['grad_norm'])


def test_mlm_evaluation_is_the_training_loss_over_the_whole_eval_set(tiny, tmp_path):
  state, _, _, ckpt = _fresh(tiny, tmp_path)
  ckpt.close()
  got = trainer.evaluate(tiny, state)
  assert set(got) == {'loss', 'mlm_loss', 'mlm_accuracy'}
  params = tiny.export_params(state)
  forward = jax.jit(lambda p, b: steps.forward(tiny.graphdef, p, b))
  per_batch, weights = [], []
  for b in tiny.eval_sets['']:
    _, m = losses.mlm_loss(forward(params, b), b)  # The training loss: a mean over this batch's predictions.
    per_batch.append((float(m['mlm_loss']), float(m['mlm_accuracy'])))
    weights.append(float(b['masked_weights'].sum()))
  assert len(set(weights)) > 1  # Batches of unequal weight: a plain mean of the batch losses would differ.
  want = np.average(per_batch, axis=0, weights=weights)
  np.testing.assert_allclose([got['mlm_loss'], got['mlm_accuracy']], want, rtol=1e-5)
  assert got['loss'] == got['mlm_loss']


@pytest.fixture(scope='module')
def classify(straight, tmp_path_factory):
  """setup() of a classification run that starts from the tiny pretraining run (model.init_from), on 21 eval
  examples (the last batch of 8 padded). Returns (run, what setup printed)."""
  d = tmp_path_factory.mktemp('classify')
  rows = lambda examples: [{'text': t, 'label': ('negative', 'positive')[y]} for t, y in examples]  # noqa: E731
  config = config_file('finetune_files', {
    'model.init_from': str(straight), 'data.train': f'jsonl:{_write_jsonl(d / "train.jsonl", rows(sentiment_examples(0, 32)))}',
    'data.eval': f'jsonl:{_write_jsonl(d / "dev.jsonl", rows(sentiment_examples(1, 21)))}', 'global_batch_size': 8,
    'data.seq_len': 32, 'num_train_steps': 4, 'eval_every_steps': 4,
  })  # fmt: skip
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    run = trainer.setup(config, str(d / 'run'))
  return run, out.getvalue()


def test_a_new_task_is_one_registered_class(classify, monkeypatch):
  # What a new module in jaxlm/tasks/ would hold: a class and @register. set-up, the heads, the eval sets and the
  # best-checkpoint metric come from it; the trainer names no task.
  class ByF1(tasks.TASKS['classification']):
    name = 'classification_by_f1'

    def default_best_metric(self):
      return 'eval_f1', 'max'

  monkeypatch.setitem(tasks.TASKS, ByF1.name, ByF1)
  assert tasks.register(ByF1) is ByF1 and tasks.get('classification_by_f1') is ByF1
  config = classify[0].config.copy_and_resolve_references()
  config.task = 'classification_by_f1'
  run = trainer.setup(config, classify[0].workdir + '_by_f1')
  assert type(run.task) is ByF1 and run.task.best_metric() == ('eval_f1', 'max')
  assert run.mcfg.num_labels == 2 and list(run.eval_sets) == list(classify[0].eval_sets)
  with pytest.raises(UsageError, match="task='no_such_task'"):
    tasks.get('no_such_task')


def test_imports_inside_functions_say_why():
  # Imports live at the top of each module; the few inside a function carry a `# lazy: ...` reason.
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxlm')
  inner = []
  for dirpath, _, files in os.walk(root):
    for name in (f for f in files if f.endswith('.py')):
      path = os.path.join(dirpath, name)
      lines = open(path).read().split('\n')
      for fn in ast.walk(ast.parse('\n'.join(lines))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
              inner.append((path, node.lineno, ' '.join(lines[node.lineno - 3 : node.end_lineno])))
  assert inner and len(inner) <= 5, inner
  assert all('# lazy:' in text for _, _, text in inner), [(p, n) for p, n, text in inner if '# lazy:' not in text]


def test_restore_or_init_starts_from_init_from_with_the_new_heads_named(classify, straight, capsys):
  run, log = classify
  line = next(ln for ln in log.splitlines() if ln.startswith('init from'))
  assert line.startswith(f'init from {straight}: loaded ')
  assert set(line.split('; new: ')[1].split(', ')) == {'pooler/kernel', 'pooler/bias', 'classifier/kernel',
                                                        'classifier/bias'}  # fmt: skip
  assert 'layers/q_kernel' in line.split('; new: ')[0] and 'mlm/' not in line  # A classifier has no MLM head.
  state, start, _, ckpt = trainer.restore_or_init(run)
  ckpt.close()
  assert start == 0 and 'fine-tuning (full): ' in capsys.readouterr().out
  pretrained = saved_arrays(straight, 12)['params']  # The newest step of the run it starts from.
  for group in ('embeddings', 'layers'):
    for path, var in nnx.to_flat_state(state['params'][group]):
      node = pretrained[group]
      for k in path:
        node = node[k]
      np.testing.assert_array_equal(var.get_value(), node, err_msg=f'{group}/{path}')
  assert run.task.labels == ['negative', 'positive']
  assert state['params']['classifier']['kernel'][...].shape == (128, 2)


def test_classification_evaluation_is_the_training_loss_over_the_real_rows(classify):
  run, _ = classify
  state, _, _, ckpt = trainer.restore_or_init(run)
  ckpt.close()
  got = trainer.evaluate(run, state)
  assert set(got) == {'accuracy', 'f1', 'loss'}
  params = run.export_params(state)
  forward = jax.jit(lambda p, b: steps.forward(run.graphdef, p, b))
  batches = run.eval_sets['validation']
  logits = np.concatenate([np.asarray(forward(params, b)['logits']) for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  real = np.concatenate([b['weights'] for b in batches]) > 0
  assert real.sum() == 21 and (~real).sum() == 3  # Padding rows that must count nowhere.
  loss, metrics = losses.classification_loss({'logits': logits[real]}, {'labels': labels[real]})
  np.testing.assert_allclose(got['loss'], float(loss), rtol=1e-5)
  np.testing.assert_allclose(got['accuracy'], float(metrics['accuracy']), rtol=1e-6)


def test_length_buckets_give_the_loss_gradients_and_metrics_of_full_padding(classify):
  run, _ = classify
  state, _, _, ckpt = trainer.restore_or_init(run)
  ckpt.close()
  params = run.export_params(state)
  widths = {b['input_ids'].shape[1] for b in run.eval_sets['validation']}
  assert widths <= {16, 24, 32} and 16 in widths  # Sorted by length, most of the eval set needs 16 tokens.
  bucketed = trainer.evaluate(run, state)
  whole = {**run.config.data.to_dict(), 'bucket_lengths': 'none'}
  padded_sets, n = data_classify.eval_batches(
    run.config.data.eval, run.tokenizer, labels=run.task.labels, seq_len=32, global_batch_size=8, data_cfg=whole,
    process_index=0, process_count=1, split='validation',
  )  # fmt: skip
  assert n == 21 and {b['input_ids'].shape[1] for b in padded_sets} == {32}
  outputs = jax.device_get([run.eval_fn(params, run.to_global(b)) for b in padded_sets])
  padded = run.task.summarize('validation', outputs)
  assert set(padded) == set(bucketed)
  np.testing.assert_allclose([padded[k] for k in sorted(padded)], [bucketed[k] for k in sorted(padded)], rtol=1e-5)

  batch = next(iter(run.train_ds))
  batch = {k: np.asarray(v) for k, v in batch.items()}
  T = batch['input_ids'].shape[1]
  assert T == 16  # Short sentences: the batch is padded to the first bucket.
  fill = {'input_ids': run.tokenizer.pad_id}  # Mask and token types pad with 0.
  wide = {
    k: np.pad(v, ((0, 0), (0, 32 - T)), constant_values=fill.get(k, 0)) if v.ndim == 2 else v for k, v in batch.items()
  }

  def loss(p, b):
    return run.task.loss_fn(run.mesh)(steps.forward(run.graphdef, p, b), b)[0]

  grad = jax.jit(jax.value_and_grad(loss))
  (l16, g16), (l32, g32) = grad(params, batch), grad(params, wide)
  np.testing.assert_allclose(float(l16), float(l32), rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g16), nnx.to_flat_state(g32)):
    np.testing.assert_allclose(
      np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4, atol=1e-6, err_msg=str(path)
    )


# ----------------------------------------------------------------------------- packed documents kept apart


def test_the_programs_a_run_needs_later_compile_ahead_in_the_background(classify, tmp_path, capsys):
  run, _ = classify
  run = trainer.setup(run.config, str(tmp_path / 'run'))  # Jitted functions of its own: nothing compiled in memory.
  capsys.readouterr()
  state, _, train_iter, ckpt = trainer.restore_or_init(run)
  ckpt.close()
  batch = run.to_global(next(train_iter))
  assert run.task.batch_lengths() == (16, 24, 32) and batch['input_ids'].shape[1] == 16
  trainer.compile_ahead(run, state, batch, trainer.COMPILE_AHEAD_STEPS).shutdown(wait=True)
  params = run.export_params(state)
  requests = []  # Compilations asked for (each one compiles, or reads the persistent compilation cache).
  listening = [True]
  jax.monitoring.register_event_listener(
    lambda event, **_: requests.append(event) if listening[0] and event.endswith('compile_requests_use_cache') else None
  )
  try:
    for batches in run.eval_sets.values():  # Every shape of the eval set, ...
      jax.block_until_ready([run.eval_fn(params, run.to_global(b)) for b in batches])
    local = {k: np.asarray(v) for k, v in next(train_iter).items()}
    for T in (24, 32):  # ... and the train step at the other batch lengths: already compiled.
      wide = {k: np.pad(v, ((0, 0), (0, T - v.shape[1]))) if v.ndim == 2 else v for k, v in local.items()}
      state, _ = run.step_fn(state, run.to_global(wide))
    jax.block_until_ready(state)
    assert requests == []
    state, _ = run.step_fn(state, batch)  # The first step's own length is the loop's to compile.
    jax.block_until_ready(state)
    assert requests
  finally:
    listening[0] = False


@pytest.fixture(scope='module')
def packed(vocab_dir, eval_text, tmp_path_factory):
  """setup() of the tiny run with data.separate_documents and an eval set at steps 6 and 12."""
  config = tiny_config(vocab_dir, {'data.separate_documents': True, 'data.eval': eval_text, 'eval_every_steps': 6})
  return trainer.setup(config, str(tmp_path_factory.mktemp('packed')))


def test_a_packed_document_predicts_as_if_it_were_alone(packed, tmp_path):
  state, _, train_iter, ckpt = _fresh(packed, tmp_path)
  ckpt.close()
  batch = next(train_iter)
  assert {'segment_ids', 'position_ids'} <= set(packed.batch_sh)
  params = packed.export_params(state)
  logits = jax.jit(lambda p, b: steps.forward(packed.graphdef, p, b)['mlm_logits'])
  rows = {k: v for k, v in batch.items() if k != 'masked_positions'}  # Logits at every position.
  together = np.asarray(logits(params, rows))
  pieces = [(r, np.flatnonzero(batch['segment_ids'][r] == s)) for r in range(len(batch['segment_ids']))
            for s in range(1, batch['segment_ids'][r].max() + 1)]  # fmt: skip
  assert len(pieces) > len(batch['segment_ids'])  # Rows that hold several documents.
  T = batch['input_ids'].shape[1]
  alone = {k: np.zeros((len(pieces), T), np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  for i, (r, at) in enumerate(pieces):  # Each piece as a sequence of its own, from position 0, right-padded.
    alone['input_ids'][i, : len(at)] = batch['input_ids'][r, at]
    alone['attention_mask'][i, : len(at)] = 1
  alone_logits = np.asarray(logits(params, alone))
  for i, (r, at) in enumerate(pieces):
    np.testing.assert_allclose(together[r, at], alone_logits[i, : len(at)], rtol=1e-5, atol=1e-5, err_msg=str(i))
  # Without the ids the same rows attend across documents: later pieces predict otherwise.
  mixed = np.asarray(logits(params, {k: v for k, v in rows.items() if k not in ('segment_ids', 'position_ids')}))
  r, at = next((r, at) for r, at in pieces if at[0] > 0)
  assert np.abs(mixed[r, at] - together[r, at]).max() > 1e-3


def test_packed_documents_train_and_evaluate(packed, tmp_path):
  state, start, train_iter, ckpt = _fresh(packed, tmp_path)
  last = trainer.loop(dataclasses.replace(packed, workdir=str(tmp_path)), state, start, train_iter, ckpt)
  losses_ = logged(tmp_path)
  assert sorted(losses_) == list(range(1, 13)) and all(np.isfinite(list(losses_.values())))
  assert losses_[12] < losses_[1], losses_
  evals = logged(tmp_path, 'eval_loss')
  assert sorted(evals) == [6, 12] and all(np.isfinite(list(evals.values()))) and last['eval_loss'] == evals[12]


# ----------------------------------------------------------------------------- the loop


def test_itstime_every_n_steps_and_at_the_last_never_when_off():
  assert [s for s in range(1, 11) if trainer.itstime(s, 3, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 11) if trainer.itstime(s, 5, 10)] == [5, 10]
  assert [s for s in range(1, 11) if trainer.itstime(s, 1, 10)] == list(range(1, 11))
  assert [s for s in range(1, 11) if trainer.itstime(s, 20, 10)] == [10]  # Longer than the run: at its end.
  assert not any(trainer.itstime(s, 0, 10) for s in range(11))  # 0: never, not even at the last step.


def test_the_loop_logs_evaluates_and_saves_every_n_steps_and_at_the_last_keeping_the_best(
  vocab_dir, eval_text, tmp_path
):
  # A high rate without warmup: the eval loss moves both ways, so the best step need not be the last.
  config = tiny_config(vocab_dir, {
    'num_train_steps': 10, 'log_every_steps': 4, 'eval_every_steps': 3, 'checkpoint_every_steps': 3,
    'keep_checkpoints': 1, 'data.eval': eval_text, 'learning_rate': 0.05, 'warmup_steps': 0,
  })  # fmt: skip
  last = trainer.train(config, str(tmp_path))
  assert sorted(logged(tmp_path)) == [4, 8, 10]
  evals = logged(tmp_path, 'eval_loss')
  assert sorted(evals) == [3, 6, 9, 10]
  assert last['eval_loss'] == evals[10] and 'loss' in last  # What train() returns: the last logged metrics.
  assert json.loads((tmp_path / 'eval_results.json').read_text())['step'] == 10
  best_dir = tmp_path / 'checkpoints' / 'best'
  kept = [int(d) for d in os.listdir(best_dir) if d.isdigit()]
  assert kept == [min(evals, key=evals.get)]
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [10]  # keep_checkpoints=1
  assert jaxlm.load(str(best_dir / str(kept[0]))).fill_mask('a [MASK] b', top_k=2)


def test_a_nan_loss_stops_the_run_and_is_never_saved(vocab_dir, tmp_path):
  config = tiny_config(vocab_dir, {'num_train_steps': 30, 'learning_rate': 1e9, 'clip_grad_norm': 0.0,
                                   'checkpoint_every_steps': 1})  # fmt: skip
  with pytest.raises(FloatingPointError, match=r'the loss is (nan|inf); stopping|the parameters non-finite'):
    trainer.train(config, str(tmp_path))
  assert not (tmp_path / '.lock').exists()
  ck = checkpoint.Checkpointer(str(tmp_path))
  saved = ck.steps()
  ck.close()
  assert saved and max(saved) < 30
  bad = [
    s for s in saved if not all(np.isfinite(x).all() for x in jax.tree.leaves(saved_arrays(tmp_path, s)['params']))
  ]
  assert not bad, f'steps {bad} were saved with non-finite parameters'


def test_the_skip_policy_leaves_bad_updates_out(vocab_dir, tmp_path):
  config = tiny_config(vocab_dir, {'learning_rate': 1e9, 'clip_grad_norm': 0.0, 'nan_policy': 'skip'})
  trainer.train(config, str(tmp_path))
  skipped = logged(tmp_path, 'skipped_steps')
  assert max(skipped) == 12 and skipped[12] > 0
  assert [skipped[s] for s in sorted(skipped)] == sorted(skipped.values())  # A running count.
  state = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / '12' / 'state'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))  # Never a NaN state on disk.


def test_the_loss_curve_is_the_same_on_every_mesh(vocab_dir, straight, straight_cli, tmp_path):
  ref = logged(straight_cli)  # One device, in a process of its own.
  assert sorted(ref) == list(range(1, 13)) and ref[12] < ref[1]
  curves = {'data8': logged(straight)}
  for name, (data, fsdp, tensor) in {'fsdp8': (1, 8, 1), '2x2x2': (2, 2, 2)}.items():
    config = tiny_config(vocab_dir, {'num_train_steps': 6, 'checkpoint_every_steps': 6, 'mesh.data': data,
                                     'mesh.fsdp': fsdp, 'mesh.tensor': tensor})  # fmt: skip
    trainer.train(config, str(tmp_path / name))
    curves[name] = logged(tmp_path / name)
  for name, curve in curves.items():
    steps_ = sorted(curve)
    np.testing.assert_allclose([curve[s] for s in steps_], [ref[s] for s in steps_], rtol=2e-4, err_msg=name)
