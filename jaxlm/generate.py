"""Generation and perplexity with a decoder-only model: what `jaxlm.load(path)` gives for a causal LM.

  Generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop)   texts
  Generator.generate_ids(prompt_ids, ...)                                               token ids
  Generator.chat(conversations, ...)                   the assistant's replies (the chat template's prompts)
  Generator.chat_ids(conversations)                    those prompts as token ids
  Generator.perplexity(texts)                                                           per text
  Generator.score(texts, continuations=None)    summed next-token NLL and token count per text, or of each
                                                continuation given its text (multiple-choice scoring)

A batch of prompts of different lengths is left-padded to a bucket (a power of two), so every
prompt ends at the same slot; each row's positions count only its own tokens. One jitted
function prefills the prompts into a preallocated key/value cache (decoder.init_cache) and
then runs the whole decode inside a `lax.while_loop`: one compile per (batch size, prompt
bucket, max_new_tokens, greedy or sampling), none per token, and the loop stops early when
every row has produced a stop token. Temperature, top-k and top-p are traced values (changing
them compiles nothing); greedy decoding is temperature 0. Sampling draws from `seed`. An int8
model (quant.py) runs as it is: its kernels stay int8 and are dequantized inside the loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import chat, decoder
from jaxlm.errors import UsageError

MIN_BUCKET = 16  # Shortest prompt bucket.
MAX_STOP_IDS = 8  # Stop token ids per call (padded: their number compiles nothing).


def _bucket(n: int) -> int:
  return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def _pick(logits_BxV, rng, temperature, top_k, top_p, sample: bool):
  """The next token of each row: argmax, or a draw from the temperature-scaled distribution cut to
  its `top_k` most likely tokens (0 = all) and to the smallest set holding `top_p` of the mass."""
  if not sample:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  V = logits_BxV.shape[-1]
  x = logits_BxV / jnp.maximum(temperature, 1e-6)
  desc = -jnp.sort(-x, axis=-1)
  kth = jnp.take(desc, jnp.clip(top_k, 1, V) - 1, axis=-1)
  x = jnp.where((top_k > 0) & (x < kth[:, None]), -jnp.inf, x)
  desc = jnp.where((top_k > 0) & (desc < kth[:, None]), -jnp.inf, desc)
  p = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(p, -1) - p  # Mass of the more likely tokens: keep while it is below top_p.
  cut = jnp.min(jnp.where(before < top_p, desc, jnp.inf), -1)
  x = jnp.where(x < cut[:, None], -jnp.inf, x)
  return jax.random.categorical(rng, x, -1).astype(jnp.int32)


@functools.cache
def _generate_fn(graphdef: nnx.GraphDef, B: int, Tp: int, max_new: int, sample: bool):
  """The jitted prefill + decode loop for one shape."""
  S = Tp + max_new

  def run(params, ids_BxTp, valid_BxTp, rng, temperature, top_k, top_p, stop_E, pad_id):
    model = decoder.merge(graphdef, params)
    layers = model.layer_params()  # Sliced once, outside the loop (unrolled stacks).
    valid = jnp.concatenate([valid_BxTp, jnp.zeros((B, max_new), bool)], 1)
    positions = jnp.maximum(jnp.cumsum(valid_BxTp, 1, dtype=jnp.int32) - 1, 0)
    # Left padding: every row's last prompt token is at the last position.
    logits, cache = model.decode(ids_BxTp, positions, valid, decoder.init_cache(model.cfg, B, S), 0, last_only=True)
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    state = (0, logits[:, -1], cache, valid, jnp.zeros((B,), bool), out, valid_BxTp.sum(1, dtype=jnp.int32), rng)

    def cond(s):
      return (s[0] < max_new) & ~jnp.all(s[4])

    def body(s):
      i, logits_BxV, cache, valid, done, out, pos_B, rng = s
      rng, sub = jax.random.split(rng)
      tok = jnp.where(done, pad_id, _pick(logits_BxV, sub, temperature, top_k, top_p, sample))
      out = out.at[:, i].set(tok)
      done = done | (tok[:, None] == stop_E[None, :]).any(-1)
      valid = valid.at[:, Tp + i].set(True)
      logits, cache = model.decode(tok[:, None], pos_B[:, None], valid, cache, Tp + i, layers=layers)
      return i + 1, logits[:, 0], cache, valid, done, out, pos_B + 1, rng

    return jax.lax.while_loop(cond, body, state)[5]

  return jax.jit(run)


@functools.cache
def _nll_fn(graphdef: nnx.GraphDef):
  """(ids [B,T], mask [B,T], scored [B,T]) -> summed next-token NLL and count per row, float32, over the tokens
  `scored` marks (each predicted from the tokens before it; position 0 is never scored)."""

  def run(params, ids, mask, scored):
    logits = decoder.apply(graphdef, params, ids, mask)['logits'][:, :-1].astype(jnp.float32)
    targets, w = ids[:, 1:], scored[:, 1:].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * w).sum(-1), w.sum(-1)

  return jax.jit(run)


class Generator:
  """A decoder-only model with its tokenizer: generation and perplexity (module docstring)."""

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, tokenizer, batch_size: int = 8):
    self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
    self.cfg: decoder.DecoderConfig = decoder.merge(graphdef, params).cfg
    self.batch_size = batch_size

  @property
  def config(self) -> decoder.DecoderConfig:
    return self.cfg

  @property
  def eos_id(self) -> int | None:
    tok_eos = getattr(self.tokenizer, 'eos_id', None)
    return self.cfg.eos_token_id if self.cfg.eos_token_id is not None else tok_eos

  @property
  def stop_token_ids(self) -> list[int]:
    """The ids that end a row by default: the EOS (the model's, else the tokenizer's) and cfg.stop_token_ids."""
    eos = [] if self.eos_id is None else [self.eos_id]
    return eos + [i for i in self.cfg.stop_token_ids if i not in eos]

  def _encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.backend.encode_batch(list(texts))]

  def generate_ids(
    self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
  ) -> list[list[int]]:  # fmt: skip
    """The new tokens of each prompt, up to and including the first stop token (stop_token_ids by default)."""
    if max_new_tokens < 1:
      raise UsageError(f'max_new_tokens={max_new_tokens}: must be at least 1')
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise UsageError(f'temperature={temperature}, top_k={top_k}, top_p={top_p}: need temperature >= 0,'
                       ' top_k >= 0 and 0 < top_p <= 1')  # fmt: skip
    stops = list(stop_ids) if stop_ids is not None else self.stop_token_ids
    if len(stops) > MAX_STOP_IDS:
      raise UsageError(f'stop: at most {MAX_STOP_IDS} stop tokens, got {len(stops)}')
    stop_E = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_E[: len(stops)] = stops
    for i, p in enumerate(prompt_ids):
      if not len(p):
        raise UsageError(f'prompt {i} is empty')
      if len(p) + max_new_tokens > self.cfg.max_position_embeddings:
        raise UsageError(f'prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} exceed the model\'s'
                         f' max_position_embeddings={self.cfg.max_position_embeddings}')  # fmt: skip
    pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
    sample = temperature > 0
    rng = jax.random.key(seed)
    B, results = self.batch_size, []
    for start in range(0, len(prompt_ids), B):
      chunk = list(prompt_ids[start : start + B])
      Tp = _bucket(max(len(p) for p in chunk))
      ids, valid = np.full((B, Tp), pad, np.int32), np.zeros((B, Tp), bool)
      for r, p in enumerate(chunk):  # Left padding: every prompt ends at slot Tp - 1.
        ids[r, Tp - len(p) :], valid[r, Tp - len(p) :] = p, True
      fn = _generate_fn(self.graphdef, B, Tp, max_new_tokens, sample)
      out = np.asarray(fn(self.params, ids, valid, jax.random.fold_in(rng, start), np.float32(temperature),
                          np.int32(top_k), np.float32(top_p), stop_E, np.int32(pad)))  # fmt: skip
      for r in range(len(chunk)):
        row = out[r].tolist()
        ends = [j for j, t in enumerate(row) if t in stops]
        results.append(row[: ends[0] + 1] if ends else row)
    return results

  def generate(
    self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None,
  ) -> list[str]:  # fmt: skip
    """Each prompt's continuation, ended before a stop token (stop_token_ids) or the first `stop` string."""
    if isinstance(prompts, str):
      raise UsageError('prompts: expected a list of strings, got one string')
    return self._texts(self._encode(prompts), max_new_tokens, temperature, top_k, top_p, seed, stop)

  def chat_ids(self, conversations: Sequence, add_generation_prompt: bool = True, **variables) -> list[list[int]]:
    """Each conversation (a list of {'role', 'content'} messages) rendered by the tokenizer's chat template and
    tokenized as transformers' `apply_chat_template(..., tokenize=True)` does: the special tokens the template
    writes are the tokenizer's, and none are added. `variables`: more template variables."""
    template = getattr(self.tokenizer, 'chat_template', None)
    if template is None:
      source = getattr(self.tokenizer, 'source', 'the tokenizer')
      raise UsageError(f'{source}: the tokenizer has no chat template (chat_template in tokenizer_config.json'
                       f' or {chat.TEMPLATE_FILE}); use generate() with prompts written out')  # fmt: skip
    if isinstance(conversations, (str, dict)) or (len(conversations) and isinstance(conversations[0], dict)):
      raise UsageError('conversations: expected a list of conversations (each a list of messages); wrap one in a list')
    specials = getattr(self.tokenizer, 'special_tokens', {})
    texts = [chat.render(template, c, specials, add_generation_prompt, f'conversation {i}', **variables)
             for i, c in enumerate(conversations)]  # fmt: skip
    return [e.ids for e in self.tokenizer.backend.encode_batch(texts, add_special_tokens=False)]

  def chat(
    self, conversations: Sequence, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0, seed: int = 0, stop: Sequence[str] | None = None, **variables,
  ) -> list[str]:  # fmt: skip
    """The assistant's reply to each conversation: its chat_ids prompt continued as `generate` continues a prompt."""
    return self._texts(self.chat_ids(conversations, **variables), max_new_tokens, temperature, top_k, top_p, seed, stop)

  def _texts(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop) -> list[str]:
    """The continuations of `prompt_ids` as text, each ended before a stop token or the first `stop` string."""
    stop = list(stop or [])
    stop_ids = self.stop_token_ids
    for s in stop:  # A stop string that is one token also ends the row inside the loop.
      ids = self.tokenizer.backend.encode(s, add_special_tokens=False).ids
      if len(ids) == 1 and ids[0] not in stop_ids:
        stop_ids.append(ids[0])
    new = self.generate_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids[:MAX_STOP_IDS])
    texts = []
    for row in new:
      if row and row[-1] in stop_ids:
        row = row[:-1]
      text = self.tokenizer.backend.decode(row, skip_special_tokens=True)
      cuts = [text.find(s) for s in stop if s in text]
      texts.append(text[: min(cuts)] if cuts else text)
    return texts

  def perplexity(self, texts: Sequence[str]) -> list[float]:
    """exp(mean next-token NLL) of each text, tokenized as the tokenizer does (its BOS included)."""
    return [math.exp(r['nll'] / r['tokens']) for r in self.score(texts)]

  def score(
    self, texts: Sequence[str], continuations: Sequence[str] | None = None, names: Sequence[str] | None = None
  ) -> list[dict]:
    """{'nll': summed next-token negative log-likelihood (nats), 'tokens': how many tokens it sums} per text.

    Without `continuations`, every token of each text after the first (the tokenizer's BOS, where it adds
    one) is scored. With them, each continuation is scored given its text, the way multiple-choice tasks are
    scored: the text tokenized as a prompt, the continuation tokenized on its own (no special tokens) and
    appended, and only the continuation's tokens summed; -nll is its log-probability. Texts are batched by
    length (each batch padded to a power of two). A row with nothing to score or longer than
    max_position_embeddings is one error naming it: names[i] if given, else `text i`."""
    if continuations is not None and len(continuations) != len(texts):
      raise UsageError(f'{len(texts)} texts but {len(continuations)} continuations')
    enc = self._encode(texts)
    first = [1] * len(enc)  # The index of each row's first scored token.
    if continuations is not None:
      tails = [e.ids for e in self.tokenizer.backend.encode_batch(list(continuations), add_special_tokens=False)]
      first = [len(e) for e in enc]
      enc = [e + t for e, t in zip(enc, tails)]
    for i, ids in enumerate(enc):
      name = names[i] if names is not None else f'text {i}'
      if first[i] < 1 or len(ids) <= first[i]:
        what = 'a token of text and one of continuation' if continuations is not None else '2 tokens'
        raise UsageError(f'{name}: nothing to score; scoring needs at least {what}, got {len(ids)} in all')
      if len(ids) > self.cfg.max_position_embeddings:
        raise UsageError(f'{name}: {len(ids)} tokens exceed max_position_embeddings={self.cfg.max_position_embeddings}')
    out: list[dict] = [{}] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    fn = _nll_fn(self.graphdef)
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      T = min(_bucket(len(enc[rows[-1]])), self.cfg.max_position_embeddings)
      ids, mask, scored = (np.zeros((self.batch_size, T), np.int32) for _ in range(3))
      for r, i in enumerate(rows):
        ids[r, : len(enc[i])], mask[r, : len(enc[i])], scored[r, first[i] : len(enc[i])] = enc[i], 1, 1
      nll, n = (np.asarray(a) for a in fn(self.params, ids, mask, scored))
      for r, i in enumerate(rows):
        out[i] = {'nll': float(nll[r]), 'tokens': int(n[r])}
    return out
