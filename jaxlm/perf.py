"""Model FLOPs and chip peaks, for tokens/s -> TFLOP/s -> MFU in the logs and the benchmark."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxlm.decoder import DecoderConfig
from jaxlm.model import ADAPTER_PLACEMENTS, ModelConfig

# Dense bf16 peak TFLOP/s per chip, by jax device_kind prefix (vendors' published figures).
PEAK_TFLOPS = {
  'TPU v2': 45.0, 'TPU v3': 123.0, 'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0,
  'TPU v5p': 459.0, 'TPU v5': 459.0, 'TPU v6 lite': 918.0, 'TPU v6e': 918.0, 'TPU7x': 2307.0,
  'NVIDIA H200': 989.0, 'NVIDIA H100': 989.0, 'NVIDIA A100': 312.0, 'NVIDIA L4': 121.0,
}  # fmt: skip


def train_flops_per_step(cfg: ModelConfig | DecoderConfig, batch: int, seq_len: int, max_predictions: int) -> float:
  """Training FLOPs of one step (3x forward): encoder matmuls (bottleneck adapters included), attention, MLM head
  at the masked positions; for a decoder 6 x (matmul parameters) per token, attention, and the LM head at
  `max_predictions` positions."""
  D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  if isinstance(cfg, DecoderConfig):
    N, G, K = cfg.num_heads, cfg.kv_heads, cfg.head_size
    layer_params = D * (N + 2 * G) * K + N * K * D + (3 if cfg.family == 'llama' else 2) * D * F
    # The scores and the weighted values over all T x T pairs, as computed (the causal mask halves neither).
    per_token = L * (2 * layer_params + 2 * 2 * seq_len * N * K)
    return 3.0 * (batch * seq_len * per_token + batch * max_predictions * 2 * D * V)
  adapters = 2 * D * cfg.adapter_size * len(ADAPTER_PLACEMENTS[cfg.adapter_placement]) if cfg.adapter_size else 0
  per_token = L * (2 * (4 * D * D + 2 * D * F + adapters) + 2 * 2 * seq_len * D)
  per_prediction = 2 * (D * D + D * V) if cfg.mlm_head else 0
  return 3.0 * (batch * seq_len * per_token + batch * max_predictions * per_prediction)


def measured_matmul_tflops(n: int = 2048, reps: int = 4) -> float:
  """TFLOP/s of a dense float32 n x n matmul on the default device (the CPU's practical peak)."""
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    r = mm(a)
  r.block_until_ready()
  return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e12


@functools.cache  # Measured once per process: a second run in the same process (a notebook, a sweep) reuses it.
def peak_tflops() -> tuple[float, str]:
  """(peak TFLOP/s of all devices, what it is): published bf16 peak, or a measured matmul on CPU."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return measured_matmul_tflops(), 'measured f32 matmul'
  per_chip = next((v for k, v in PEAK_TFLOPS.items() if dev.device_kind.startswith(k)), float('nan'))
  return per_chip * jax.device_count(), f'{dev.device_kind} bf16 peak x{jax.device_count()}'
