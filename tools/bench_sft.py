"""Supervised fine-tuning on conversations, batches cut to length buckets against padded to data.seq_len, and
(--packed) several conversations packed into each row.

  python tools/bench_sft.py --rounds 2 [--out /tmp/bench_sft] [--packed]

Makes, once, in --out: a byte-level BPE of 2,000 tokens trained on the builtin corpus with ChatML's two special
tokens and a ChatML template; a random Qwen2-shaped model saved by transformers (4 layers, hidden 256, 4 query
and 2 key/value heads, tied head); and 101 conversations from the builtin corpus (a docstring's first 5-15
words as the question, up to 60 words after as the answer: 19-167 tokens rendered, mean 62). Then the whole
command `python -m jaxlm.train` fine-tunes that model in full on them, 80 steps of 16 at data.seq_len=256,
with data.bucket_lengths '' (buckets: 16, 24, 32, ...) and 'none' (every batch padded to 256) in turn, A B A B,
each run a fresh process and workdir. Prints every run's wall seconds, the medians, their ratio, and the losses
each side logged (the same: the cut drops only what the loss never reads). With --packed, a third run in each
round packs the conversations (data.pack_examples) and every run's conversations/s is printed: a packed row holds
several, counted by packing the file as the run does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, BATCH = 256, 16  # data.seq_len and global_batch_size of every run.
CHATML = (
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_inputs(out: str) -> None:
  """The tokenizer + model directory `out`/hf and `out`/chats.jsonl (module docstring); deterministic."""
  import torch
  import transformers

  from jaxlm import tokenizer
  from jaxlm.data import sources

  docs = [d for d in sources.BUILTIN['stdlib']() if len(d.split()) > 12]
  tok = tokenizer.train_bpe(docs[:2000], 2000)
  tok.backend.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  tok.chat_template = CHATML
  tok.save(os.path.join(out, 'hf'))
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
    vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    eos_token_id=tok.backend.token_to_id('<|im_end|>'), pad_token_id=0,
  )  # fmt: skip
  transformers.Qwen2ForCausalLM(cfg).save_pretrained(os.path.join(out, 'hf'))
  rng = random.Random(0)
  with open(os.path.join(out, 'chats.jsonl'), 'w') as f:
    for d in docs[2000:3000]:
      words = d.split()
      q, a = ' '.join(words[: rng.randint(5, 15)]), ' '.join(words[15 : 15 + rng.randint(5, 60)])
      conv = [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]
      f.write(json.dumps({'messages': conv}) + '\n')


def train(out: str, mode: str, steps: int) -> tuple[float, list[float]]:
  """(wall seconds, logged losses) of one fresh `python -m jaxlm.train` run: mode 'buckets', 'none' or 'packed'."""
  workdir = os.path.join(out, f'run_{mode}')
  buckets = 'none' if mode == 'none' else ''
  subprocess.run(['rm', '-rf', workdir], check=True)
  cmd = [
    sys.executable, '-m', 'jaxlm.train', '--config', os.path.join(HERE, 'configs', 'quickstart_causal.py'),
    '--workdir', workdir, '--config.task=sft', f'--config.model.init_from={out}/hf',
    f'--config.data.train=jsonl:{out}/chats.jsonl', '--config.data.eval=', '--config.data.messages_field=messages',
    f'--config.data.seq_len={SEQ_LEN}', '--config.model.max_position_embeddings=512', f'--config.global_batch_size={BATCH}',
    f'--config.num_train_steps={steps}', '--config.learning_rate=1e-3', '--config.warmup_steps=5',
    '--config.log_every_steps=20', '--config.eval_every_steps=0', f'--config.checkpoint_every_steps={steps}',
    '--config.sample_prompts=', f'--config.data.bucket_lengths={buckets}',
    f'--config.data.pack_examples={mode == "packed"}',
  ]  # fmt: skip
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  seconds = time.perf_counter() - t0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return seconds, [round(r['loss'], 4) for r in map(json.loads, f) if 'loss' in r]


def per_row(out: str) -> float:
  """Conversations per row of the packed run: the file packed as the run packs it (one pass, in order)."""
  from jaxlm import tokenizer
  from jaxlm.data import causal, pretrain

  tok = tokenizer.load(os.path.join(out, 'hf'))
  spec = f'jsonl:{out}/chats.jsonl'
  kw = dict(seq_len=SEQ_LEN, global_batch_size=1, messages_field='messages', shuffle_buffer=0, repeat=False)
  rows = list(pretrain.Iterator(causal.sft_dataset(spec, tok, pack=True, **kw)))
  return sum(int(b['segment_ids'].max()) for b in rows) / len(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/bench_sft')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=80)
  p.add_argument('--packed', action='store_true', help='also run with data.pack_examples and compare conversations/s')
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if not os.path.exists(os.path.join(args.out, 'chats.jsonl')):
    make_inputs(args.out)
  modes = ('buckets', 'none', 'packed') if args.packed else ('buckets', 'none')
  times = {m: [] for m in modes}
  losses = {}
  for r in range(args.rounds):
    for mode in modes:
      seconds, losses[mode] = train(args.out, mode, args.steps)
      times[mode].append(seconds)
      print(f'round {r + 1} {mode}: {seconds:.1f}s  losses {losses[mode]}', flush=True)
  med = {m: statistics.median(t) for m, t in times.items()}
  print(f'medians: buckets {med["buckets"]:.1f}s, padded to seq_len {med["none"]:.1f}s;'
        f' ratio {med["none"] / med["buckets"]:.2f}x')  # fmt: skip
  if args.packed:
    rows = args.steps * BATCH
    rate = {m: rows * (per_row(args.out) if m == 'packed' else 1) / med[m] for m in modes}
    print('conversations/s: ' + ', '.join(f'{m} {v:.1f}' for m, v in rate.items()) +
          f'; packed / buckets {rate["packed"] / rate["buckets"]:.2f}x')  # fmt: skip


if __name__ == '__main__':
  main()
