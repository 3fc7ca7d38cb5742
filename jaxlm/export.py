"""Parameters out of a training run: `python -m jaxlm.export --checkpoint PATH --out DIR`.

  --checkpoint  a training workdir (its newest checkpoint), a step directory
                WORKDIR/checkpoints/<step>, a directory this tool wrote, or a Hugging Face
                BERT directory
  --format      jaxlm: model_config.json + params/ (Orbax) + tokenizer/   (default)
                hf:    config.json + model.safetensors + tokenizer files, for transformers
  --quantize    int8: weight-only int8 dense kernels with per-channel float32 scales
                (quant.py), in a jaxlm export that `jaxlm.load` runs as it is

Only parameters are written (no optimizer state), into a temporary directory next to --out that
is renamed into place when complete: a failed export leaves --out as it was, and an earlier
export there is replaced only by a finished one. `load_model` is what `jaxlm.load` uses for
the same paths; it imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxlm import model as model_lib
from jaxlm.errors import UsageError


def _path(path) -> epath.Path:
  """An absolute local path, or a remote one (gs://...) as given; no TensorFlow for local paths."""
  path = os.fspath(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def _step_dirs(path) -> tuple[list[epath.Path], epath.Path]:
  """(step directories to read, newest first; workdir) for a workdir or a step directory."""
  path = _path(path)
  ck = path / 'checkpoints'
  if ck.is_dir():
    steps = sorted((int(d.name) for d in ck.iterdir() if d.name.isdigit() and (d / 'state').exists()), reverse=True)
    if not steps:
      raise UsageError(f'{ck}: no finished checkpoint')
    return [ck / str(s) for s in steps], path
  if (path / 'state').is_dir():
    return [path], path.parent.parent
  raise UsageError(f'{path}: not a training workdir, a checkpoint step or an exported directory')


def _read_step(path) -> tuple[epath.Path, epath.Path, dict, dict]:
  """(step directory, workdir, meta, arrays) of the newest step that can be read; read-only.

  A damaged newest step of a workdir is passed over with one warning line, as training does
  (training also moves it aside; this leaves the workdir as it is).
  """
  from jaxlm.checkpoint import one_line, read_arrays

  step_dirs, workdir = _step_dirs(path)
  for i, step_dir in enumerate(step_dirs):
    try:
      meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
      return step_dir, workdir, meta, read_arrays(step_dir / 'state')
    except Exception as e:  # noqa: BLE001 (a damaged step fails in many ways)
      why = one_line(e)
      if i + 1 == len(step_dirs):
        raise UsageError(f'{step_dir}: the checkpoint cannot be read ({why})') from e
      print(f'warning: {step_dir} cannot be read ({why}); using step {step_dirs[i + 1].name}', file=sys.stderr)


def is_jaxlm_dir(path: str) -> bool:
  """True for a training workdir, a checkpoint step directory or a `--format jaxlm` export (local or gs://)."""
  p = _path(path)
  return (
    (p / 'checkpoints').is_dir()
    or (p / 'state').is_dir()
    or ((p / 'model_config.json').exists() and (p / 'params').is_dir())
  )


def _fill(cfg: model_lib.ModelConfig, raw: dict, source: str, missing: list | None = None, seed: int = 0):
  """The model's parameters from a nested dict of arrays. A parameter the dict lacks is an error,
  or, given a `missing` list, initialised fresh (seeded) and its path appended to the list."""
  if missing is None:
    graphdef, params = model_lib.abstract(cfg)
  else:
    graphdef, params = model_lib.init(cfg, seed)
  for path, var in nnx.to_flat_state(params):
    node = raw
    for k in path:
      if not isinstance(node, dict) or str(k) not in node:
        if missing is None:
          raise UsageError(f'{source}: no parameter {"/".join(map(str, path))}')
        missing.append('/'.join(map(str, path)))
        node = None
        break
      node = node[str(k)]
    if node is None:
      continue
    if tuple(node.shape) != tuple(var.shape):  # Vocabulary rows saved with another model.vocab_multiple.
      node = model_lib.fit_vocab(node, var.get_metadata().get('axes'), cfg)
    if tuple(node.shape) != tuple(var.shape):
      raise UsageError(
        f'{source}: parameter {"/".join(map(str, path))} has shape {tuple(node.shape)}, the model expects {tuple(var.shape)}'
      )
    dtype = var.get_value().dtype
    if (np.dtype(node.dtype) == np.int8) != (dtype == jnp.int8):
      raise UsageError(
        f'{source}: parameter {"/".join(map(str, path))} is {np.dtype(node.dtype)}, the model expects {dtype}'
        f' (model.quantization={cfg.quantization!r})'
      )
    var.set_value(jnp.asarray(node, dtype))
  return graphdef, params


def load_checkpoint(path: str, **overrides) -> tuple[nnx.GraphDef, nnx.State, str, list[str] | None]:
  """(graphdef, params, tokenizer directory, labels) from a workdir, a step directory or a jaxlm export."""
  return _load(path, overrides)[:4]


def load_for_init(path: str, seed: int = 0, **overrides) -> tuple[nnx.GraphDef, nnx.State, list[str]]:
  """(graphdef, params, new parameter paths) to start a run from: parameters the checkpoint lacks
  (a new classifier head, say) are initialised fresh from `seed`."""
  graphdef, params, _, _, new = _load(path, overrides, missing=[], seed=seed)
  return graphdef, params, new


def _merge_adapters(raw: dict, meta: dict) -> dict:
  """Folds LoRA adapters saved in a training checkpoint into the dense kernels (numpy)."""
  from jaxlm import peft

  ft = meta.get('config', {}).get('finetune', {})
  scale = ft['lora_alpha'] / ft['lora_rank']
  params = raw['params']
  for name, ab in raw['adapters'].items():
    kernel = peft.LORA_TARGETS[name][0]
    params['layers'][kernel] = np.asarray(peft.fold(np.asarray(params['layers'][kernel]), ab, scale))
  return params


def _load(path: str, overrides: dict, missing: list | None = None, seed: int = 0):
  from jaxlm.checkpoint import read_arrays  # Whatever number of processes saved it.

  p = _path(path)
  if (p / 'params').is_dir():  # A --format jaxlm export.
    cfg = model_lib.ModelConfig(**{**json.loads((p / 'model_config.json').read_text()), **overrides})
    raw = read_arrays(p / 'params')
    labels_path = p / 'labels.json'
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else None
    filled = _fill(cfg, raw, str(p / 'params'), missing, seed)
    return (*filled, str(p / 'tokenizer'), labels, missing)
  step_dir, workdir, meta, saved = _read_step(p)
  cfg = model_lib.ModelConfig(**{**meta['model'], **overrides})
  raw = _merge_adapters(saved, meta) if 'adapters' in saved else saved['params']
  graphdef, params = _fill(cfg, raw, str(step_dir / 'state'), missing, seed)
  return graphdef, params, _run_tokenizer(workdir, meta.get('config', {})), meta.get('labels'), missing


def _run_tokenizer(workdir: epath.Path, config: dict, seen: tuple = ()) -> str:
  """The tokenizer directory of a training run: WORKDIR/tokenizer, else where the run took it from
  (data.tokenizer, or model.init_from, followed through jaxlm runs and exports)."""
  tok = workdir / 'tokenizer'
  if tok.exists():
    return str(tok)
  source = config.get('data', {}).get('tokenizer') or config.get('model', {}).get('init_from')
  if not source or str(source) in seen:
    raise UsageError(f'{workdir}: no tokenizer/ and no data.tokenizer or model.init_from to take one from')
  return tokenizer_dir(source, (*seen, str(workdir)))


def tokenizer_dir(path: str, _seen: tuple = ()) -> str:
  """The tokenizer directory of any model path: a workdir, a checkpoint step, an export or an HF directory."""
  p = _path(path)
  if (p / 'params').is_dir():  # A jaxlm export carries its tokenizer.
    return str(p / 'tokenizer')
  if not is_jaxlm_dir(str(p)):  # A Hugging Face directory (or a tokenizer directory).
    return str(p)
  _, workdir = _step_dirs(p)
  config_json = workdir / 'config.json'
  config = json.loads(config_json.read_text()) if config_json.exists() else {}
  return _run_tokenizer(workdir, config, _seen)


def load_model(path: str, **overrides) -> tuple[nnx.GraphDef, nnx.State, str, list[str] | None]:
  """(graphdef, params, tokenizer directory, labels) from any model path jaxlm reads: a training
  workdir, a checkpoint step, a jaxlm export (float or int8) or a Hugging Face BERT directory."""
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise UsageError(f'{path}: no such file or directory')
  if is_jaxlm_dir(path):
    return load_checkpoint(path, **overrides)
  if (epath.Path(path) / 'config.json').exists():
    from jaxlm import hf, quant

    quantization = overrides.pop('quantization', 'none')
    graphdef, params, hf_cfg, _ = hf.load(path, **overrides)
    if quantization == 'int8':  # HF directories hold float tensors: quantize them here.
      graphdef, params = quant.quantize(graphdef, params)
    elif quantization != 'none':
      raise UsageError(f'model.quantization={quantization!r}: expected "none" or "int8"')
    id2label = hf_cfg.get('id2label') or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    if labels is not None and len(labels) != nnx.merge(graphdef, params).cfg.num_labels:
      labels = None
    return graphdef, params, path, labels
  raise UsageError(f'{path}: not a model directory (no config.json, checkpoints/ or params/)')


@contextlib.contextmanager
def quiet_absl():
  """absl logging (Orbax's) at ERROR inside the block: reading the arrays of a training step warns
  'Metadata file does not exist' on every run (Orbax looks for its step metadata in state/), which
  tells a user nothing and buries the output."""
  import logging

  from absl import logging as absl_logging

  logger = absl_logging.get_absl_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)  # The standard level: absl's own constants are offsets (ERROR = -2).
  try:
    yield
  finally:
    logger.setLevel(level)


_EXPORT_FILES = ({'model_config.json', 'params'}, {'config.json', 'model.safetensors'})  # jaxlm, hf


def _out_dirs(out: str, checkpoint: str) -> tuple[str, str]:
  """(the directory --out names, an empty temporary one next to it to write the export into).
  An --out that is a file, the checkpoint, a non-empty directory other than an earlier export,
  or that cannot be created is a UsageError, raised before any work."""
  dest = os.path.realpath(out)
  if os.path.exists(dest) and not os.path.isdir(dest):
    raise UsageError(f'--out {out}: exists and is not a directory')
  if os.path.isdir(dest):
    if os.path.exists(checkpoint) and os.path.samefile(dest, checkpoint):
      raise UsageError(f'--out {out}: is the --checkpoint; export to another directory')
    names = set(os.listdir(dest))
    if names and ('checkpoints' in names or not any(files <= names for files in _EXPORT_FILES)):
      raise UsageError(f'--out {out}: a non-empty directory that is not an earlier export; pass a new or empty one')
  parent = os.path.dirname(dest)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f'--out {out}: cannot be created ({parent} is a file)')
  tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.tmp-{os.getpid()}')
  try:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.isdir(tmp):  # Left by a failed export of this process.
      shutil.rmtree(tmp)
    os.mkdir(tmp)
  except OSError as e:
    raise UsageError(f'--out {out}: cannot be created ({e.strerror})') from None
  return dest, tmp


def _move_into_place(tmp: str, dest: str) -> None:
  """Renames the finished export `tmp` to `dest`; an earlier export there is moved aside first and
  deleted only once the new one is in place (restored if the rename fails)."""
  old = None
  if os.path.isdir(dest):
    if os.listdir(dest):
      old = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.old-{os.getpid()}')
      os.rename(dest, old)
    else:
      os.rmdir(dest)
  try:
    os.rename(tmp, dest)
  except OSError:
    if old:
      os.rename(old, dest)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='training workdir, checkpoint step dir, export or HF dir')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--format', choices=['jaxlm', 'hf'], default='jaxlm', help='jaxlm (Orbax) or hf (transformers)')
  p.add_argument('--quantize', choices=['none', 'int8'], default='none', help='int8: weight-only int8 kernels')
  args = p.parse_args(argv)
  try:
    from jaxlm import hf, quant
    from jaxlm import tokenizer as tokenizer_lib

    if args.quantize != 'none' and args.format == 'hf':
      raise UsageError('--quantize int8 writes a jaxlm export; a Hugging Face directory holds float tensors')
    dest, tmp = _out_dirs(args.out, args.checkpoint)
    try:
      with quiet_absl():
        graphdef, params, tok_dir, labels = load_model(args.checkpoint)
      if args.quantize == 'int8':
        graphdef, params = quant.quantize(graphdef, params)
      elif args.format == 'hf':
        graphdef, params = quant.dequantize(graphdef, params)  # An int8 export back to float tensors.
      cfg = nnx.merge(graphdef, params).cfg
      tok = tokenizer_lib.load(tok_dir)
      try:
        if args.format == 'hf':
          id2label = dict(enumerate(labels)) if labels else None
          hf.save(tmp, params, cfg, id2label=id2label)
          tok.save(tmp)
        else:
          import orbax.checkpoint as ocp

          ckptr = ocp.StandardCheckpointer()
          ckptr.save(os.path.join(tmp, 'params'), _nested(params))
          ckptr.wait_until_finished()
          with open(os.path.join(tmp, 'model_config.json'), 'w') as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
          if labels:
            with open(os.path.join(tmp, 'labels.json'), 'w') as f:
              json.dump(labels, f)
          tok.save(os.path.join(tmp, 'tokenizer'))
        _move_into_place(tmp, dest)
      except OSError as e:  # A full disk, say: the earlier export, if any, is still in place.
        raise UsageError(f'--out {args.out}: cannot write the export ({e.strerror or e})') from None
    finally:
      shutil.rmtree(tmp, ignore_errors=True)  # Gone already when the export is in place.
    n = model_lib.count_params(params)
    kind = args.format if cfg.quantization == 'none' else f'{args.format}, {cfg.quantization} kernels'
    print(f'exported {n / 1e6:.1f}M parameters ({kind}) -> {args.out}')
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def _nested(params) -> dict:
  """Plain nested dict of numpy arrays, keyed like the parameter paths."""
  out: dict = {}
  for path, var in nnx.to_flat_state(params):
    node = out
    for k in path[:-1]:
      node = node.setdefault(str(k), {})
    node[str(path[-1])] = np.asarray(var.get_value())
  return out


if __name__ == '__main__':
  sys.exit(main())
