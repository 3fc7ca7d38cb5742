"""`jaxlm.load(path)`: tokenizer + model + parameters in one object, for inference scripts.

`Predictor.embed`, `.fill_mask` and `.predict` tokenize, pad each batch to one of a few length
buckets and its batch size to a power of two (so a stream of inputs of every length and count
compiles a handful of programs, not one per shape), run a jitted pure function of the
parameters, and return numpy / Python values; a causal LM loads as a generate.Generator. An
int8 export (`jaxlm.export --quantize int8`), or `load(..., quantize='int8')`, of either kind
keeps its kernels int8 and dequantizes them inside the jitted forward. The model is read through
store.py; this module imports neither TensorFlow nor the training code.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxlm import generate, hf_causal, models, quant, store
from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UsageError

# Powers of two and 1.5 times them: a batch pads at most a third beyond its longest input.
LENGTH_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LOOKAHEAD = 64  # Batches tokenized ahead, whose shapes compile while the first ones run.


def _bucket(n: int, buckets: Sequence[int], cap: int) -> int:
  for b in buckets:
    if n <= b:
      return min(b, cap)
  return cap


def default_dtype() -> str:
  """The compute dtype `load` picks: bfloat16 on TPU and GPU, float32 on CPU.

  TPUs and recent GPUs (A100, H100: bf16 tensor cores) compute bfloat16 at several times their
  float32 rate, and bfloat16 keeps float32's exponent range, so a float32-trained BERT runs in
  it unchanged; parameters stay float32 and LayerNorm / softmax statistics are computed in
  float32. CPUs have no fast bfloat16 matmul, so there it stays float32.
  """
  return 'bfloat16' if jax.default_backend() in ('tpu', 'gpu') else 'float32'


class Predictor:
  """A loaded model: `embed`, `fill_mask` (MLM head) and `predict` (classifier head)."""

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokenizer: tokenizer_lib.Tokenizer,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
  ):
    self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
    self.config: model_lib.ModelConfig = nnx.merge(graphdef, params).cfg
    n = self.config.num_labels
    self.labels = list(labels) if labels else [f'LABEL_{i}' for i in range(n)]
    self.batch_size = batch_size
    self.max_length = min(max_length or 512, self.config.max_position_embeddings)
    self._fns = {}

  # --------------------------------------------------------------------------- plumbing

  def _fn(self, kind: str):
    """A jitted pure function of (params, ids, mask, types[, positions]) for one output kind."""
    if kind not in self._fns:
      graphdef = self.graphdef

      def run(params, ids, mask, types, positions=None):
        out = model_lib.apply(graphdef, params, ids, mask, types, positions, first_token_only=kind == 'classify')
        if kind == 'embed':
          return out['hidden'].astype(jnp.float32)
        if kind == 'mlm':  # The real vocabulary only: padding rows (model.vocab_multiple) are no token.
          logits = out['mlm_logits'][..., : self.config.vocab_size]
          return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return out['logits'].astype(jnp.float32)

      self._fns[kind] = jax.jit(run)
    return self._fns[kind]

  def _batches(self, inputs: Sequence) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Padded (ids, mask, types, n_real) batches; lengths and batch sizes come from buckets."""
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start : start + self.batch_size]
      enc = self.tokenizer.encode(chunk, self.max_length)
      T = _bucket(max(len(i) for i, _ in enc), LENGTH_BUCKETS, self.max_length)
      B = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      ids = np.full((B, T), self.tokenizer.pad_id, np.int32)
      mask, types = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
      for r, (i, t) in enumerate(enc):
        ids[r, : len(i)], mask[r, : len(i)], types[r, : len(t)] = i, 1, t
      yield ids, mask, types, len(chunk)

  def _outputs(self, kind: str, inputs: Sequence) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(mask, output, n_real) per batch of `inputs`, tokenized LOOKAHEAD batches at a time. The programs of
    the shapes that come later in those compile in a background thread while the earlier batches run:
    compiling keeps one CPU core busy, running all of them."""
    fn = self._fn(kind)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, np.int32)  # noqa: E731
    compile_ = lambda shape: fn.lower(self.params, spec(shape), spec(shape), spec(shape)).compile()  # noqa: E731
    pool, ahead = ThreadPoolExecutor(1), {}
    batches = self._batches(inputs)
    try:
      while chunk := list(itertools.islice(batches, LOOKAHEAD)):
        for ids, *_ in chunk[1:]:
          if ids.shape != chunk[0][0].shape and ids.shape not in ahead:
            ahead[ids.shape] = pool.submit(compile_, ids.shape)
        for ids, mask, types, n in chunk:
          if ids.shape in ahead:  # Compiled into `fn`'s cache (once: later lookups hit it): the call runs it.
            ahead[ids.shape].result()
          yield mask, np.asarray(fn(self.params, ids, mask, types)), n
    finally:
      pool.shutdown(cancel_futures=True)

  # --------------------------------------------------------------------------- public API

  def logits(self, input_ids, attention_mask, token_type_ids) -> jax.Array:
    """Classifier logits [B, C] (float32, on device) for an already tokenized, padded batch."""
    if not self.config.num_labels:
      raise UsageError('logits needs a model with a classifier head; this one has none')
    return self._fn('classify')(self.params, input_ids, attention_mask, token_type_ids)

  def embed(self, texts: Sequence[str], pooling: str = 'mean', normalize: bool = False) -> np.ndarray:
    """One vector per text, [n, hidden]: mask-aware mean of the last layer, or its [CLS] vector."""
    if pooling not in ('mean', 'cls'):
      raise UsageError(f'pooling={pooling!r}: expected "mean" or "cls"')
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = []
    for mask, h_BxTxD, n in self._outputs('embed', texts):
      if pooling == 'cls':
        v = h_BxTxD[:, 0]
      else:
        m = mask[..., None].astype(np.float32)
        v = (h_BxTxD * m).sum(1) / np.maximum(m.sum(1), 1.0)
      out.append(v[:n])
    vecs = np.concatenate(out) if out else np.zeros((0, self.config.hidden_size), np.float32)
    if normalize:
      vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=-1, keepdims=True), 1e-12)
    return vecs

  def fill_mask(self, text: str | Sequence[str], top_k: int = 5):
    """The top_k fillers of each [MASK]: a list of {token, token_str, score, sequence}.

    Given one text with one mask, returns that list; with several masks, one list per mask;
    given a list of texts, one such result per text.
    """
    if not self.config.mlm_head:
      raise UsageError('fill_mask needs a model with an MLM head; this one has none')
    if self.tokenizer.mask_id is None:
      raise UsageError(f'{self.tokenizer.source}: the vocabulary has no [MASK] token')
    if not isinstance(top_k, int) or top_k < 1:
      raise UsageError(f'top_k={top_k!r}: must be a positive integer')
    texts = [text] if isinstance(text, str) else list(text)
    results = []
    for ids, mask, types, n in self._batches(texts):
      where = [np.flatnonzero(row == self.tokenizer.mask_id) for row in ids[:n]]
      for t, w in zip(texts[len(results) :], where):
        if len(w) == 0:
          raise UsageError(f'no {self.tokenizer.mask_token} in the text {t!r}')
      P = 1 << (max(len(w) for w in where) - 1).bit_length()
      pos = np.zeros((ids.shape[0], P), np.int32)
      for r, w in enumerate(where):
        pos[r, : len(w)] = w
      logp_BxPxV = np.asarray(self._fn('mlm')(self.params, ids, mask, types, pos))
      for r, w in enumerate(where):
        per_mask = []
        for j, position in enumerate(w):
          top = np.argsort(-logp_BxPxV[r, j])[:top_k]
          per_mask.append([self._filled(ids[r], mask[r], position, int(t), logp_BxPxV[r, j, t]) for t in top])
        results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    return results[0] if isinstance(text, str) else results

  def _filled(self, ids, mask, position, token, logp):
    row = ids[: int(mask.sum())].copy()
    row[position] = token
    body = [i for i in row if i not in (self.tokenizer.cls_id, self.tokenizer.sep_id, self.tokenizer.pad_id)]
    return {
      'token': token,
      'token_str': self.tokenizer.decode([token]),
      'score': float(np.exp(logp)),
      'sequence': self.tokenizer.decode(body),
    }

  def predict(self, inputs: Sequence, return_logits: bool = False) -> list[dict]:
    """Per text or (text, pair): {label, probabilities: {label: p}}; for regression {score}."""
    if not self.config.num_labels:
      raise UsageError('predict needs a model with a classifier head; this one has none')
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    out = []
    for _, logits, n in self._outputs('classify', inputs):
      for row in logits[:n]:
        if self.config.num_labels == 1:
          out.append({'score': float(row[0])})
          continue
        p = np.exp(row - row.max())
        p /= p.sum()
        res = {'label': self.labels[int(p.argmax())], 'probabilities': dict(zip(self.labels, map(float, p)))}
        if return_logits:
          res['logits'] = row.tolist()
        out.append(res)
    return out


def load(
  path: str, dtype: str | None = None, batch_size: int = 32, quantize: str | None = None, **overrides
) -> Predictor | generate.Generator:
  """A Predictor from a Hugging Face BERT directory, a training workdir (its newest checkpoint),
  a checkpoint step directory or a `python -m jaxlm.export` directory (float or int8), local or
  remote (gs://); a generate.Generator for a causal LM (a Hugging Face GPT-2 / Llama directory, or a
  jaxlm directory holding a decoder, float or int8). The compute dtype is chosen for the platform
  unless given (default_dtype). The layers run as a lax.scan unless `scan_layers=False` is given
  (a Hugging Face causal LM: as decoder.DecoderConfig.scan_layers decides). `quantize='int8'`
  quantizes a float model's dense kernels on loading (quant.quantize), an encoder's or a decoder's."""
  path = str(path)
  if not epath.Path(path).exists():
    raise UsageError(f'{path}: no such file or directory')
  if quantize not in (None, 'none', 'int8'):
    raise UsageError(f'quantize={quantize!r}: expected None or "int8"')

  overrides['dtype'] = dtype or default_dtype()
  if not hf_causal.is_causal_dir(path):
    # One compiled layer, looped: each new input shape compiles in about a third of the unrolled stack's
    # time, and without training's saved activations the loop runs as fast (tools/bench.py predict-e2e).
    overrides.setdefault('scan_layers', True)
  with store.quiet_absl():  # Orbax's warnings about its own metadata are no concern of the caller's.
    graphdef, params, tok_dir, labels = store.load_model(path, **overrides)
  if quantize == 'int8':
    graphdef, params = quant.quantize(graphdef, params)
  if models.family(nnx.merge(graphdef, params).cfg) == 'decoder':
    return generate.Generator(graphdef, params, tokenizer_lib.load(tok_dir), batch_size)
  return Predictor(graphdef, params, tokenizer_lib.load(tok_dir), labels, batch_size)
