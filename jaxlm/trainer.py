"""The training library: `trainer.train(config, workdir)` runs a whole training, in three stages.

  setup(config, workdir)     check the config; mesh; tokenizer; the task and its data; model
                             config; optimizer; shardings; the jitted step, eval and export functions
  restore_or_init(run)       the newest intact checkpoint, else model.init_from, else a fresh
                             initialisation; then the run's metadata
  loop(run, state, ...)      step, log, evaluate, checkpoint; stop saved on SIGTERM / Ctrl-C; after the
                             last step, a decoder's greedy continuations of config.sample_prompts

The model is an encoder or a decoder as config.model.preset says (models.py); the task says which it trains.

The loop knows tasks only through the `tasks.Task` interface. `python -m jaxlm.train` (train.py)
is the command line around `train`; a notebook or tools/bench.py can call the stages themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm import chat, checkpoint, generate, models, optim, peft, perf, prune, report, sharding, steps, store, tasks
from jaxlm import config as config_lib
from jaxlm.data import pretrain, sources, vocab
from jaxlm.errors import UsageError
from jaxlm.lock import WorkdirLock
from jaxlm.tasks import glue

# Model fields a run sets on the model it starts from (model.init_from): its heads and how it runs.
INIT_OVERRIDES = ('mlm_head', 'nsp_head', 'pooler', 'num_labels', 'dtype', 'scan_layers', 'remat', 'attention_impl',
                  'hidden_dropout', 'attention_dropout', 'vocab_multiple')  # fmt: skip
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def check_config(config, num_devices: int) -> None:
  """Every check of the config, before any work: the cross-part ones (config.validate) and each
  owner's (task, model, optimizer, data sources). Fills a GLUE preset (task_name) first."""
  glue.resolve(config)
  config_lib.validate(config, num_devices)
  task_cls = tasks.get(config.task)
  sources.check_config(config.data)
  family = models.family_of_preset(config.model.preset)
  if family != task_cls.family:
    raise UsageError(f'model.preset={config.model.preset!r} is {models.a(family)}; task={config.task!r} trains'
                     f' {models.a(task_cls.family)} (presets: {", ".join(models.presets(task_cls.family))})')  # fmt: skip
  if family == 'decoder' and task_cls.finetuning and config.finetune.mode == 'adapter':
    raise UsageError("finetune.mode='adapter': bottleneck adapters are for BERT encoders; a decoder fine-tunes"
                     ' with lora, head or full')  # fmt: skip
  if config.sample_prompts and family != 'decoder':
    raise UsageError(f'sample_prompts={config.sample_prompts!r}: only a decoder (a causal LM) writes text')
  models.from_config(config.model)
  optim.check_config(config, task_cls.finetuning)
  task_cls.check_config(config)


def itstime(step: int, every: int, total: int) -> bool:
  """True every `every` steps and at the last one; never when `every` is 0."""
  return bool(every) and (step % every == 0 or step == total)


@dataclasses.dataclass
class Run:
  """What a training run is built from: set up once, used by restore_or_init and loop."""

  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: Any
  task: tasks.Task
  mcfg: models.Config
  graphdef: nnx.GraphDef
  opt: optim.Optimizer
  init: nnx.State | None  # Parameters from model.init_from, or None.
  train_ds: Any  # tf.data: this process's training batches.
  eval_sets: dict  # split -> this process's eval batches, read once.
  abstract_state: Any
  state_sh: Any
  batch_sh: dict
  step_fn: Callable  # (state, global batch) -> (state, metrics), jitted, state donated.
  eval_fn: Callable  # (params, global batch) -> the task's eval outputs, replicated.
  export_params: Callable  # state -> the parameters that leave the run (LoRA folded in).

  def to_global(self, local: dict) -> dict:
    """This process's rows of a batch -> global arrays sharded over the mesh's batch axes."""
    return {
      k: jax.make_array_from_process_local_data(
        self.batch_sh.get(k) or sharding.batch_sharding(self.mesh, np.ndim(v)), v
      )
      for k, v in local.items()
    }  # fmt: skip

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def setup(config, workdir: str, devices=None, example_batch: dict | None = None) -> Run:
  """Checks the config, then builds everything a run needs, compiled lazily (no step has run). The mesh spans
  `devices` (default: all of them). With `example_batch` (one local batch of the task's keys) no input is
  read: the step is built for that batch's keys and ranks, and train_ds is None (benchmarks that feed
  recorded batches on a machine without TensorFlow)."""
  check_config(config, jax.device_count() if devices is None else len(devices))
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  task_cls = tasks.get(config.task)
  tokenizer = vocab.for_run(config, workdir, 'bpe' if task_cls.family == 'decoder' else 'wordpiece')
  task = task_cls(config, tokenizer)
  if example_batch is None:
    train_ds = task.train_dataset(config.seed)
    ranks = {k: len(v.shape) for k, v in train_ds.element_spec.items()}
    # Read once, in full, now: a problem with the eval set stops the run before any training time is spent.
    eval_sets = task.eval_sets() if config.data.eval and config.eval_every_steps else {}
  else:
    train_ds, eval_sets, ranks = None, {}, {k: np.ndim(v) for k, v in example_batch.items()}

  adapters = peft.model_fields(config.finetune, task.finetuning)  # Bottleneck adapters: part of the model.
  mcfg = models.from_config(config.model, tokenizer.vocab_size, **task.heads(), **adapters)
  init = None
  if config.model.init_from:
    mcfg, init = _init_from(config, mcfg, tokenizer, adapters)
  graphdef, abstract_params = models.abstract(mcfg)
  warmup = optim.warmup_steps(config)
  if warmup > config.num_train_steps // 2:
    print(f'warning: warmup covers {warmup} of {config.num_train_steps} steps, so the learning rate barely decays;'
          ' set warmup_ratio (e.g. 0.1) or a smaller warmup_steps', flush=True)  # fmt: skip
  opt = optim.from_config(config, abstract_params, task.finetuning)
  abstract_state = jax.eval_shape(lambda p: opt.init_state(p, config.seed), abstract_params)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in ranks.items()}

  root_rng = jax.random.key(config.seed)
  train_step = steps.make_train_step(
    graphdef, opt.tx, task.loss_fn(mesh), config.grad_accum_steps, opt.schedule,
    skip_nonfinite=config.nan_policy == 'skip', frozen=opt.frozen, lora_scale=opt.lora_scale,
  )  # fmt: skip
  step_fn = jax.jit(
    sharding.in_mesh(mesh, lambda s, b: train_step(s, b, jax.random.fold_in(root_rng, s['step']))),
    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0,
  )  # fmt: skip
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Eval outputs are replicated: every process sees each whole global batch.
  eval_fn = jax.jit(
    sharding.in_mesh(
      mesh, lambda p, b: task.eval_step(steps.forward(graphdef, p, b, None, task.first_token_only), b, mesh)
    ),
    out_shardings=replicated,
  )
  export_params = jax.jit(opt.model_params, out_shardings=state_sh['params'])
  return Run(config, workdir, mesh, tokenizer, task, mcfg, graphdef, opt, init, train_ds, eval_sets, abstract_state,
             state_sh, batch_sh, step_fn, eval_fn, export_params)  # fmt: skip


def _init_from(config, mcfg: models.Config, tokenizer, adapters: dict) -> tuple[models.Config, nnx.State]:
  """The model config and parameters of model.init_from, with this run's heads and `adapters` (new ones fresh;
  without `adapters`, those the source has, if any, are kept)."""
  overrides = {**{k: getattr(mcfg, k) for k in INIT_OVERRIDES if hasattr(mcfg, k)}, **adapters}
  graphdef, params, new = store.load_for_init(config.model.init_from, seed=config.seed, **overrides)
  loaded = nnx.merge(graphdef, params).cfg
  if models.family(loaded) != models.family(mcfg):
    raise UsageError(f'model.init_from={config.model.init_from!r} is {models.a(models.family(loaded))};'
                     f' task={config.task!r} trains {models.a(models.family(mcfg))}')  # fmt: skip
  if tokenizer.vocab_size > loaded.vocab_size:
    raise UsageError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.init_from has {loaded.vocab_size}')
  names = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
  print(f'init from {config.model.init_from}: loaded {len(names) - len(new)} parameters'
        f' ({", ".join(n for n in names if n not in new)}); new: {", ".join(new) or "none"}', flush=True)  # fmt: skip
  return loaded, params


def restore_or_init(run: Run) -> tuple[dict, int, pretrain.Iterator, checkpoint.Checkpointer]:
  """(state, step, input iterator, checkpointer): the newest intact checkpoint, else a fresh state
  from model.init_from or a new initialisation. The run's metadata is written only after this
  succeeded, so a refused resume leaves the workdir as it was."""
  c = run.config
  ckpt = checkpoint.Checkpointer(run.workdir, c.keep_checkpoints, best_mode=run.task.best_metric()[1])
  train_iter = pretrain.Iterator(run.train_ds)
  restored = ckpt.restore(run.abstract_state, run.state_sh, train_iter) if ckpt.steps() else None
  start = 0
  if restored is not None:
    state, _, start = restored
    print(f'resumed from the checkpoint of step {start} (checksum {checkpoint.checksum(state):08x})', flush=True)
    if start >= c.num_train_steps:
      return state, start, train_iter, ckpt
    if not ckpt.input_restored:
      if ckpt.restored_process_count != jax.process_count():  # The tf.data position is per process.
        why = (f'step {start} was saved by {ckpt.restored_process_count} process(es) and this run has'
               f' {jax.process_count()}; the input position cannot move to another process count')  # fmt: skip
      else:
        why = f'the input position of step {start} could not be saved (see the warning of that run)'
      print(f'warning: {why}, so the input stream restarts, shuffled and masked with data seed {c.seed + start}'
            ' (seed + step)', flush=True)  # fmt: skip
      train_iter = pretrain.Iterator(run.task.train_dataset(c.seed + start))
  elif run.init is not None:
    params = jax.device_put(run.init, run.state_sh['params'])
    state = jax.jit(lambda p: run.opt.init_state(p, c.seed), out_shardings=run.state_sh)(params)
  else:
    state = fresh_state(run)
  if run.is_main:
    _write_metadata(run)
  n_params = models.count_params(state['params'])
  m = run.mcfg
  print(f'{jax.process_count()} process(es), {run.mesh.size} {jax.devices()[0].platform} devices, mesh'
        f' {dict(run.mesh.shape)}; {n_params / 1e6:.1f}M parameters (layers {m.num_layers}, hidden {m.hidden_size},'
        f' vocab {m.vocab_size})', flush=True)  # fmt: skip
  if run.task.finetuning:
    trainable, total = run.opt.trainable(state)
    print(f'fine-tuning ({run.opt.mode}): {trainable:,} trainable of {total:,} parameters'
          f' ({trainable / total:.2%})', flush=True)  # fmt: skip
  return state, start, train_iter, ckpt


def fresh_state(run: Run) -> dict:
  """A newly initialised training state (parameters from config.seed), laid out over the mesh."""
  mcfg, seed = run.mcfg, run.config.seed
  return jax.jit(lambda: run.opt.init_state(models.fresh_params(mcfg, seed), seed), out_shardings=run.state_sh)()


def _write_metadata(run: Run) -> None:
  """config.json, model_config.json, labels.json and a copy of the tokenizer: a self-contained workdir."""
  workdir = epath.Path(run.workdir)
  (workdir / 'config.json').write_text(run.config.to_json_best_effort(indent=2))
  (workdir / 'model_config.json').write_text(json.dumps(dataclasses.asdict(run.mcfg), indent=2))
  saved = workdir / 'tokenizer'
  if not (saved / 'tokenizer.json').exists() or chat.read_template(saved) != run.tokenizer.chat_template:
    run.tokenizer.save(str(saved))  # Also when data.chat_template changed since.
  if run.task.labels:
    (workdir / 'labels.json').write_text(json.dumps(run.task.labels))


def evaluate(run: Run, state: dict) -> dict[str, float]:
  """The task's metrics on every eval split, for the parameters that leave the run."""
  params = run.export_params(state)
  out = {}
  for split, batches in run.eval_sets.items():
    # Outputs are fetched once per split, not once per batch.
    outputs = jax.device_get([run.eval_fn(params, run.to_global(b)) for b in batches])
    out.update(run.task.summarize(split, outputs))
  return out


# A run this long or longer compiles its train step for every batch length ahead (a shorter one may never meet them).
COMPILE_AHEAD_STEPS = 100


def compile_ahead(run: Run, state: dict, batch: dict, steps_left: int, met: set | None = None) -> ThreadPoolExecutor:
  """Compiles, in one background thread, the programs the loop will call later: the evaluation for each shape
  of the eval batches and, for a run of COMPILE_AHEAD_STEPS steps or more, the train step for the task's other
  batch lengths (length buckets). `state` and `batch` (global) are the first step's. The loop's first call
  of each program then finds it compiled (jax keeps what `.lower(...).compile()` built) instead of
  compiling it while the devices wait; on a CPU the compile takes one core while the steps run on the
  others. A program that fails to compile here is compiled again by the call that needs it. `met`: the batch
  lengths the loop has called the step with so far (it compiled those itself), skipped here."""
  spec = lambda x, sh=None: jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(x.dtype), sharding=sh)  # noqa: E731
  state_spec = jax.tree.map(lambda x: spec(x, x.sharding), state)
  work = []
  if run.eval_sets:
    params = jax.eval_shape(run.opt.model_params, state_spec)
    params_spec = jax.tree.map(lambda x, sh: spec(x, sh), params, run.state_sh['params'])
    shapes = {}
    for batches in run.eval_sets.values():
      for b in batches:
        shapes.setdefault(tuple((k, np.shape(v)) for k, v in sorted(b.items())), b)
    for b in shapes.values():
      global_b = {  # Each process holds its own rows of a global batch (to_global).
        k: jax.ShapeDtypeStruct(
          (np.shape(v)[0] * jax.process_count(), *np.shape(v)[1:]), jax.dtypes.canonicalize_dtype(np.asarray(v).dtype),
          sharding=run.batch_sh.get(k) or sharding.batch_sharding(run.mesh, np.ndim(v)),
        )
        for k, v in b.items()
      }  # fmt: skip
      work.append((run.eval_fn, (params_spec, global_b)))  # Evaluation first: every run that evaluates needs it.
  T0 = batch['input_ids'].shape[1] if 'input_ids' in batch else None
  if T0 and steps_left >= COMPILE_AHEAD_STEPS:
    for T in run.task.batch_lengths():
      if T != T0:
        other = {
          k: jax.ShapeDtypeStruct((v.shape[0], T, *v.shape[2:]) if v.ndim >= 2 and v.shape[1] == T0 else v.shape,
                                  v.dtype, sharding=v.sharding)
          for k, v in batch.items()
        }  # fmt: skip
        work.append((run.step_fn, (state_spec, other), T))

  def compile_all():
    for fn, args, *length in work:
      if length and met is not None and length[0] in met:
        continue
      try:
        fn.lower(*args).compile()
      except Exception:  # noqa: BLE001, S112 (the call that needs the program compiles it and reports any error)
        continue

  pool = ThreadPoolExecutor(1, thread_name_prefix='compile-ahead')
  if work:
    pool.submit(compile_all)
  return pool


def loop(run: Run, state: dict, start: int, train_iter, ckpt: checkpoint.Checkpointer) -> dict:
  """Trains from step `start` to num_train_steps; returns the last logged metrics."""
  c, workdir = run.config, run.workdir
  total, skip = c.num_train_steps, c.nan_policy == 'skip'
  if start >= total:
    print(f'nothing to do: the checkpoint is at step {start} and num_train_steps={total}', flush=True)
    ckpt.close()
    return {}
  meta = {'config': json.loads(c.to_json_best_effort()), 'model': dataclasses.asdict(run.mcfg)}
  flops = perf.train_flops_per_step(run.mcfg, c.global_batch_size, c.data.seq_len, run.task.predictions)
  wandb_run = report.start_wandb(workdir, c.wandb, meta['config']) if c.wandb.project and run.is_main else None
  reporter = report.Reporter(workdir, total, c.global_batch_size * c.data.seq_len, flops, float('nan'), wandb_run)
  if run.task.labels:
    meta['labels'] = run.task.labels
  best_metric = run.task.best_metric()[0]
  sparsity_fn = jax.jit(prune.sparsity_fraction) if run.opt.pruning else None
  finite_fn = jax.jit(lambda p: jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))
  step, last, pending, undecodable, skipped, ahead, met = start, {}, None, 0, 0.0, None, set()
  # SIGTERM (preemption) and a first Ctrl-C stop the run after the step in flight, saved; a second Ctrl-C aborts.
  stop_signal = {'code': 0}

  def on_signal(signum, frame):
    if signum == signal.SIGINT and stop_signal['code']:
      raise KeyboardInterrupt
    stop_signal['code'] = max(stop_signal['code'], STOP_SIGNALS.index(signum) + 1)

  previous_handlers = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
  stopped_by, failed = None, True
  try:
    while step < total:
      if step == c.profile_start_step:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      batch = run.to_global(next(train_iter))
      met.add(batch['input_ids'].shape[1] if 'input_ids' in batch else 0)
      if ahead is None:
        ahead = compile_ahead(run, state, batch, total - start, met)
      state, metrics = run.step_fn(state, batch)
      step += 1
      if step > start + 1:  # Tokens of this step's padded length (length buckets), not data.seq_len's.
        T = batch['input_ids'].shape[1]
        reporter.count(
          c.global_batch_size * T, perf.train_flops_per_step(run.mcfg, c.global_batch_size, T, run.task.predictions)
        )
      if step == start + 1:  # Throughput is measured from here, without the compile.
        jax.block_until_ready(metrics)
        # On CPU the peak is measured now, when the input pipeline no longer competes with the matmul.
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
      if step == c.profile_start_step + c.profile_num_steps and c.profile_start_step >= 0:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
      if itstime(step, c.log_every_steps, total):
        host = jax.device_get(metrics)
        if sparsity_fn is not None:
          host['sparsity'] = float(sparsity_fn(state['params']))
        if skip:
          host['skipped_steps'] = skipped + float(host.pop('skipped'))
        else:
          _check_finite(step, host)
        last = reporter.write(step, host)
      if run.eval_sets and itstime(step, c.eval_every_steps, total):
        evaluated = reporter.write(step, evaluate(run, state), prefix='eval_')
        last.update(evaluated)
        if run.is_main:
          results = {k.removeprefix('eval_'): v for k, v in evaluated.items() if k.startswith('eval_')}
          epath.Path(workdir, 'eval_results.json').write_text(json.dumps({**results, 'step': step}, indent=2))
        if best_metric in evaluated:
          ckpt.save_best(step, run.export_params(state), {**meta, 'step': step}, evaluated[best_metric])
      stop = _agree(stop_signal['code'])  # Every process saves the same step when any of them got a signal.
      if stop or itstime(step, c.checkpoint_every_steps, total):
        if not skip:  # A NaN state is never saved: the loss came before this step's update, so the parameters too.
          _check_finite(step, jax.device_get(metrics))
          if not bool(finite_fn(state['params'])):
            raise FloatingPointError(
              f'step {step}: the update made the parameters non-finite (the loss was finite); stopping without'
              ' saving. Lower learning_rate, raise warmup_steps or set clip_grad_norm.'
            )
        ckpt.save(step, state, {**meta, 'step': step}, train_iter)
      if stop:
        stopped_by = STOP_SIGNALS[stop - 1]
        print(f'{stopped_by.name}: saved the checkpoint of step {step}; exiting', flush=True)
        break
    if pending is not None and not skip:
      _check_finite(*pending)
    failed = False
  finally:  # Even when a NaN stops the run, saves already started are completed.
    if ahead is not None:
      ahead.shutdown(wait=False, cancel_futures=True)
    try:
      ckpt.close()
    finally:
      for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
      reporter.close(failed)
  if stopped_by == signal.SIGINT:  # Saved; the caller (a shell script, a notebook) still learns of the Ctrl-C.
    raise KeyboardInterrupt(f'saved the checkpoint of step {step}')
  if step == total and c.sample_prompts:
    print_samples(run, state)
  return last


def print_samples(run: Run, state: dict, max_new_tokens: int = 32) -> list[str]:
  """Continues each of config.sample_prompts ('|'-separated) greedily with the final parameters; prints
  `sample: "<prompt>" -> "<text>"` lines (JSON strings; process 0) and returns the texts."""
  prompts = [p for p in run.config.sample_prompts.split('|') if p.strip()]
  params = run.export_params(state)
  # Every process gets the whole parameters and generates on its own devices; only process 0 prints.
  params = jax.device_get(params) if jax.process_count() == 1 else multihost_utils.process_allgather(params, tiled=True)
  longest = max(len(e.ids) for e in run.tokenizer.backend.encode_batch(prompts))
  new = min(max_new_tokens, run.mcfg.max_position_embeddings - longest)
  if new < 1:
    print(f'warning: sample_prompts: a prompt of {longest} tokens leaves no room to generate', flush=True)
    return []
  gen = generate.Generator(run.graphdef, params, run.tokenizer, batch_size=len(prompts))
  texts = gen.generate(prompts, max_new_tokens=new)
  if run.is_main:
    for p, t in zip(prompts, texts):
      # As JSON strings: a continuation of newlines or spaces stays one visible line.
      print(f'sample: {json.dumps(p, ensure_ascii=False)} -> {json.dumps(t, ensure_ascii=False)}', flush=True)
  return texts


def train(config, workdir: str, devices=None) -> dict:
  """Runs the whole training (pretraining or fine-tuning) on a locked workdir, on a mesh of `devices` (default:
  all); returns the last logged metrics."""
  with WorkdirLock(workdir):  # Before anything is written: a second run on the workdir stops here.
    run = setup(config, workdir, devices)
    state, start, train_iter, ckpt = restore_or_init(run)
    return loop(run, state, start, train_iter, ckpt)


def _agree(code: int) -> int:
  """The largest `code` of all processes: 0 when no process got a stop signal, else 1 + its index in STOP_SIGNALS."""
  if jax.process_count() == 1:
    return code
  return int(np.asarray(multihost_utils.process_allgather(np.int32(code))).max())


def _check_finite(step: int, metrics) -> None:
  loss = float(np.asarray(metrics['loss']))
  if not math.isfinite(loss):
    raise FloatingPointError(
      f'step {step}: the loss is {loss}; stopping. Lower learning_rate, raise warmup_steps or check the input data.'
    )
