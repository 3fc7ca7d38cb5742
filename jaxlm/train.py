"""Masked-LM pretraining: `python -m jaxlm.train --config configs/NAME.py --workdir DIR`.

Override any config key with `--config.KEY=VALUE`. Run the same command on every host of a
pod slice; on GPU clusters or for CPU processes on one machine, add `--coordinator_address`,
`--num_processes` and `--process_id`.

The run reads top to bottom: config -> mesh -> input -> model -> sharded state -> step -> loop.
WORKDIR receives config.json, model_config.json, tokenizer/ (when trained here),
metrics.jsonl and TensorBoard events (process 0 only).
"""

from __future__ import annotations

if __name__ == '__main__':  # Before JAX is imported: huge pages for XLA's CPU buffers (hostenv.py).
  import os

  from jaxlm import hostenv

  # TensorFlow only runs the input pipeline: its start-up banners (oneDNN, absl) would bury our lines.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  hostenv.reexec_with_hugepages()

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where metrics, TensorBoard events and the tokenizer go.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for jax.distributed (GPU / CPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes, for jax.distributed.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1, for jax.distributed.')


def init_distributed() -> None:
  """jax.distributed from the flags, or automatically on a multi-host TPU slice."""
  import jax

  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()


def build_tokenizer(config, workdir: str):
  """data.tokenizer, else the tokenizer of model.init_from, else WORKDIR/tokenizer if it was trained on this run's
  data and settings, else one trained on data.train (saved there once it passed its checks)."""
  import hashlib

  from etils import epath

  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.errors import UsageError

  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  if config.model.init_from:
    from jaxlm import export

    return tokenizer_lib.load(export.tokenizer_dir(config.model.init_from))
  d = config.data
  saved = epath.Path(workdir) / 'tokenizer'  # Local or remote (gs://).
  if (saved / 'tokenizer.json').exists():
    _check_saved_tokenizer(saved, config)
    return tokenizer_lib.load(str(saved))
  if not d.train_tokenizer_vocab:
    raise UsageError('data.tokenizer is empty: set it, or model.init_from, or data.train_tokenizer_vocab')
  import jax

  from jaxlm.data import pretrain

  # Training is deterministic, so every process trains its own copy: no process waits on another's errors.
  t0 = time.perf_counter()
  record = _tokenizer_record(config)  # Before reading: a file changed meanwhile shows as a mismatch next time.
  tok = tokenizer_lib.train_wordpiece(pretrain.iter_texts(d.train, d.to_dict()), d.train_tokenizer_vocab, d.lowercase)
  if tok.vocab_size <= len(tokenizer_lib.SPECIAL_TOKENS):
    raise UsageError(f'data.train={d.train!r}: no text to train a tokenizer on')
  if jax.process_count() > 1:  # The same vocabulary everywhere, or the processes read different data.
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(tok.backend.to_str().encode()).digest(), np.uint8)
    if not (np.asarray(multihost_utils.process_allgather(digest)) == digest).all():
      raise UsageError(
        f'data.train={d.train!r}: the processes trained different vocabularies, so they read different data'
      )
  print(f'trained a {tok.vocab_size}-token WordPiece vocabulary in {time.perf_counter() - t0:.1f}s', flush=True)
  if jax.process_index() == 0:
    tok.save(str(saved), {'training.json': json.dumps(record, indent=2)})
  return tok


def _tokenizer_record(config) -> dict:
  """What a trained tokenizer depends on: the data.* settings that shape its texts, and (path, size, mtime)
  of every file data.train names (the builtin corpora are named by data.train itself)."""
  from jaxlm.config import split_spec

  d = config.data
  kind, _ = split_spec(d.train, 'data.train')
  rec = {'data.train': d.train, 'data.train_tokenizer_vocab': d.train_tokenizer_vocab, 'data.lowercase': d.lowercase}
  if kind == 'text':
    rec['data.text_docs'] = d.text_docs
  if kind in ('jsonl', 'csv', 'tsv', 'tfds'):
    rec['data.text_field'] = d.text_field
  if kind == 'tfds':
    rec.update({'data.train_split': d.train_split, 'data.tfds_data_dir': d.tfds_data_dir})
  if kind in ('text', 'jsonl', 'csv', 'tsv'):
    import tensorflow as tf

    from jaxlm.data import sources

    stats = [(p, tf.io.gfile.stat(p)) for p in sources.files(d.train, 'data.train')]
    rec['files'] = [[p, st.length, st.mtime_nsec] for p, st in stats]
  return rec


def _check_saved_tokenizer(saved, config) -> None:
  """Accepts WORKDIR/tokenizer if its record matches this run (a run that trains none accepts any vocabulary
  size); an error naming the first difference otherwise."""
  from jaxlm.errors import UsageError

  d, path = config.data, saved / 'training.json'
  if not path.exists():  # Saved before records were kept.
    print(f'warning: {saved} has no record of its training data (training.json): using it unchecked', flush=True)
    return
  old, new = json.loads(path.read_text()), _tokenizer_record(config)
  if not d.train_tokenizer_vocab:
    del new['data.train_tokenizer_vocab']
  fix = f'use another workdir or delete {saved}'
  if old.get('data.train') != d.train:
    raise UsageError(
      f'{saved} was trained on data.train={old.get("data.train")!r} (vocab {old.get("data.train_tokenizer_vocab")})'
      f' but this run has data.train={d.train!r}: {fix}'
    )
  for k, v in new.items():
    if k != 'files' and old.get(k) != v:
      raise UsageError(f'{saved} was trained with {k}={old.get(k)!r} but this run has {k}={v!r}: {fix}')
  if old.get('files') != new.get('files'):
    changed = sorted({tuple(f) for f in old.get('files') or []} ^ {tuple(f) for f in new.get('files') or []})
    raise UsageError(
      f'{saved} was trained on data.train={d.train!r} but its files have changed since ({changed[0][0]}'
      f' is new, gone, or of another size or time): {fix}'
    )
  print(f'using the tokenizer in {saved}, trained on data.train={d.train!r}', flush=True)


def model_config(config, vocab_size: int, num_labels: int = 0):
  """The ModelConfig for this run: the preset, the config's overrides, the tokenizer's vocabulary
  and the heads of the task (MLM [+ NSP] for pretraining, a classifier for fine-tuning)."""
  from jaxlm import model

  m = config.model
  mlm = config.task == 'mlm'
  kw = dict(
    vocab_size=vocab_size, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
    attention_impl=m.attention_impl or None, hidden_dropout=m.hidden_dropout,
    attention_dropout=m.attention_dropout, max_position_embeddings=m.max_position_embeddings,
    vocab_multiple=m.vocab_multiple, mlm_head=mlm, nsp_head=mlm and config.data.nsp,
    pooler=not mlm or config.data.nsp, num_labels=num_labels,
  )  # fmt: skip
  if m.hidden_act:
    kw['hidden_act'] = m.hidden_act
  return model.preset(m.preset, **kw)


def train(config, workdir: str) -> dict:
  """Runs the whole training (pretraining or fine-tuning); returns the last logged metrics."""
  from jaxlm.lock import WorkdirLock

  with WorkdirLock(workdir):  # Before anything is written: a second run on the workdir stops here.
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  """The run itself, on a locked workdir."""
  import jax
  from etils import epath
  from flax import nnx

  from jaxlm import checkpoint, glue, model, optim, peft, perf, report, sharding, steps, tasks
  from jaxlm import config as config_lib
  from jaxlm.data import pretrain
  from jaxlm.errors import UsageError

  # ---- config and mesh
  glue_task = glue.resolve(config)
  config_lib.validate(config, jax.device_count())
  finetune = config.task != 'mlm'
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  is_main = jax.process_index() == 0
  if is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or remote (gs://).

  # ---- input
  tokenizer = build_tokenizer(config, workdir)
  B, T, P = config.global_batch_size, config.data.seq_len, config.data.max_predictions
  data_cfg = config.data.to_dict()
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  label_values = label_names = None
  if finetune:
    from jaxlm.data import classify

    if config.task == 'classification':
      if glue_task is not None:  # TFDS gives class ids; the names are the task's.
        label_values, label_names = [str(i) for i in range(len(glue_task.labels))], list(glue_task.labels)
      else:  # The label set of the training file, saved with every checkpoint.
        label_values = label_names = classify.label_set(config.data.train, data_cfg)
      print(f'{len(label_names)} labels: {label_names[:20]}', flush=True)
    make_train_ds = lambda seed: classify.classify_dataset(
      config.data.train, tokenizer, labels=label_values, seq_len=T, global_batch_size=B, data_cfg=data_cfg,
      seed=seed, shuffle_buffer=config.data.shuffle_buffer, repeat=True, **shard,
    )  # fmt: skip
  else:
    data_kw = dict(
      seq_len=T, max_predictions=P, global_batch_size=B, mask_prob=config.data.mask_prob, nsp=config.data.nsp,
      whole_word=config.data.whole_word_masking, **shard,
    )  # fmt: skip
    make_train_ds = lambda seed: pretrain.pretrain_dataset(
      config.data.train, tokenizer, seed=seed, shuffle_buffer=config.data.shuffle_buffer, data_cfg=data_cfg,
      **data_kw,
    )  # fmt: skip
  train_ds = make_train_ds(config.seed)
  # The eval set is read once, in full, here: a problem with it (an unseen label, an empty file)
  # stops the run before any training time is spent.
  eval_data, eval_splits = {}, ()
  if config.data.eval and config.eval_every_steps:
    if finetune:
      from jaxlm.data import classify

      eval_splits = tuple(s.strip() for s in config.data.eval_split.split(',') if s.strip())
      for split in eval_splits:
        eval_data[split] = classify.eval_batches(
          config.data.eval, tokenizer, labels=label_values, seq_len=T, global_batch_size=B, data_cfg=data_cfg,
          split=split, **shard,
        )  # fmt: skip
    else:
      eval_data['mlm'] = pretrain.eval_batches(
        config.data.eval, tokenizer, seed=config.seed + 1, data_cfg=data_cfg, **data_kw
      )

  # ---- model and sharded state
  num_labels = (len(label_values) if label_values else 1) if finetune else 0
  mcfg = model_config(config, tokenizer.vocab_size, num_labels)
  if config.model.init_from:
    knobs = ('mlm_head', 'nsp_head', 'pooler', 'num_labels', 'dtype', 'scan_layers', 'remat', 'attention_impl',
             'hidden_dropout', 'attention_dropout', 'vocab_multiple')  # fmt: skip
    overrides = {k: getattr(mcfg, k) for k in knobs}
    loaded, new = _load_init(config.model.init_from, overrides, config.seed)
    mcfg = nnx.merge(*loaded).cfg
    if tokenizer.vocab_size > mcfg.vocab_size:
      raise UsageError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.init_from has {mcfg.vocab_size}')
    names = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(loaded[1])]
    print(
      f'init from {config.model.init_from}: loaded {len(names) - len(new)} parameters'
      f' ({", ".join(n for n in names if n not in new)}); new: {", ".join(new) or "none"}',
      flush=True,
    )
  graphdef, abstract_params = model.abstract(mcfg)
  param_sh = sharding.param_shardings(abstract_params, mesh)
  warmup = config_lib.warmup_steps(config)
  if warmup > config.num_train_steps // 2:
    print(
      f'warning: warmup covers {warmup} of {config.num_train_steps} steps, so the learning rate barely decays;'
      ' set warmup_ratio (e.g. 0.1) or a smaller warmup_steps',
      flush=True,
    )
  schedule = optim.make_schedule(config.learning_rate, warmup, config.num_train_steps, config.lr_schedule)
  o, ft = config.optimizer, config.finetune
  tx = optim.make_optimizer(o.name, schedule, config.weight_decay, o.b1, o.b2, o.eps, config.clip_grad_norm or None)
  mode = ft.mode if finetune else 'full'
  labels_tree = peft.labels(abstract_params, mode)
  frozen, lora = None, mode == 'lora'
  if mode != 'full':
    tx, frozen = peft.wrap_optimizer(tx, labels_tree, lora), peft.frozen_mask(labels_tree)
  pr = config.prune
  if pr.sparsity:  # Gradual magnitude pruning: masks in the optimizer state, pruned weights exactly 0.
    from jaxlm import prune

    end = config_lib.prune_end_step(pr.end_step, config.num_train_steps)
    tx = prune.magnitude_pruning(tx, prune.cubic_schedule(pr.sparsity, pr.begin_step, end, pr.frequency))
  targets, lora_scale = peft.parse_targets(ft.lora_targets), ft.lora_alpha / ft.lora_rank

  def fresh_state(params):
    adapters = peft.init_adapters(params, targets, ft.lora_rank, config.seed) if lora else None
    return steps.init_state(params, tx, adapters)

  abstract_state = jax.eval_shape(fresh_state, abstract_params)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints, best_mode=_best(config, glue_task)[1])
  train_iter = pretrain.Iterator(train_ds)
  restored = ckpt.restore(abstract_state, state_sh, train_iter) if ckpt.steps() else None
  start = 0
  if restored is not None:
    state, _, start = restored
    print(f'resumed from the checkpoint of step {start} (checksum {checkpoint.checksum(state):08x})', flush=True)
    if start >= config.num_train_steps:
      print(
        f'nothing to do: the checkpoint is at step {start} and num_train_steps={config.num_train_steps}', flush=True
      )
      ckpt.close()
      return {}
    if not ckpt.input_restored:
      if ckpt.restored_process_count != jax.process_count():  # The tf.data position is per process.
        why = (
          f'step {start} was saved by {ckpt.restored_process_count} process(es) and this run has'
          f' {jax.process_count()}; the input position cannot move to another process count'
        )
      else:
        why = f'the input position of step {start} could not be saved (see the warning of that run)'
      print(
        f'warning: {why}, so the input stream restarts, shuffled and masked with data seed'
        f' {config.seed + start} (seed + step)',
        flush=True,
      )
      train_iter = pretrain.Iterator(make_train_ds(config.seed + start))
  elif config.model.init_from:
    params = jax.device_put(loaded[1], param_sh)
    state = jax.jit(fresh_state, out_shardings=state_sh)(params)
  else:
    seed = config.seed
    state = jax.jit(lambda: fresh_state(nnx.split(model.Bert(mcfg, rngs=nnx.Rngs(seed)))[1]), out_shardings=state_sh)()
  if is_main:  # Only now: a resume refused (another model size) leaves the run's metadata as it was.
    epath.Path(workdir, 'config.json').write_text(config.to_json_best_effort(indent=2))
    epath.Path(workdir, 'model_config.json').write_text(json.dumps(dataclasses.asdict(mcfg), indent=2))
    if not epath.Path(workdir, 'tokenizer', 'tokenizer.json').exists():  # The run is self-contained.
      tokenizer.save(str(epath.Path(workdir, 'tokenizer')))
    if label_names:
      epath.Path(workdir, 'labels.json').write_text(json.dumps(label_names))
  n_params = model.count_params(state['params'])
  print(
    f'{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, mesh'
    f' {dict(mesh.shape)}; {n_params / 1e6:.1f}M parameters (layers {mcfg.num_layers}, hidden {mcfg.hidden_size},'
    f' vocab {mcfg.vocab_size})',
    flush=True,
  )
  if finetune:
    trainable, total = peft.count(abstract_params, labels_tree, state.get('adapters'))
    print(
      f'fine-tuning ({mode}): {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})', flush=True
    )

  # ---- step functions
  batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in train_ds.element_spec.items()}
  root_rng = jax.random.key(config.seed)
  # MLM: vocabulary-parallel cross-entropy when mesh.tensor > 1.
  loss_fn = tasks.classification_loss if finetune else functools.partial(tasks.mlm_loss, mesh=mesh)
  skip = config.nan_policy == 'skip'
  train_step = steps.make_train_step(
    graphdef, tx, loss_fn, config.grad_accum_steps, schedule, skip_nonfinite=skip, frozen=frozen,
    lora_scale=lora_scale,
  )  # fmt: skip
  step_fn = jax.jit(
    lambda s, b: train_step(s, b, jax.random.fold_in(root_rng, s['step'])),
    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0,
  )  # fmt: skip

  def model_params(s):  # What leaves the run: LoRA adapters folded into the dense weights.
    return peft.merge(s['params'], s['adapters'], lora_scale) if 'adapters' in s else s['params']

  export_params = jax.jit(model_params, out_shardings=state_sh['params'])

  if pr.sparsity:
    from jaxlm import prune

    sparsity_fn = jax.jit(lambda p: prune.sparsity_fraction(p))

  def to_global(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}

  if finetune:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def predict_batch(s, batch):
      out = steps.forward(graphdef, model_params(s), batch)
      logits = out['logits'].astype(jax.numpy.float32)
      y = batch['labels']
      if num_labels == 1:
        return {'pred': logits[:, 0], 'label': y, 'loss': (logits[:, 0] - y) ** 2, 'weight': batch['weights']}
      logp = jax.nn.log_softmax(logits, -1)
      nll = -jax.numpy.take_along_axis(logp, y[:, None].astype(int), -1)[:, 0]
      return {'pred': logits.argmax(-1), 'label': y, 'loss': nll, 'weight': batch['weights']}

    eval_fn = jax.jit(predict_batch, in_shardings=(state_sh, batch_sh), out_shardings=replicated)
  else:
    eval_fn = jax.jit(steps.make_eval_step(graphdef, loss_fn), in_shardings=(state_sh['params'], batch_sh))

  def evaluate() -> dict:
    return _evaluate_classifier() if finetune else _evaluate_mlm()

  def _evaluate_classifier() -> dict:
    from jaxlm import metrics

    names = glue_task.metrics if glue_task else _file_metrics(config.task, label_names)
    out = {}
    for split in eval_splits:
      batches, n = eval_data[split]
      # Outputs are replicated (every process sees each whole global batch); fetched once, at the end.
      rows = jax.device_get([eval_fn(state, to_global(local)) for local in batches])
      r = {k: np.concatenate([x[k] for x in rows]) for k in rows[0]}
      real = r['weight'] > 0  # Padding rows (weight 0) count nowhere.
      assert real.sum() == n, (real.sum(), n)
      prefix = glue.eval_prefix(split, eval_splits)
      for k, v in metrics.compute(names, r['pred'][real], r['label'][real]).items():
        out[prefix + k] = v
      out[prefix + 'loss'] = float(r['loss'][real].mean())
    return out

  def _evaluate_mlm() -> dict:
    sums = {}
    for local in eval_data['mlm']:
      batch = to_global(local)
      norm = jax.device_get(tasks.normalizers(batch))
      m = jax.device_get(eval_fn(state['params'], batch))
      # Batch means -> sums, so the result is the mean over every real example of the eval set.
      for k, v in m.items():
        w = norm['nsp'] if k.startswith('nsp') else norm['mlm']
        sums[k] = sums.get(k, 0.0) + float(v) * float(w)
        sums[f'_n_{k}'] = sums.get(f'_n_{k}', 0.0) + float(w)
    out = {k: v / sums[f'_n_{k}'] for k, v in sums.items() if not k.startswith('_n_') and k != 'loss'}
    out['loss'] = out['mlm_loss'] + out.get('nsp_loss', 0.0)
    return out

  # ---- loop
  flops = perf.train_flops_per_step(mcfg, B, T, 0 if finetune else P)
  reporter = report.Reporter(workdir, config.num_train_steps, B * T, flops, float('nan'))
  step, last, pending, undecodable, skipped = start, {}, None, 0, 0.0
  meta = {'config': json.loads(config.to_json_best_effort()), 'model': dataclasses.asdict(mcfg)}
  if label_names:
    meta['labels'] = label_names
  best_metric, _ = _best(config, glue_task)
  # SIGTERM (preemption) and a first Ctrl-C stop the run after the step in flight, saved; a second Ctrl-C aborts.
  stop_signal = {'code': 0}

  def on_signal(signum, frame):
    if signum == signal.SIGINT and stop_signal['code']:
      raise KeyboardInterrupt
    stop_signal['code'] = max(stop_signal['code'], _STOP_SIGNALS.index(signum) + 1)

  previous_handlers = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
  stopped_by = None
  try:
    while step < config.num_train_steps:
      if step == config.profile_start_step:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      batch = to_global(next(train_iter))
      state, metrics = step_fn(state, batch)
      step += 1
      if step == start + 1:  # Throughput is measured from here, without the compile.
        jax.block_until_ready(metrics)
        # The peak is measured here on CPU, once the input pipeline has filled its buffers and
        # no longer competes with the measuring matmul.
        reporter.start(step, perf.peak_tflops()[0])
      # The previous step's loss is fetched while this one runs: the host never stalls the device.
      if pending is not None:
        if skip:
          skipped += float(np.asarray(pending[1]['skipped']))
        else:
          _check_finite(*pending)
      if pretrain.Stats.undecodable > undecodable:
        undecodable = pretrain.Stats.undecodable
        print(f'warning: {undecodable} text(s) with undecodable bytes so far (replaced by U+FFFD)', flush=True)
      pending = (step, metrics)
      if step == config.profile_start_step + config.profile_num_steps and config.profile_start_step >= 0:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        host = jax.device_get(metrics)
        if pr.sparsity:
          host['sparsity'] = float(sparsity_fn(state['params']))
        if skip:
          host['skipped_steps'] = skipped + float(host.pop('skipped'))
        else:
          _check_finite(step, host)
        last = reporter.write(step, host)
      if (
        config.data.eval
        and config.eval_every_steps
        and (step % config.eval_every_steps == 0 or step == config.num_train_steps)
      ):
        evaluated = reporter.write(step, evaluate(), prefix='eval_')
        last.update(evaluated)
        if is_main:
          results = {k.removeprefix('eval_'): v for k, v in evaluated.items() if k.startswith('eval_')}
          epath.Path(workdir, 'eval_results.json').write_text(json.dumps({**results, 'step': step}, indent=2))
        if best_metric in evaluated:
          ckpt.save_best(step, export_params(state), {**meta, 'step': step}, evaluated[best_metric])
      stop = _agree(stop_signal['code'])  # Every process saves the same step when any of them got a signal.
      if stop or step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        if not skip:
          _check_finite(step, jax.device_get(metrics))  # A NaN state is never saved.
        ckpt.save(step, state, {**meta, 'step': step}, train_iter)
      if stop:
        stopped_by = _STOP_SIGNALS[stop - 1]
        print(f'{stopped_by.name}: saved the checkpoint of step {step}; exiting', flush=True)
        break
    if pending is not None and not skip:
      _check_finite(*pending)
  finally:  # Even when a NaN stops the run, saves already started are completed.
    try:
      ckpt.close()
    finally:
      for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
      reporter.close()
  if stopped_by == signal.SIGINT:  # Saved; the caller (a shell script, a notebook) still learns of the Ctrl-C.
    raise KeyboardInterrupt(f'saved the checkpoint of step {step}')
  return last


def _load_init(path: str, overrides: dict, seed: int):
  """((graphdef, params), new parameter paths) from model.init_from: an HF directory or a jaxlm
  run / export. Parameters the source lacks (a new head) are initialised fresh."""
  from flax import nnx

  from jaxlm import export, hf, quant

  if export.is_jaxlm_dir(path):  # A jaxlm run or export: parameters only, any mesh.
    g, params, new = export.load_for_init(path, seed=seed, **overrides)
    if nnx.merge(g, params).cfg.quantization != 'none':  # An int8 export trains from float kernels.
      g, params = quant.dequantize(g, params)
    return (g, params), new
  g, params, _, load_report = hf.load(path, seed=seed, **overrides)
  return (g, params), list(load_report.missing)


def _best(config, glue_task) -> tuple[str, str]:
  """(metrics key, 'min' | 'max') of the best checkpoint; 'auto' is the task's main metric."""
  if config.best_metric != 'auto':
    return config.best_metric, config.best_mode
  if config.task == 'mlm':
    return 'eval_loss', 'min'
  names = glue_task.metrics if glue_task else _file_metrics(config.task, None)
  return f'eval_{names[0]}', 'max'


def _file_metrics(task: str, label_names) -> tuple[str, ...]:
  """Metrics of a fine-tuning task on the user's files: the first is the main one."""
  if task == 'regression':
    return ('pearson', 'spearman')
  return ('accuracy', 'f1') if label_names is not None and len(label_names) == 2 else ('accuracy',)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _agree(code: int) -> int:
  """The largest `code` of all processes: 0 when no process got a stop signal, else 1 + its index in _STOP_SIGNALS."""
  import jax

  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils

  return int(np.asarray(multihost_utils.process_allgather(np.int32(code))).max())


def _check_finite(step: int, metrics) -> None:
  import numpy as np

  loss = float(np.asarray(metrics['loss']))
  if not math.isfinite(loss):
    raise FloatingPointError(
      f'step {step}: the loss is {loss}; stopping. Lower learning_rate, raise warmup_steps or check the input data.'
    )


def main(argv) -> int:
  from jaxlm.checkpoint import SaveError, quiet_orbax
  from jaxlm.errors import UsageError

  if len(argv) > 1:
    return _usage(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = FLAGS.config  # A file that failed to load raises on first attribute access.
    if config is not None:
      config.task  # noqa: B018
  except Exception as e:  # noqa: BLE001 (a missing file, a syntax error, a failing get_config)
    return _usage(f'--config: {_config_error(e)}')
  if config is None:
    return _usage('--config is required (e.g. --config configs/quickstart.py)')
  if not FLAGS.workdir:
    return _usage('--workdir is required')
  quiet_orbax()
  try:
    make_workdir(FLAGS.workdir)
    init_distributed()
    train(config, FLAGS.workdir)
  except UsageError as e:
    return _usage(str(e))
  except (FloatingPointError, SaveError) as e:  # The run's environment or numbers, not the command: exit 1.
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt as e:  # 128 + SIGINT, as a shell expects of a program stopped by Ctrl-C.
    if not e.args:  # Before the first step, or a second Ctrl-C: nothing more was saved.
      print('error: interrupted (Ctrl-C); nothing saved since the last checkpoint', file=sys.stderr, flush=True)
    return 130
  return 0


def make_workdir(workdir: str) -> None:
  """Creates the workdir (local or gs://), or raises one UsageError saying why it cannot be."""
  from etils import epath

  from jaxlm.errors import UsageError

  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except (OSError, ValueError) as e:  # FileExistsError, NotADirectoryError, PermissionError, ...
    why = getattr(e, 'strerror', None) or str(e)
    raise UsageError(f'--workdir {workdir}: cannot create it ({why})') from None
  if not path.is_dir():
    raise UsageError(f'--workdir {workdir}: exists and is not a directory')


def _config_error(e: Exception) -> str:
  """One line for a config file that cannot be loaded: the innermost cause, not the loader's wrapper."""
  while e.__cause__ is not None:
    e = e.__cause__
  if isinstance(e, SyntaxError):
    return f'{e.filename}:{e.lineno}: SyntaxError: {e.msg}'
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[-1] if lines else ""}'.rstrip(': ')


def _usage(msg: str) -> int:
  print(f'error: {msg}', file=sys.stderr, flush=True)
  return 2


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config key is one line and exit code 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    sys.exit(_usage(msg))
  except Exception as e:  # noqa: BLE001 (a config file that does not load: missing, a syntax error, ...)
    sys.exit(_usage(f'--config: {_config_error(e)}'))


if __name__ == '__main__':
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
