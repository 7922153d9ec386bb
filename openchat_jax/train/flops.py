"""Model FLOPs per token and MFU.

Training FLOPs per token (forward + backward = 3x forward, each multiply-add = 2 FLOPs):

    6 * N  +  12 * num_layers * L * num_heads * head_dim

N counts the weights that take part in matmuls: per layer q, k, v, o (embed * head_dim *
(2 * num_heads + 2 * num_kv_heads)) and the SwiGLU MLP (3 * embed * mlp), plus the LM head
(embed * vocab). The input embedding is a lookup and the norms are elementwise, so neither counts.
The attention term is QK^T and AV (2 matmuls * 2 FLOPs * L * heads * head_dim per token per layer
forward, x3 for the backward) over the whole row of length L, as in PaLM (Chowdhery et al. 2022,
appendix B): the causal mask and packing boundaries are not discounted, and rematerialisation is
not counted (this is *model* FLOPs utilisation).
MFU = tokens/s * flops_per_token / (peak FLOP/s per device * devices).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from openchat_jax.model.config import LlamaConfig

# Dense bf16 peak FLOP/s per device by jax `device_kind` substring, the first match wins (vendor
# pages, checked 2025: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; NVIDIA's H100/H200 SXM5
# datasheets give 989 TFLOP/s dense bf16, 1979 with 2:4 sparsity; A100 312). `plan`'s chips read it.
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def matmul_params(cfg: LlamaConfig) -> int:
    per_layer = cfg.embed * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * cfg.embed * cfg.mlp
    return cfg.num_layers * per_layer + cfg.embed * cfg.vocab_size


def lm_head_flops_per_token(cfg: LlamaConfig) -> float:
    """The LM head's share of `flops_per_token` (a loss that skips unsupervised tokens' logits
    does not execute it for them)."""
    return 6.0 * cfg.embed * cfg.vocab_size


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def mfu(tokens_per_second: float, cfg: LlamaConfig, seq_len: int, peak_flops_total: float) -> float:
    return tokens_per_second * flops_per_token(cfg, seq_len) / peak_flops_total


def peak_flops_from_device_kind(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for key, value in PEAK_FLOPS_BY_KIND.items():
        if key.lower() in kind.lower():
            return value
    return None


def measure_matmul_peak(
    dtype: str = "float32", n: int = 2048, repeats: int = 5, device: jax.Device | None = None
) -> float:
    """Best FLOP/s of an n x n x n matmul on one device (on CPU: what XLA's dot reaches on all the
    cores that device uses), each timed call chaining 4 matmuls to amortise dispatch."""
    device = jax.devices()[0] if device is None else device
    a = jax.device_put(jnp.ones((n, n), dtype) / n, device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)

    @jax.jit
    def chain(x, y):
        for _ in range(4):
            # Accumulated in float32 as the model's matmuls are (in bf16 this is the fast path:
            # AMX on recent Intel CPUs; a bf16-output dot takes a slower one).
            x = jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype)
        return x

    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4 * 2.0 * n**3 / best
