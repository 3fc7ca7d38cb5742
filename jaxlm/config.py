"""The training config schema: every key, its default and what it means; and its validation.

Config files in configs/ start from `base()` and change what they need. `validate` checks the
schema (unknown or missing keys, types, non-finite numbers), the rules that span several parts
and the wandb.* keys (`check_wandb`: with a project set, the optional package must be installed);
each part's own keys are checked by the module that owns them, and trainer.check_config runs all
of it before any work, raising one UsageError naming the key at fault.
"""

from __future__ import annotations

import importlib.util
import math

import ml_collections

from jaxlm.errors import UsageError

SOURCE_KINDS = ('builtin', 'text', 'jsonl', 'csv', 'tsv', 'parquet', 'hf', 'tfrecord', 'tfds')


def split_spec(spec: str, key: str) -> tuple[str, str]:
  """('text', '/data/*.txt') for 'text:/data/*.txt'; an error naming `key` for anything else."""
  kind, sep, arg = spec.partition(':')
  if not sep or kind not in SOURCE_KINDS or not arg:
    raise UsageError(f'{key}={spec!r}: expected KIND:SPEC with KIND one of {SOURCE_KINDS}, e.g. text:/data/*.txt')
  return kind, arg


def base() -> ml_collections.ConfigDict:
  """The full schema with defaults; a config file may change values but not add keys."""
  c = ml_collections.ConfigDict()
  c.task = 'mlm'  # 'mlm' (masked-LM pretraining), 'classification' or 'regression' (fine-tuning);
  #   'causal_lm' (next-token pretraining of a decoder) or 'sft' (prompt -> response fine-tuning of one).
  c.task_name = ''  # A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): sets task,
  #   data.* and the metrics (configs/finetune_glue.py).
  c.seed = 0  # Seeds parameters, dropout and the data order.
  c.num_train_steps = 1000  # Optimizer updates in the whole run.
  c.global_batch_size = 256  # Sequences per update, summed over all devices and hosts.
  c.grad_accum_steps = 1  # Microbatches per update (lax.scan); the batch is split k ways.
  c.learning_rate = 1e-4  # Peak learning rate, reached after warmup.
  c.warmup_steps = 100  # Linear warmup from 0, in steps; when > 0 it overrides warmup_ratio.
  c.warmup_ratio = 0.0  # Warmup as a fraction of num_train_steps (used when warmup_steps is 0).
  c.lr_schedule = 'linear'  # Decay after warmup: 'linear' or 'cosine' to 0, or 'constant'.
  c.weight_decay = 0.01  # Decoupled weight decay (not on biases or LayerNorm).
  c.clip_grad_norm = 1.0  # Global-norm clipping; 0 turns it off.
  c.nan_policy = 'stop'  # A NaN / Inf loss: 'stop' (keep the last good checkpoint) or 'skip'
  #   (leave that update out, count it as `skipped_steps`).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # 'adamw', 'adafactor' or 'lamb'.
  c.optimizer.b1 = 0.9  # First-moment decay (adamw, lamb).
  c.optimizer.b2 = 0.999  # Second-moment decay (adamw, lamb).
  c.optimizer.eps = 1e-6  # Denominator epsilon (adamw, lamb).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel devices (-1: the rest).
  c.mesh.fsdp = 1  # Devices over which parameters and optimizer state are sharded.
  c.mesh.tensor = 1  # Tensor-parallel devices.

  c.log_every_steps = 50  # Metrics to metrics.jsonl, TensorBoard and the console.
  c.eval_every_steps = 500  # Evaluate on data.eval (0: never).
  c.checkpoint_every_steps = 1000  # Orbax checkpoint interval (also saved at the end and on SIGTERM).
  c.keep_checkpoints = 3  # Newest checkpoints kept in WORKDIR/checkpoints.
  c.best_metric = 'eval_loss'  # Keep the parameters of the best evaluation in checkpoints/best
  #   ('' = off); any logged eval_* key, or 'auto': the task's main metric (e.g. eval_matthews).
  c.best_mode = 'min'  # 'min' or 'max' of best_metric (ignored for 'auto').
  c.profile_start_step = -1  # Capture a jax.profiler trace from this step (-1: off) ...
  c.profile_num_steps = 5  # ... for this many steps, into WORKDIR/profile.
  c.sample_prompts = ''  # Decoders: prompts separated by '|' that the final parameters continue (greedy,
  #   32 tokens), printed as 'sample: "<prompt>" -> "<text>"' after the last step ('' = none).

  c.finetune = ml_collections.ConfigDict()
  c.finetune.mode = 'full'  # What trains: 'full', 'head' (pooler + classifier on a frozen
  #   encoder) or 'lora' (low-rank adapters + the head). Frozen weights get no optimizer state.
  c.finetune.lora_rank = 8  # r of the LoRA adapters.
  c.finetune.lora_alpha = 16.0  # The adapters' update is scaled by alpha / r.
  c.finetune.lora_targets = 'q,k,v,o,wi,wo'  # Matrices with adapters: attention q, k, v, o and
  #   feed-forward wi (in), wo (out) (and wg, the gate of a Llama-shaped decoder). Merged into the
  #   dense weights on export.
  c.finetune.adapter_size = 64  # mode 'adapter': width of the bottleneck adapters (Houlsby et al. 2019) that
  #   each layer gets; the up-projection starts at zero, so training starts from the pretrained model.
  c.finetune.adapter_placement = 'both'  # Adapters after the attention output ('attention'), after the
  #   feed-forward ('ffn') or after both ('both'), each before its residual add and LayerNorm.
  c.finetune.adapter_train_layernorm = True  # mode 'adapter': the layers' LayerNorms train too (as in the paper).

  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''  # Weights & Biases project that process 0 logs the metrics and the config to
  #   ('' = off); needs `pip install 'jaxlm[wandb]'`. A resumed run continues the same W&B run.
  c.wandb.entity = ''  # Team or user that owns the project ('' = your default entity).
  c.wandb.name = ''  # Display name of the run ('' = the workdir's name).
  c.wandb.tags = ''  # Comma-separated tags, e.g. 'sst2,minilm'.

  c.prune = ml_collections.ConfigDict()
  c.prune.sparsity = 0.0  # Gradual magnitude pruning of the encoder's dense kernels to this
  #   final sparsity (0 = off; finetune.mode=full only). Pruned weights stay exactly zero.
  c.prune.begin_step = 0  # The cubic schedule (Zhu & Gupta 2017) starts here ...
  c.prune.end_step = -1  # ... and reaches prune.sparsity here (-1: at 3/4 of num_train_steps).
  c.prune.frequency = 10  # Masks are recomputed every this many steps in between.

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'base'  # BERT encoders: tiny, mini, small, medium, base or large; decoders (causal_lm,
  #   sft): gpt2-tiny, gpt2-mini, gpt2, gpt2-medium, ..., llama-tiny, llama-mini, llama-160m, llama-1b, llama-7b.
  c.model.init_from = ''  # Hugging Face BERT / GPT-2 / Llama directory or jaxlm run / export to start from
  #   ('' = random init). Parameters it lacks (e.g. a new classifier) are initialised fresh.
  c.model.dtype = 'float32'  # Compute dtype; 'bfloat16' on TPU. Parameters stay float32.
  c.model.scan_layers = ml_collections.config_dict.placeholder(bool)  # lax.scan over layers: compile time
  #   independent of depth. None: scan above 6 layers, unroll up to 6 and on a GPU (faster steps).
  c.model.remat = 'none'  # Rematerialisation: none, full, save_dots, save_dots_no_batch.
  c.model.attention_impl = ''  # Attention kernel without attention dropout: '' = the backend's own (xla on
  #   CPU, cudnn on GPU, splash on TPU), or xla, cudnn, splash, explicit (jaxlm/attention.py).
  c.model.hidden_act = ''  # '' keeps the preset's; or gelu, gelu_tanh, relu, silu.
  c.model.hidden_dropout = 0.1  # Dropout on embeddings and residual branches.
  c.model.attention_dropout = 0.1  # Dropout on attention probabilities; 0.0 = training takes the fused
  #   attention kernel (no [B,N,T,T] probabilities in memory).
  c.model.max_position_embeddings = 512  # Position table size; must cover data.seq_len.
  c.model.vocab_multiple = 128  # Pad the vocabulary tables to a multiple of this, so any mesh.tensor divides them.

  c.data = ml_collections.ConfigDict()
  c.data.train = 'builtin:stdlib'  # KIND:SPEC: builtin:NAME, text:GLOB, jsonl:GLOB, csv:GLOB,
  #   tsv:GLOB, parquet:GLOB, hf:PATH (a Hugging Face save_to_disk directory), tfrecord:GLOB
  #   (tools/prepare_data.py) or tfds:NAME. gs:// paths work.
  c.data.eval = ''  # Same form; read once and in full at every evaluation; '' = no evaluation.
  c.data.train_split = 'train'  # Split of data.train (tfds:, and hf: when it is a DatasetDict).
  c.data.eval_split = 'validation'  # Split(s) of data.eval, comma-separated; the first is
  #   reported as eval_*, others as eval_<split without "validation_">_* (MNLI mismatched).
  c.data.tfds_data_dir = ''  # TFDS data_dir ('' = the TFDS default; gs:// works).
  c.data.text_field = 'text'  # Field / column holding the text (jsonl, csv, tsv, parquet, hf, tfds).
  c.data.text_pair_field = ''  # Field of the second text of a pair ('' = single texts).
  c.data.label_field = 'label'  # Field of the label (fine-tuning).
  c.data.prompt_field = 'prompt'  # task=sft: field of the prompt (no loss on its tokens) ...
  c.data.response_field = 'response'  # ... and of the response the model learns to write.
  c.data.messages_field = ''  # task=sft: a field holding a conversation (a list of {"role", "content"} messages)
  #   instead of prompt / response: rendered by the tokenizer's chat template, the loss on the assistant's turns.
  c.data.pack_examples = False  # task=sft: several examples (or conversations) in each training row, first fit
  #   in runs of 256, each attending only to itself from position 0 (segment_ids): fewer rows of padding; the
  #   evaluation keeps one example a row.
  c.data.chat_template = ''  # A Jinja chat template file the run's tokenizer takes (and saves) in place of its
  #   own ('' = the tokenizer's, if any): what data.messages_field, Generator.chat and predict --mode chat use.
  c.data.text_docs = 'line'  # text: sources: 'line' (a document per line) or 'blank_line'
  #   (documents separated by blank lines, e.g. one sentence per line).
  c.data.whole_word_masking = False  # Mask all WordPieces of a word together.
  c.data.seq_len = 128  # Tokens per sequence, [CLS] and [SEP] included.
  c.data.max_predictions = 20  # Masked positions per sequence (static shape).
  c.data.mask_prob = 0.15  # Fraction of tokens chosen for prediction.
  c.data.nsp = False  # Next-sentence prediction: pairs [CLS] A [SEP] B [SEP], half of B random.
  c.data.separate_documents = False  # Pretraining: the documents packed into a sequence attend only
  #   to themselves (segment_ids) and their positions restart at 0 (position_ids); not with data.nsp.
  c.data.tokenizer = ''  # Tokenizer dir or tokenizer.json; '' = from model.init_from or trained.
  c.data.train_tokenizer_vocab = 0  # >0: train a vocabulary of this size on data.train into
  #   WORKDIR/tokenizer (when data.tokenizer is ''): WordPiece for an encoder, byte-level BPE for a decoder.
  c.data.lowercase = True  # Lowercase when training a tokenizer.
  c.data.shuffle_buffer = 1000  # Sequences in the shuffle buffer (0: no shuffling).
  c.data.bucket_lengths = ''  # Fine-tuning / evaluation: a batch is padded to the smallest of these
  #   lengths that holds its longest example (one compiled program each): '' = 16, 24, 32, 48, 64,
  #   96, ... (powers of two and 1.5 times them) up to data.seq_len, 'none' = always data.seq_len, or e.g. '32,64,96,128'.
  c.data.length_window = 16  # Fine-tuning: sort the shuffled examples by length in windows of this
  #   many batches and run the window's batches in a random order (less padding); 1 = no sorting.
  return c


def _flat(c: ml_collections.ConfigDict, prefix: str = '') -> dict:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _positive(flat: dict, *keys: str):
  for k in keys:
    if not isinstance(flat[k], int) or flat[k] <= 0:
      raise UsageError(f'{k}={flat[k]!r}: must be a positive integer')


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises UsageError naming the first bad key: unknown or missing keys, wrong types, non-finite
  numbers, and the checks that span several parts (mesh x batch, sequence x model). Each part's
  own keys are checked by its owner (trainer.check_config calls them all, before any work)."""
  from jaxlm import sharding  # lazy: configs/*.py import this module, which stays free of JAX

  schema, flat = _flat(base()), _flat(c)
  for k in flat:
    if k not in schema:
      close = [s for s in schema if s.split('.')[-1] == k.split('.')[-1]]
      hint = f' (did you mean {close[0]}?)' if close else ''
      raise UsageError(f'unknown config key {k!r}{hint}')
  for k, v in schema.items():
    if k not in flat:
      raise UsageError(f'config key {k!r} is missing')
    if v is not None and flat[k] is not None and type(v) is not type(flat[k]):
      if not (isinstance(v, float) and isinstance(flat[k], int)):
        raise UsageError(f'{k}={flat[k]!r}: expected a {type(v).__name__}')
  for k, v in flat.items():
    if isinstance(v, float) and not math.isfinite(v):
      raise UsageError(f'{k}={v}: must be a finite number')
  _positive(flat, 'num_train_steps', 'global_batch_size', 'grad_accum_steps', 'log_every_steps', 'data.seq_len')
  _positive(flat, 'data.max_predictions', 'checkpoint_every_steps', 'keep_checkpoints', 'finetune.lora_rank')
  _positive(flat, 'model.vocab_multiple', 'finetune.adapter_size')
  check_wandb(flat)
  if flat['eval_every_steps'] < 0:
    raise UsageError(f'eval_every_steps={flat["eval_every_steps"]}: must be >= 0')
  if flat['best_metric'] not in ('', 'auto') and not flat['best_metric'].startswith('eval_'):
    raise UsageError(f'best_metric={flat["best_metric"]!r}: expected an eval_* metric, "auto" or ""')
  if flat['best_mode'] not in ('min', 'max'):
    raise UsageError(f'best_mode={flat["best_mode"]!r}: expected min or max')
  if flat['nan_policy'] not in ('stop', 'skip'):
    raise UsageError(f'nan_policy={flat["nan_policy"]!r}: expected stop or skip')
  if flat['data.seq_len'] > flat['model.max_position_embeddings']:
    raise UsageError(
      f'data.seq_len={flat["data.seq_len"]} exceeds model.max_position_embeddings={flat["model.max_position_embeddings"]}'
    )
  if flat['data.seq_len'] < 8:
    raise UsageError(f'data.seq_len={flat["data.seq_len"]}: must be at least 8')
  if flat['data.messages_field'] and flat['task'] != 'sft':
    raise UsageError(f'data.messages_field={flat["data.messages_field"]!r}: conversations are fine-tuning data for'
                     f' task=\'sft\', not task={flat["task"]!r}')  # fmt: skip
  mesh = sharding.mesh_shape(flat['mesh.data'], flat['mesh.fsdp'], flat['mesh.tensor'], num_devices)
  dp = mesh[0] * mesh[1]
  batch, accum = flat['global_batch_size'], flat['grad_accum_steps']
  if batch % accum:
    raise UsageError(f'global_batch_size={batch} is not divisible by grad_accum_steps={accum}')
  if (batch // accum) % dp:
    raise UsageError(
      f'global_batch_size={batch} is not divisible by the data-parallel size'
      f' mesh.data*mesh.fsdp={dp}' + (f' times grad_accum_steps={accum}' if accum > 1 else '')
    )


def wandb_tags(tags: str) -> list[str]:
  """'a, b' -> ['a', 'b']: the tags of config.wandb.tags."""
  return [t.strip() for t in tags.split(',') if t.strip()]


def check_wandb(flat: dict) -> None:
  """Raises UsageError naming the first bad wandb.* key; with a project set, the package must be installed."""
  project = flat['wandb.project']
  if not project:
    for k in ('wandb.entity', 'wandb.name', 'wandb.tags'):
      if flat[k]:
        raise UsageError(f'{k}={flat[k]!r} is set but wandb.project is empty (Weights & Biases logging is off)')
    return
  if any(ch in project for ch in '/\\#?%:'):
    raise UsageError(f'wandb.project={project!r}: a W&B project name cannot contain / \\ # ? % or :')
  long = [t for t in wandb_tags(flat['wandb.tags']) if len(t) > 64]
  if long:
    raise UsageError(f'wandb.tags: the tag {long[0]!r} is longer than the 64 characters W&B allows')
  if importlib.util.find_spec('wandb') is None:
    raise UsageError(f"wandb.project={project!r}: the wandb package is not installed; pip install 'jaxlm[wandb]'")


def pretraining(preset: str) -> ml_collections.ConfigDict:
  """The original BERT recipe (Devlin et al. 2019) for one preset: batch 256 x 128 tokens,
  1M steps, AdamW at 1e-4 with 10k warmup and linear decay, bfloat16 compute."""
  c = base()
  c.num_train_steps = 1_000_000  # Updates (the paper's 1M at batch 256).
  c.global_batch_size = 256  # Sequences per update.
  c.learning_rate = 1e-4  # Peak AdamW learning rate.
  c.warmup_steps = 10_000  # Linear warmup.
  c.log_every_steps = 100  # Console / metrics.jsonl / TensorBoard.
  c.eval_every_steps = 10_000  # Held-out MLM loss.
  c.checkpoint_every_steps = 10_000  # Checkpoint interval.
  c.model.preset = preset  # Sizes of the published family.
  c.model.dtype = 'bfloat16'  # TPU / GPU compute dtype; use --config.model.dtype=float32 on CPU.
  c.data.train = ''  # Required: text:GLOB of your corpus (gs:// works), e.g. text:gs://bucket/wiki/*.txt.
  c.data.seq_len = 128  # The paper's first phase (90% of steps).
  c.data.max_predictions = 20  # 15% of 128.
  c.data.train_tokenizer_vocab = 30522  # Train a BERT-sized vocabulary on data.train unless
  #   data.tokenizer names one (e.g. the directory of a Hugging Face BERT).
  c.data.shuffle_buffer = 10_000  # Sequences in the shuffle buffer.
  return c


def finetuning() -> ml_collections.ConfigDict:
  """The BERT fine-tuning recipe (Devlin et al. 2019, section 4): batch 32, sequences of 128,
  AdamW at 2e-5 with 10% warmup and linear decay, evaluation and the best checkpoint by the
  task's main metric."""
  c = base()
  c.task = 'classification'  # Or 'regression' for a float target.
  c.num_train_steps = 2000  # About 1 epoch of SST-2 at batch 32; set it for your data size.
  c.global_batch_size = 32  # Examples per update.
  c.learning_rate = 2e-5  # Peak AdamW learning rate (1e-3 suits finetune.mode=head or lora).
  c.warmup_steps = 0  # Steps of warmup; 0: warmup_ratio decides.
  c.warmup_ratio = 0.1  # 10% warmup, whatever num_train_steps is.
  c.weight_decay = 0.01  # Decoupled weight decay.
  c.log_every_steps = 50  # Console / metrics.jsonl / TensorBoard.
  c.eval_every_steps = 500  # Whole eval set; also writes WORKDIR/eval_results.json.
  c.checkpoint_every_steps = 500  # Checkpoint interval.
  c.best_metric = 'auto'  # Keep the best checkpoint by the task's main metric.
  c.model.dtype = 'float32'  # 'bfloat16' on TPU / GPU.
  c.model.hidden_dropout = 0.1  # BERT's dropout, also before the classifier.
  c.data.seq_len = 128  # Tokens per example (text pairs share them).
  c.data.shuffle_buffer = 10_000  # Examples in the shuffle buffer.
  return c
