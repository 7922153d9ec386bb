"""The C-RLFT objective: class-weighted next-token cross-entropy.

    loss = sum_t w_t * CE_t / sum_t w_t

summed over every supervised token of the whole optimizer step (all devices, all micro-batches).
This module computes the *sums* for one (micro-)batch; the step adds them up over micro-batches
and divides once, so accumulating gradients never changes the objective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]

# Keys of a batch the train step reads; every array is [B, L].
BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions", "class_ids")


def token_weights(weights_BxL: jax.Array, weighted: bool) -> jax.Array:
    """The weights the loss uses. `weighted=False` (paper's ablation) keeps which tokens are
    supervised (weight > 0) but gives each of them weight 1.0."""
    if weighted:
        return weights_BxL.astype(jnp.float32)
    return (weights_BxL > 0).astype(jnp.float32)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token -log softmax(logits)[target], in float32 (log-sum-exp minus the target logit,
    so the [B, L, V] log-probabilities are never materialised a second time)."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse_BxL - target_logit_BxL


def loss_sums(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    w_BxL: jax.Array,
    class_ids_BxL: jax.Array,
    num_classes: int,
) -> Sums:
    """Sums over one batch: weighted CE, weights, and per class (index c) the weighted CE,
    weight, supervised-token count and correct top-1 predictions. `w_BxL` is already the loss
    weight (see `token_weights`); a token is supervised iff its weight is > 0. class id -1 (pad)
    falls in no class."""
    ce_BxL = cross_entropy(logits_BxLxV, targets_BxL)
    supervised_BxL = (w_BxL > 0).astype(jnp.float32)
    # Masked: a pad token may hold any target (even one outside the vocabulary); never let its CE
    # (possibly inf) leak into a sum as 0 * inf = nan.
    wce_BxL = jnp.where(w_BxL > 0, w_BxL * ce_BxL, 0.0)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32) * supervised_BxL
    onehot_BxLxC = jax.nn.one_hot(class_ids_BxL, num_classes, dtype=jnp.float32)
    per_class = lambda x_BxL: jnp.einsum("bl,blc->c", x_BxL, onehot_BxLxC, precision="highest")  # noqa: E731
    return {
        "wce": wce_BxL.sum(),
        "weight": w_BxL.sum(),
        "class_wce": per_class(wce_BxL),
        "class_weight": per_class(w_BxL),
        "class_tokens": per_class(supervised_BxL),
        "class_correct": per_class(correct_BxL),
        "tokens": supervised_BxL.sum(),
        "correct": correct_BxL.sum(),
    }


def zero_sums(num_classes: int) -> Sums:
    scalar = jnp.zeros((), jnp.float32)
    vec = jnp.zeros((num_classes,), jnp.float32)
    return {
        "wce": scalar, "weight": scalar, "class_wce": vec, "class_weight": vec,
        "class_tokens": vec, "class_correct": vec, "tokens": scalar, "correct": scalar,
    }


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def sums_to_metrics(sums: Sums) -> dict[str, Any]:
    """loss = wce / weight (nan when no token carries weight: never silently 0), token accuracy,
    and per-class weighted loss / accuracy / supervised-token count (0 for a class absent from
    the step)."""
    return {
        "loss": sums["wce"] / sums["weight"],
        "weight_sum": sums["weight"],
        "supervised_tokens": sums["tokens"],
        "accuracy": _safe_div(sums["correct"], sums["tokens"]),
        "class_loss": _safe_div(sums["class_wce"], sums["class_weight"]),
        "class_accuracy": _safe_div(sums["class_correct"], sums["class_tokens"]),
        "class_tokens": sums["class_tokens"],
    }
