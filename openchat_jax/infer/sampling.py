"""Next-token choice from logits: greedy, temperature, top-k, top-p. Pure JAX; randomness only
from the PRNG key passed in (no global RNG state).

Order of operations follows transformers' logits processors: divide by the temperature, keep the
top-k, then keep the top-p nucleus, then sample. Both masks keep ties with the last kept value
(they threshold on the logit value), so they may keep a few more tokens than asked, never fewer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from openchat_jax.errors import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (top_k/top_p then do nothing); top_k 0 and top_p 1.0 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def greedy(logits_BxV: jax.Array) -> jax.Array:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)


def top_k_mask(logits_BxV: jax.Array, k: int) -> jax.Array:
    """Logits below the k-th largest of their row become -inf (k must be a Python int)."""
    if k <= 0 or k >= logits_BxV.shape[-1]:
        return logits_BxV
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
    return jnp.where(logits_BxV < kth_Bx1, NEG_INF, logits_BxV)


def top_p_mask(logits_BxV: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one
    token); the rest become -inf."""
    if p >= 1.0:
        return logits_BxV
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV.astype(jnp.float32), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < p  # the first token always has 0 mass before it
    # The smallest kept logit is the threshold (kept entries form a prefix of the sorted row).
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_Bx1, NEG_INF, logits_BxV)


def processed_logits(logits_BxV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """The logits sampling draws from: temperature-scaled, then top-k, then top-p masked."""
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    logits_BxV = top_k_mask(logits_BxV, sampling.top_k)
    return top_p_mask(logits_BxV, sampling.top_p)


def sample(logits_BxV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row, int32 [B]. `sampling` is static (a hashable dataclass)."""
    if sampling.greedy:
        return greedy(logits_BxV)
    return jax.random.categorical(key, processed_logits(logits_BxV, sampling), axis=-1).astype(jnp.int32)
