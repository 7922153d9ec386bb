"""AdamW with global-norm clipping and the paper's schedule (linear warmup, cosine to 10% of peak).

Schedule, with n = the number of the update being applied (1 for the first, T for the last),
W = warmup steps and T = total steps:
    lr(n) = peak * n / W                                                  for n <= W
    lr(n) = end + (peak - end) * (1 + cos(pi * (n - W) / (T - W))) / 2    for n >  W
with end = end_lr_ratio * peak. So the first update already moves (peak / W), update W runs at
the peak and update T at exactly `end`. optax calls the schedule with `count` = updates already
applied, i.e. n = count + 1. A step skipped as non-finite does not advance `count`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from openchat_jax.errors import ConfigError

# The paper's rule (OpenChat, following the Llama-2 recipe): 3e-4 at 4M tokens per step, scaled
# with the square root of the batch size in tokens.
AUTO_LR_BASE = 3e-4
AUTO_LR_TOKENS = 4e6

Schedule = Callable[[jax.Array], jax.Array]


def peak_learning_rate(lr: Any, tokens_per_step: int) -> float:
    """`lr` is "auto" (3e-4 * sqrt(tokens_per_step / 4e6)) or a positive number (or its text)."""
    if isinstance(lr, str) and lr.strip().lower() == "auto":
        if tokens_per_step <= 0:
            raise ConfigError(f"train.lr='auto' needs tokens per step > 0, got {tokens_per_step}")
        return AUTO_LR_BASE * math.sqrt(tokens_per_step / AUTO_LR_TOKENS)
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ConfigError(f"train.lr={lr!r}: expected 'auto' or a number") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"train.lr={lr!r} must be a finite number > 0")
    return value


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(round(total_steps * warmup_ratio))


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float = 0.05, end_lr_ratio: float = 0.1) -> Schedule:
    if total_steps <= 0:
        raise ConfigError(f"the run has {total_steps} steps; need at least 1")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"train.warmup_ratio={warmup_ratio} must be in [0, 1]")
    if not 0.0 <= end_lr_ratio <= 1.0:
        raise ConfigError(f"train.end_lr_ratio={end_lr_ratio} must be in [0, 1]")
    W = warmup_steps(total_steps, warmup_ratio)
    T = total_steps
    end = peak * end_lr_ratio

    def schedule(count: jax.Array) -> jax.Array:
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * n / max(W, 1)
        progress = jnp.clip((n - W) / max(T - W, 1), 0.0, 1.0)
        decay = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(n <= W, warm, decay)

    return schedule


def _is_norm(path: tuple) -> bool:
    return any("norm" in str(getattr(k, "key", k)) for k in path)


def _is_embedding(path: tuple) -> bool:
    return any(str(getattr(k, "key", k)) in ("embed", "lm_head") for k in path)


def decay_mask(params: Any, *, decay_norms: bool, decay_embeddings: bool) -> Any:
    """True where weight decay applies. Norm scales are leaves whose path has 'norm' in a key;
    embeddings are `embed` and `lm_head`."""

    def decide(path: tuple, _: Any) -> bool:
        if not decay_norms and _is_norm(path):
            return False
        if not decay_embeddings and _is_embedding(path):
            return False
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(train_cfg: Any, total_steps: int, tokens_per_step: int):
    """-> (optax transformation, schedule, peak lr). `train_cfg`: the `train` section (a
    TrainConfig, checked when the config was resolved)."""
    peak = peak_learning_rate(train_cfg.lr, tokens_per_step)
    schedule = lr_schedule(peak, total_steps, train_cfg.warmup_ratio, train_cfg.end_lr_ratio)
    mask = None
    if not (train_cfg.decay_norms and train_cfg.decay_embeddings):
        mask = lambda p: decay_mask(  # noqa: E731
            p, decay_norms=train_cfg.decay_norms, decay_embeddings=train_cfg.decay_embeddings
        )
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(
            schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay, mask=mask,
        ),
    )
    return tx, schedule, peak


def schedule_count(opt_state: Any) -> jax.Array:
    """Updates applied so far (the count the schedule sees), read from the adamw state."""
    counts = [
        s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if not counts:
        raise ValueError("optimizer state holds no schedule count")
    return counts[0]
