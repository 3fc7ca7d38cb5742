"""Reading and writing models: the one place that knows what a model directory holds.

  training workdir   WORKDIR/checkpoints/<step>/ (state + meta), config.json, tokenizer/; read from
                     its newest readable step (a damaged newer one is passed over with one warning
                     and left where it is: reading never changes a workdir)
  checkpoint step    WORKDIR/checkpoints/<step>/, read as it is
  jaxlm export       model_config.json + params/ (Orbax) + labels.json + tokenizer/; float or int8
  Hugging Face dir   config.json + model.safetensors or pytorch_model.bin (or their shards) + tokenizer files

Each holds a BERT encoder or a decoder (GPT-2 / Llama shape); the saved model config says which
(models.config_from_dict), a Hugging Face directory its model_type.

`load_model` reads any of them for inference (`jaxlm.load`, `python -m jaxlm.predict`),
`load_for_init` for starting a run from one (`model.init_from`: float parameters, new heads
initialised), `tokenizer_dir` finds the tokenizer of any of them. `write_jaxlm` and `write_hf`
write an export, and `replace_dir` puts a finished directory in the place of an earlier one.
Paths may be local or remote (gs://); no TensorFlow is imported.

Not here: saving and resuming a running training state (checkpoint.py), the Hugging Face tensor
names and config fields (hf.py), the int8 arithmetic (quant.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import nnx

from jaxlm import blocks, checkpoint, decoder, hf, hf_causal, models, peft, quant
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UsageError

_EXPORT_FILES = ({'model_config.json', 'params'}, {'config.json', 'model.safetensors'})  # jaxlm, hf

# ----------------------------------------------------------------------------- what a path is


def _path(path) -> epath.Path:
  """An absolute local path, or a remote one (gs://...) as given; no TensorFlow for local paths."""
  path = os.fspath(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def is_jaxlm_dir(path: str) -> bool:
  """True for a training workdir, a checkpoint step directory or a `--format jaxlm` export (local or gs://)."""
  p = _path(path)
  return (
    (p / 'checkpoints').is_dir()
    or (p / 'state').is_dir()
    or ((p / 'model_config.json').exists() and (p / 'params').is_dir())
  )


def step_dirs(path) -> tuple[list[epath.Path], epath.Path]:
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


def tokenizer_dir(path: str, _seen: tuple = ()) -> str:
  """The tokenizer directory of any model path: a workdir, a checkpoint step, an export or an HF directory."""
  p = _path(path)
  if (p / 'params').is_dir():  # A jaxlm export carries its tokenizer.
    return str(p / 'tokenizer')
  if not is_jaxlm_dir(str(p)):  # A Hugging Face directory (or a tokenizer directory).
    return str(p)
  _, workdir = step_dirs(p)
  config_json = workdir / 'config.json'
  config = json.loads(config_json.read_text()) if config_json.exists() else {}
  return _run_tokenizer(workdir, config, _seen)


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


# ----------------------------------------------------------------------------- reading


def _read_step(path) -> tuple[epath.Path, epath.Path, dict, dict]:
  """(step directory, workdir, meta, arrays) of the newest step that can be read; read-only.

  A damaged newest step of a workdir is passed over with one warning line, as training does
  (training also moves it aside; this leaves the workdir as it is).
  """
  dirs, workdir = step_dirs(path)
  for i, step_dir in enumerate(dirs):
    try:
      meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
      return step_dir, workdir, meta, checkpoint.read_arrays(step_dir / 'state')
    except Exception as e:  # noqa: BLE001 (a damaged step fails in many ways)
      why = checkpoint.one_line(e)
      if i + 1 == len(dirs):
        raise UsageError(f'{step_dir}: the checkpoint cannot be read ({why})') from e
      print(f'warning: {step_dir} cannot be read ({why}); using step {dirs[i + 1].name}', file=sys.stderr)


def _fill(cfg: models.Config, raw: dict, source: str, missing: list | None = None, seed: int = 0):
  """The model's parameters from a nested dict of arrays. A parameter the dict lacks is an error,
  or, given a `missing` list, initialised fresh (seeded) and its path appended to the list."""
  if missing is None:
    graphdef, params = models.abstract(cfg)
  else:
    graphdef, params = models.init(cfg, seed)
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
      node = blocks.fit_vocab(node, var.get_metadata().get('axes'), cfg)
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


def _merge_adapters(raw: dict, meta: dict) -> dict:
  """Folds LoRA adapters saved in a training checkpoint into the dense kernels (numpy)."""
  ft = meta.get('config', {}).get('finetune', {})
  scale = ft['lora_alpha'] / ft['lora_rank']
  params = raw['params']
  for name, ab in raw['adapters'].items():
    kernel = peft.LORA_TARGETS[name][0]
    params['layers'][kernel] = np.asarray(peft.fold(np.asarray(params['layers'][kernel]), ab, scale))
  return params


def _load(path: str, overrides: dict, missing: list | None = None, seed: int = 0):
  """(graphdef, params, tokenizer directory, labels, missing) of a jaxlm directory, whatever number
  of processes saved it. Loading for init (`missing` given) leaves out overrides the model's family
  has no field for (the caller checks the family)."""
  p = _path(path)
  lenient = missing is not None
  if (p / 'params').is_dir():  # A --format jaxlm export.
    cfg = models.config_from_dict(json.loads((p / 'model_config.json').read_text()), overrides, lenient)
    raw = checkpoint.read_arrays(p / 'params')
    labels_path = p / 'labels.json'
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else None
    filled = _fill(cfg, raw, str(p / 'params'), missing, seed)
    return (*filled, str(p / 'tokenizer'), labels, missing)
  step_dir, workdir, meta, saved = _read_step(p)
  cfg = models.config_from_dict(meta['model'], overrides, lenient)
  raw = _merge_adapters(saved, meta) if 'adapters' in saved else saved['params']
  graphdef, params = _fill(cfg, raw, str(step_dir / 'state'), missing, seed)
  return graphdef, params, _run_tokenizer(workdir, meta.get('config', {})), meta.get('labels'), missing


def load_checkpoint(path: str, **overrides) -> tuple[nnx.GraphDef, nnx.State, str, list[str] | None]:
  """(graphdef, params, tokenizer directory, labels) from a workdir, a step directory or a jaxlm export."""
  return _load(path, overrides)[:4]


def load_model(path: str, **overrides) -> tuple[nnx.GraphDef, nnx.State, str, list[str] | None]:
  """(graphdef, params, tokenizer directory, labels) from any model path jaxlm reads: a training
  workdir, a checkpoint step, a jaxlm export (float or int8) or a Hugging Face BERT, GPT-2 or Llama directory
  (quantized on loading for `quantization='int8'`)."""
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise UsageError(f'{path}: no such file or directory')
  if is_jaxlm_dir(path):
    return load_checkpoint(path, **overrides)
  if not (epath.Path(path) / 'config.json').exists():
    raise UsageError(f'{path}: not a model directory (no config.json, checkpoints/ or params/)')
  quantization = overrides.pop('quantization', 'none')
  if quantization not in blocks.QUANTIZATIONS:
    raise UsageError(f'model.quantization={quantization!r}: expected one of {blocks.QUANTIZATIONS}')
  if hf_causal.is_causal_dir(path):  # A Hugging Face GPT-2 or Llama directory.
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(decoder.DecoderConfig)})
    if unknown:
      raise UsageError(f'{unknown[0]}: not a field of a decoder config')
    graphdef, params, _ = hf_causal.load(path, **overrides)
    labels = None
  else:
    graphdef, params, hf_cfg, _ = hf.load(path, **overrides)
    id2label = hf_cfg.get('id2label') or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    if labels is not None and len(labels) != nnx.merge(graphdef, params).cfg.num_labels:
      labels = None
  if quantization == 'int8':  # HF directories hold float tensors: an int8 model is quantized here.
    graphdef, params = quant.quantize(graphdef, params)
  return graphdef, params, path, labels


def load_for_init(path: str, seed: int = 0, **overrides) -> tuple[nnx.GraphDef, nnx.State, list[str]]:
  """(graphdef, float params, new parameter paths) to start a run from a jaxlm run or export or an HF
  directory (BERT, GPT-2 or Llama): parameters the source lacks (a new classifier head, say) are initialised
  fresh from `seed`. Overrides the source's kind of model has no field for are left out."""
  if is_jaxlm_dir(path):  # Parameters only, whatever mesh wrote them.
    graphdef, params, _, _, new = _load(path, overrides, missing=[], seed=seed)
    graphdef, params = quant.dequantize(graphdef, params)  # An int8 export trains from float kernels.
    return graphdef, params, new
  if hf_causal.is_causal_dir(path):
    fields = {f.name for f in dataclasses.fields(decoder.DecoderConfig)}
    graphdef, params, _ = hf_causal.load(path, seed=seed, **{k: v for k, v in overrides.items() if k in fields})
    return graphdef, params, []
  graphdef, params, _, report = hf.load(path, seed=seed, **overrides)
  return graphdef, params, list(report.missing)


@contextlib.contextmanager
def quiet_absl():
  """absl logging (Orbax's) at ERROR inside the block: reading the arrays of a training step warns
  'Metadata file does not exist' on every run (Orbax looks for its step metadata in state/), which
  tells a user nothing and buries the output."""
  logger = absl_logging.get_absl_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)  # The standard level: absl's own constants are offsets (ERROR = -2).
  try:
    yield
  finally:
    logger.setLevel(level)


# ----------------------------------------------------------------------------- writing


def nested(params) -> dict:
  """Plain nested dict of numpy arrays, keyed like the parameter paths."""
  out: dict = {}
  for path, var in nnx.to_flat_state(params):
    node = out
    for k in path[:-1]:
      node = node.setdefault(str(k), {})
    node[str(path[-1])] = np.asarray(var.get_value())
  return out


def write_jaxlm(
  out_dir: str,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  tokenizer: tokenizer_lib.Tokenizer,
  labels: list[str] | None = None,
) -> None:
  """Writes a jaxlm export into the directory `out_dir`: params/ (Orbax), model_config.json, labels.json, tokenizer/."""
  cfg = nnx.merge(graphdef, params).cfg
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, 'params'), nested(params))
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, 'model_config.json'), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  if labels:
    with open(os.path.join(out_dir, 'labels.json'), 'w') as f:
      json.dump(labels, f)
  tokenizer.save(os.path.join(out_dir, 'tokenizer'))


def write_hf(
  out_dir: str,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  tokenizer: tokenizer_lib.Tokenizer,
  labels: list[str] | None = None,
  dtype: str = 'float32',
) -> None:
  """Writes a Hugging Face directory (config.json, model.safetensors with tensors in `dtype`, tokenizer files);
  int8 kernels as float."""
  graphdef, params = quant.dequantize(graphdef, params)  # Hugging Face holds float tensors.
  cfg = nnx.merge(graphdef, params).cfg
  if models.family(cfg) == 'decoder':
    hf_causal.save(params, cfg, out_dir, dtype=dtype)
  else:
    hf.save(out_dir, params, cfg, id2label=dict(enumerate(labels)) if labels else None, dtype=dtype)
  tokenizer.save(out_dir)


def check_out_dir(out: str, name: str | None = None) -> str:
  """The real path `out` names, checked to be replaceable by `replace_dir`: new, empty or an earlier export.

  Anything else (a file, a non-empty directory of other files, a place under a file) is a
  UsageError naming `name` (default: `out`)."""
  name = name or out
  dest = os.path.realpath(out)
  if os.path.exists(dest) and not os.path.isdir(dest):
    raise UsageError(f'{name}: exists and is not a directory')
  if os.path.isdir(dest):
    names = set(os.listdir(dest))
    if names and ('checkpoints' in names or not any(files <= names for files in _EXPORT_FILES)):
      raise UsageError(f'{name}: a non-empty directory that is not an earlier export; pass a new or empty one')
  parent = os.path.dirname(dest)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f'{name}: cannot be created ({parent} is a file)')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f'{name}: cannot be created ({parent} is not writable)')
  return dest


def replace_dir(out: str, write: Callable[[str], None], name: str | None = None) -> None:
  """Calls `write(tmp)` on a new directory next to `out` and renames it to `out` once complete.

  A failure leaves `out` as it was; an earlier export there is replaced only by a finished one,
  whole. A write that fails for lack of room (OSError) is a UsageError naming `name`."""
  name = name or out
  dest = check_out_dir(out, name)
  tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.tmp-{os.getpid()}')
  try:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.isdir(tmp):  # Left by a failed export of this process.
      shutil.rmtree(tmp)
    os.mkdir(tmp)
  except OSError as e:
    raise UsageError(f'{name}: cannot be created ({e.strerror})') from None
  try:
    write(tmp)
    _move_into_place(tmp, dest)
  except OSError as e:  # A full disk, say: the earlier export, if any, is still in place.
    raise UsageError(f'{name}: cannot write the export ({e.strerror or e})') from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # Gone already when the export is in place.


def _move_into_place(tmp: str, dest: str) -> None:
  """Renames the finished directory `tmp` to `dest`; an earlier one there is moved aside first and
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
