"""The PyTorch side of `tools/bench.py --mode finetune-e2e / predict-e2e`: what a transformers user writes.

  python tools/bench_torch.py finetune --model MINILM --train train.jsonl --test test.jsonl --out DIR --steps 400
  python tools/bench_torch.py predict --model DIR --input test.jsonl --output out.jsonl
  python tools/bench_torch.py with-head --model MINILM --labels code,io --out DIR

finetune: AutoTokenizer and AutoModelForSequenceClassification (attn_implementation='sdpa'); the
texts tokenized once (as `dataset.map` does), shuffled batches padded to their longest example by
DataCollatorWithPadding (--group_by_length: batches of similar lengths from transformers'
LengthGroupedSampler, as Trainer's `group_by_length=True`); AdamW with weight decay off biases and
LayerNorm, linear warmup then decay to 0 (optim.make_schedule's shape), clipping by global norm;
then the accuracy on --test, and the model and tokenizer saved to --out with save_pretrained. The
loop prints `train loop: start`, the mean loss every --log_every steps and `train loop: done`
(tools/bench_e2e.py times the loop between the first and the last).
predict: a file of texts in batches of --batch (32) padded to their longest example, under torch.no_grad(),
one {"label", "probabilities"} line per input, as `python -m jaxlm.predict` writes.
with-head: the model with a new classifier head (seeded), saved: a model both frameworks load.

Each command prints its figures as one JSON object, the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import transformers


def _records(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _load(model_dir: str, **kw):
  """The tokenizer and the classifier of `model_dir`, with sdpa attention."""
  transformers.logging.set_verbosity_error()
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation='sdpa', **kw)
  return tok, model


def _schedule(warmup: int, total: int):
  """The learning-rate factor of step s: linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
  return lambda s: s / max(warmup, 1) if s < warmup else max(total - s, 0) / max(total - warmup, 1)


def _batches(loader, steps: int):
  """`steps` batches from `loader`, reshuffled each epoch."""
  n = 0
  while True:
    for batch in loader:
      yield batch
      n += 1
      if n == steps:
        return


def _accuracy(model, tok, rows, labels, seq_len: int, batch: int) -> float:
  model.eval()
  right = 0
  with torch.no_grad():
    for i in range(0, len(rows), batch):
      chunk = rows[i : i + batch]
      enc = tok([r['text'] for r in chunk], padding='longest', truncation=True, max_length=seq_len, return_tensors='pt')
      pred = model(**enc).logits.argmax(-1).tolist()
      right += sum(labels[p] == r['label'] for p, r in zip(pred, chunk))
  return right / len(rows)


def finetune(args) -> dict:
  """Fine-tunes --model on --train for --steps batches; evaluates on --test and saves to --out."""
  torch.manual_seed(args.seed)
  train, test = _records(args.train), _records(args.test)
  labels = sorted({r['label'] for r in train})
  tok, model = _load(
    args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={s: i for i, s in enumerate(labels)},
    hidden_dropout_prob=args.hidden_dropout, attention_probs_dropout_prob=args.attention_dropout,
  )  # fmt: skip
  label_id = {s: i for i, s in enumerate(labels)}
  enc = tok([r['text'] for r in train], truncation=True, max_length=args.seq_len)
  data = [{'input_ids': ids, 'attention_mask': m, 'token_type_ids': t, 'labels': label_id[r['label']]}
          for ids, m, t, r in zip(enc['input_ids'], enc['attention_mask'], enc['token_type_ids'], train)]  # fmt: skip
  g = torch.Generator().manual_seed(args.seed)
  if args.group_by_length:
    lengths = [len(x['input_ids']) for x in data]
    sampler = transformers.trainer_pt_utils.LengthGroupedSampler(args.batch, lengths=lengths, generator=g)
    kw = {'sampler': sampler}
  else:
    kw = {'shuffle': True, 'generator': g}
  collate = transformers.DataCollatorWithPadding(tok)
  loader = torch.utils.data.DataLoader(data, batch_size=args.batch, drop_last=True, collate_fn=collate, **kw)
  decay = [p for n, p in model.named_parameters() if not (n.endswith('bias') or 'LayerNorm' in n)]
  rest = [p for n, p in model.named_parameters() if n.endswith('bias') or 'LayerNorm' in n]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay}, {'params': rest, 'weight_decay': 0.0}],
                          lr=args.lr, betas=(args.b1, args.b2), eps=args.eps)  # fmt: skip
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(args.warmup_steps, args.steps))
  model.train()
  lengths, losses = [], []
  print('train loop: start', flush=True)  # tools/bench_e2e.py times the loop between these two lines.
  for batch in _batches(loader, args.steps):
    lengths.append(batch['input_ids'].shape[1])
    loss = model(**batch).loss
    loss.backward()
    if args.clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if len(losses) % args.log_every == 0:  # As often as python -m jaxlm.train logs (log_every_steps).
      print(f'step {len(losses)}/{args.steps}  loss {np.mean(losses[-args.log_every :]):.4f}', flush=True)
  print(f'train loop: done, {len(lengths)} steps', flush=True)
  accuracy = _accuracy(model, tok, test, labels, args.seq_len, args.batch)
  if args.out:
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
  return {'steps': len(lengths), 'batch_len': float(np.mean(lengths)),
          'loss': float(np.mean(losses[-50:])), 'accuracy': accuracy, 'threads': torch.get_num_threads(),
          'torch': torch.__version__, 'transformers': transformers.__version__}  # fmt: skip


def predict(args) -> dict:
  """Classifies every text of --input in batches of --batch, in file order; writes --output."""
  tok, model = _load(args.model)
  model.eval()
  labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
  texts = [r['text'] for r in _records(args.input)]
  t0 = time.perf_counter()
  lengths = []
  with torch.no_grad(), open(args.output, 'w') as out:
    for i in range(0, len(texts), args.batch):
      enc = tok(texts[i : i + args.batch], padding='longest', truncation=True, max_length=args.seq_len,
                return_tensors='pt')  # fmt: skip
      lengths.append(enc['input_ids'].shape[1])
      probs = torch.softmax(model(**enc).logits.float(), -1).tolist()
      out.writelines(json.dumps({'label': labels[int(np.argmax(p))], 'probabilities': dict(zip(labels, p))}) + '\n'
                     for p in probs)  # fmt: skip
  return {'loop_s': time.perf_counter() - t0, 'examples': len(texts), 'batch_len': float(np.mean(lengths)),
          'threads': torch.get_num_threads()}  # fmt: skip


def with_head(args) -> dict:
  """--model with a new classifier head for --labels (seeded), saved with its tokenizer to --out."""
  torch.manual_seed(args.seed)
  labels = args.labels.split(',')
  tok, model = _load(args.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={s: i for i, s in enumerate(labels)})  # fmt: skip
  model.save_pretrained(args.out)
  tok.save_pretrained(args.out)
  return {'labels': labels}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  ft = sub.add_parser('finetune', help='fine-tune, evaluate, save')
  ft.add_argument('--model', required=True, help='Hugging Face BERT directory to start from')
  ft.add_argument('--train', required=True, help='JSONL of {"text", "label"}')
  ft.add_argument('--test', required=True, help='JSONL of {"text", "label"}: the accuracy')
  ft.add_argument('--out', help='where the fine-tuned model is saved')
  ft.add_argument('--steps', type=int, default=400, help='optimizer steps')
  ft.add_argument('--lr', type=float, default=2e-5, help='peak learning rate')
  ft.add_argument('--warmup_steps', type=int, default=40, help='linear warmup steps')
  ft.add_argument('--weight_decay', type=float, default=0.01, help='AdamW weight decay (not on biases, LayerNorm)')
  ft.add_argument('--b1', type=float, default=0.9)
  ft.add_argument('--b2', type=float, default=0.999)
  ft.add_argument('--eps', type=float, default=1e-6)
  ft.add_argument('--clip', type=float, default=1.0, help='gradient clipping by global norm (0: none)')
  ft.add_argument('--hidden_dropout', type=float, default=0.1)
  ft.add_argument('--attention_dropout', type=float, default=0.1)
  ft.add_argument('--log_every', type=int, default=50, help='print the mean loss every this many steps')
  ft.add_argument('--group_by_length', action='store_true', help="batches of similar lengths (Trainer's sampler)")
  pr = sub.add_parser('predict', help='classify a JSONL file')
  pr.add_argument('--model', required=True, help='Hugging Face classifier directory')
  pr.add_argument('--input', required=True, help='JSONL with a "text" field')
  pr.add_argument('--output', required=True, help='JSONL out, one line per input')
  wh = sub.add_parser('with-head', help='save the model with a new classifier head')
  wh.add_argument('--model', required=True, help='Hugging Face BERT directory')
  wh.add_argument('--labels', required=True, help='comma-separated label names')
  wh.add_argument('--out', required=True, help='output directory')
  for s in (ft, pr, wh):
    s.add_argument('--batch', type=int, default=32, help='examples per batch')
    s.add_argument('--seq_len', type=int, default=128, help='truncate to this many tokens')
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--threads', type=int, default=0, help='torch threads (0: its default)')
  args = p.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  res = {'finetune': finetune, 'predict': predict, 'with-head': with_head}[args.command](args)
  print(json.dumps(res))
  return 0


if __name__ == '__main__':
  sys.exit(main())
