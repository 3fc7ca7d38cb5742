"""Parameters out of a training run: `python -m jaxlm.export --checkpoint PATH --out DIR`.

  --checkpoint  a training workdir (its newest checkpoint), a step directory
                WORKDIR/checkpoints/<step>, a directory this tool wrote, or a Hugging Face
                BERT directory
  --format      jaxlm: model_config.json + params/ (Orbax) + tokenizer/   (default)
                hf:    config.json + model.safetensors + tokenizer files, for transformers
                       (a BERT, or the GPT-2 / Llama of a causal LM run)
  --quantize    int8: weight-only int8 dense kernels with per-channel float32 scales
                (quant.py: an encoder's or a causal LM's), in a jaxlm export that
                `jaxlm.load` runs as it is
  --dtype       float32 (default), bfloat16 or float16: the tensor type of --format hf (16 bits:
                half the size, as model hubs hold them; transformers loads them in that type)
  --drop_adapters  write the model without its bottleneck adapters (finetune.mode=adapter): what
                --format hf needs, as transformers' BERT has no adapter layers (refused without it)

Only parameters are written (no optimizer state), into a temporary directory next to --out that
is renamed into place when complete: a failed export leaves --out as it was, and an earlier
export there is replaced only by a finished one. This module is the command only: reading and
writing the directories is store.py's.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from flax import nnx

from jaxlm import hf, peft, quant, store
from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UsageError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='training workdir, checkpoint step dir, export or HF dir')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--format', choices=['jaxlm', 'hf'], default='jaxlm', help='jaxlm (Orbax) or hf (transformers)')
  p.add_argument('--quantize', choices=['none', 'int8'], default='none', help='int8: weight-only int8 kernels')
  p.add_argument('--dtype', choices=hf.DTYPES, default='float32', help='tensor type of --format hf')
  p.add_argument(
    '--drop_adapters', action='store_true', help='leave out the bottleneck adapters (needed for --format hf)'
  )
  args = p.parse_args(argv)
  out = f'--out {args.out}'
  try:
    if args.quantize != 'none' and args.format == 'hf':
      raise UsageError('--quantize int8 writes a jaxlm export; a Hugging Face directory holds float tensors')
    if args.dtype != 'float32' and args.format != 'hf':
      raise UsageError(f'--dtype {args.dtype}: applies to --format hf; a jaxlm export keeps the float32 parameters')
    dest = os.path.realpath(args.out)
    if os.path.isdir(dest) and os.path.exists(args.checkpoint) and os.path.samefile(dest, args.checkpoint):
      raise UsageError(f'{out}: is the --checkpoint; export to another directory')
    store.check_out_dir(args.out, out)  # Before any work.
    with store.quiet_absl():
      graphdef, params, tok_dir, labels = store.load_model(args.checkpoint)
    adapter_size = getattr(nnx.merge(graphdef, params).cfg, 'adapter_size', 0)
    if adapter_size and args.drop_adapters:
      before = model_lib.count_params(params)
      graphdef, params = peft.drop_adapters(graphdef, params)
      print(f'dropped the bottleneck adapters ({before - model_lib.count_params(params):,} parameters)')
    elif adapter_size and args.format == 'hf':
      raise UsageError(
        f'--checkpoint {args.checkpoint}: the model has bottleneck adapters (finetune.mode=adapter, size'
        f" {adapter_size}), which transformers' BERT has no layers for; export with --format jaxlm, or pass"
        ' --drop_adapters to write the model without them (what they learnt is then lost)'
      )
    if args.quantize == 'int8':
      graphdef, params = quant.quantize(graphdef, params)
    elif args.format == 'hf':
      graphdef, params = quant.dequantize(graphdef, params)  # An int8 export back to float tensors.
    tok = tokenizer_lib.load(tok_dir)
    if args.format == 'hf':
      write = functools.partial(store.write_hf, dtype=args.dtype)
    else:
      write = store.write_jaxlm
    store.replace_dir(args.out, lambda d: write(d, graphdef, params, tok, labels), out)
    quantization = nnx.merge(graphdef, params).cfg.quantization
    kind = args.format if quantization == 'none' else f'{args.format}, {quantization} kernels'
    kind += f', {args.dtype}' if args.dtype != 'float32' else ''
    print(f'exported {model_lib.count_params(params) / 1e6:.1f}M parameters ({kind}) -> {args.out}')
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
