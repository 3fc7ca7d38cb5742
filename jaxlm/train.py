"""Masked-LM pretraining: `python -m jaxlm.train --config configs/NAME.py --workdir DIR`.

Override any config key with `--config.KEY=VALUE`. Run the same command on every host of a
pod slice; on GPU clusters or for CPU processes on one machine, add `--coordinator_address`,
`--num_processes` and `--process_id`.

The run reads top to bottom: config -> mesh -> input -> model -> sharded state -> step -> loop.
WORKDIR receives config.json, model_config.json, tokenizer/ (when trained here),
metrics.jsonl and TensorBoard events (process 0 only).
"""

from __future__ import annotations

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
  """data.tokenizer, else the tokenizer of model.init_from, else one trained on data.train."""
  import numpy as np
  from etils import epath

  from jaxlm import tokenizer as tokenizer_lib

  if config.data.tokenizer:
    return tokenizer_lib.load(config.data.tokenizer)
  if config.model.init_from:
    from jaxlm import export

    if export.is_jaxlm_dir(config.model.init_from):
      return tokenizer_lib.load(export.load_checkpoint(config.model.init_from)[2])
    return tokenizer_lib.load(config.model.init_from)
  saved = str(epath.Path(workdir) / 'tokenizer')  # Local or remote (gs://).
  if epath.Path(saved, 'tokenizer.json').exists():
    return tokenizer_lib.load(saved)
  if not config.data.train_tokenizer_vocab:
    from jaxlm.errors import UsageError

    raise UsageError('data.tokenizer is empty: set it, or model.init_from, or data.train_tokenizer_vocab')
  import jax
  from jax.experimental import multihost_utils
  from tokenizers import Tokenizer as HFTokenizer

  from jaxlm.data import pretrain

  # WordPiece training is not bitwise deterministic, so process 0 trains and the others
  # receive its vocabulary: every host tokenizes with the same one.
  t0 = time.perf_counter()
  blob = b''
  if jax.process_index() == 0:
    texts = pretrain.iter_texts(config.data.train)
    tok = tokenizer_lib.train_wordpiece(texts, config.data.train_tokenizer_vocab, config.data.lowercase)
    blob = tok.backend.to_str().encode()
  if jax.process_count() > 1:
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob))))
    buf = np.frombuffer(blob, np.uint8) if blob else np.zeros(n, np.uint8)
    blob = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()
  tok = tokenizer_lib.Tokenizer(HFTokenizer.from_str(blob.decode()), 'trained', config.data.lowercase)
  print(f'trained a {tok.vocab_size}-token WordPiece vocabulary in {time.perf_counter() - t0:.1f}s', flush=True)
  if jax.process_index() == 0:
    tok.save(saved)
  return tok


def model_config(config, vocab_size: int):
  """The ModelConfig for this run: the preset, the config's overrides and the tokenizer's vocabulary."""
  from jaxlm import model

  m = config.model
  kw = dict(
    vocab_size=vocab_size, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
    attention_impl=m.attention_impl or None, hidden_dropout=m.hidden_dropout,
    attention_dropout=m.attention_dropout, max_position_embeddings=m.max_position_embeddings,
    mlm_head=True, nsp_head=config.data.nsp, pooler=config.data.nsp,
  )  # fmt: skip
  if m.hidden_act:
    kw['hidden_act'] = m.hidden_act
  return model.preset(m.preset, **kw)


def train(config, workdir: str) -> dict:
  """Runs the whole training; returns the last logged metrics."""
  import jax
  from etils import epath
  from flax import nnx

  from jaxlm import checkpoint, hf, model, optim, perf, report, sharding, steps, tasks
  from jaxlm import config as config_lib
  from jaxlm.data import pretrain
  from jaxlm.errors import UsageError

  # ---- config and mesh
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  is_main = jax.process_index() == 0
  if is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or remote (gs://).
    epath.Path(workdir, 'config.json').write_text(config.to_json_best_effort(indent=2))

  # ---- input
  tokenizer = build_tokenizer(config, workdir)
  B, T, P = config.global_batch_size, config.data.seq_len, config.data.max_predictions
  data_kw = dict(
    seq_len=T, max_predictions=P, global_batch_size=B, mask_prob=config.data.mask_prob, nsp=config.data.nsp,
    process_index=jax.process_index(), process_count=jax.process_count(),
  )  # fmt: skip
  data_kw['whole_word'] = config.data.whole_word_masking
  data_cfg = config.data.to_dict()
  make_train_ds = lambda seed: pretrain.pretrain_dataset(
    config.data.train, tokenizer, seed=seed, shuffle_buffer=config.data.shuffle_buffer, data_cfg=data_cfg,
    **data_kw,
  )  # fmt: skip
  train_ds = make_train_ds(config.seed)
  eval_data = None  # Read once, in full, at the first evaluation.

  # ---- model and sharded state
  mcfg = model_config(config, tokenizer.vocab_size)
  if config.model.init_from:
    knobs = ('mlm_head', 'nsp_head', 'pooler', 'dtype', 'scan_layers', 'remat', 'attention_impl', 'hidden_dropout',
             'attention_dropout')  # fmt: skip
    from jaxlm import export

    overrides = {k: getattr(mcfg, k) for k in knobs}
    if export.is_jaxlm_dir(config.model.init_from):  # A jaxlm run or export: parameters only, any mesh.
      g, loaded, _, _ = export.load_checkpoint(config.model.init_from, **overrides)
      load_report = hf.LoadReport()
    else:
      g, loaded, _, load_report = hf.load(config.model.init_from, **overrides)
    mcfg = nnx.merge(g, loaded).cfg
    if tokenizer.vocab_size > mcfg.vocab_size:
      raise UsageError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.init_from has {mcfg.vocab_size}')
    print(f'init from {config.model.init_from}; newly initialised: {load_report.missing or "none"}', flush=True)
  graphdef, abstract_params = model.abstract(mcfg)
  param_sh = sharding.param_shardings(abstract_params, mesh)
  schedule = optim.make_schedule(config.learning_rate, config.warmup_steps, config.num_train_steps, config.lr_schedule)
  o = config.optimizer
  tx = optim.make_optimizer(o.name, schedule, config.weight_decay, o.b1, o.b2, o.eps, config.clip_grad_norm or None)
  abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract_params)
  state_sh = sharding.state_shardings(abstract_state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints, best_mode=config.best_mode)
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
    if ckpt.restored_process_count != jax.process_count():  # The tf.data position is per process.
      print(
        f'warning: step {start} was saved by {ckpt.restored_process_count} process(es) and this run has'
        f' {jax.process_count()}; the input position cannot move to another process count, so the input'
        f' stream restarts, shuffled and masked with data seed {config.seed + start} (seed + step)',
        flush=True,
      )
      train_iter = pretrain.Iterator(make_train_ds(config.seed + start))
  elif config.model.init_from:
    params = jax.device_put(loaded, param_sh)
    state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)(params)
  else:
    seed = config.seed
    state = jax.jit(
      lambda: steps.init_state(nnx.split(model.Bert(mcfg, rngs=nnx.Rngs(seed)))[1], tx), out_shardings=state_sh
    )()
  if is_main:
    epath.Path(workdir, 'model_config.json').write_text(json.dumps(dataclasses.asdict(mcfg), indent=2))
  n_params = model.count_params(state['params'])
  print(
    f'{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, mesh'
    f' {dict(mesh.shape)}; {n_params / 1e6:.1f}M parameters ({config.model.preset}, vocab {mcfg.vocab_size})',
    flush=True,
  )

  # ---- step functions
  batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in train_ds.element_spec.items()}
  root_rng = jax.random.key(config.seed)
  loss_fn = functools.partial(tasks.mlm_loss, mesh=mesh)  # Vocabulary-parallel when mesh.tensor > 1.
  skip = config.nan_policy == 'skip'
  train_step = steps.make_train_step(graphdef, tx, loss_fn, config.grad_accum_steps, schedule, skip_nonfinite=skip)
  step_fn = jax.jit(
    lambda s, b: train_step(s, b, jax.random.fold_in(root_rng, s['step'])),
    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0,
  )  # fmt: skip
  eval_fn = jax.jit(steps.make_eval_step(graphdef, loss_fn), in_shardings=(state_sh['params'], batch_sh))

  def to_global(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}

  def evaluate() -> dict:
    nonlocal eval_data
    if eval_data is None:
      eval_data = pretrain.eval_batches(config.data.eval, tokenizer, seed=config.seed + 1, data_cfg=data_cfg, **data_kw)
    sums = {}
    for local in eval_data:
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
  peak, _ = perf.peak_tflops()
  flops = perf.train_flops_per_step(mcfg, B, T, P)
  reporter = report.Reporter(workdir, config.num_train_steps, B * T, flops, peak)
  step, last, pending, undecodable, skipped = start, {}, None, 0, 0.0
  meta = {'config': json.loads(config.to_json_best_effort()), 'model': dataclasses.asdict(mcfg)}
  preempted = {'flag': False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  try:
    while step < config.num_train_steps:
      if step == config.profile_start_step:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      batch = to_global(next(train_iter))
      state, metrics = step_fn(state, batch)
      step += 1
      if step == start + 1:  # Throughput is measured from here, without the compile.
        jax.block_until_ready(metrics)
        reporter.start(step)
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
        if config.best_metric in evaluated:
          ckpt.save_best(step, state['params'], {**meta, 'step': step}, evaluated[config.best_metric])
      stop = _agree(preempted['flag'])
      if stop or step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        if not skip:
          _check_finite(step, jax.device_get(metrics))  # A NaN state is never saved.
        ckpt.save(step, state, {**meta, 'step': step}, train_iter)
      if stop:
        print(f'SIGTERM: saved the checkpoint of step {step}; exiting', flush=True)
        break
    if pending is not None and not skip:
      _check_finite(*pending)
  finally:  # Even when a NaN stops the run, saves already started are completed.
    ckpt.close()
    signal.signal(signal.SIGTERM, previous_handler)
    reporter.close()
  return last


def _agree(flag: bool) -> bool:
  """True on every process if any process got SIGTERM (all then save the same step)."""
  import jax

  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())


def _check_finite(step: int, metrics) -> None:
  import numpy as np

  loss = float(np.asarray(metrics['loss']))
  if not math.isfinite(loss):
    raise FloatingPointError(
      f'step {step}: the loss is {loss}; stopping. Lower learning_rate, raise warmup_steps or check the input data.'
    )


def main(argv) -> int:
  from jaxlm.errors import UsageError

  if len(argv) > 1:
    return _usage(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    return _usage('--config is required (e.g. --config configs/quickstart.py)')
  if not FLAGS.workdir:
    return _usage('--workdir is required')
  try:
    init_distributed()
    train(FLAGS.config, FLAGS.workdir)
  except UsageError as e:
    return _usage(str(e))
  except FloatingPointError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


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


if __name__ == '__main__':
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
