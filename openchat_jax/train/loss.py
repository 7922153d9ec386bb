"""The C-RLFT objective: class-weighted next-token cross-entropy.

    loss = sum_t w_t * CE_t / sum_t w_t

summed over every supervised token of the whole optimizer step (all devices, all micro-batches).
This module computes the *sums* for one (micro-)batch; the step adds them up over micro-batches
and divides once, so accumulating gradients never changes the objective.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from openchat_jax.model.llama import lm_head

Sums = dict[str, jax.Array]

# Keys of a batch the train step reads; every array is [B, L].
BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions", "class_ids")


def token_weights(weights_BxL: jax.Array, weighted: bool) -> jax.Array:
    """The weights the loss uses. `weighted=False` (paper's ablation) keeps which tokens are
    supervised (weight > 0) but gives each of them weight 1.0."""
    if weighted:
        return weights_BxL.astype(jnp.float32)
    return (weights_BxL > 0).astype(jnp.float32)


def _logit_stats(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, ...]:
    """(row max, exp(logits - max), its row sum, target logit), all float32: what the CE, the
    top-1 test and the softmax share."""
    logits = logits_BxLxV.astype(jnp.float32)
    max_BxL = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    exp_BxLxV = jnp.exp(logits - max_BxL[..., None])
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return max_BxL, exp_BxLxV, jnp.sum(exp_BxLxV, axis=-1), target_logit_BxL


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token -log softmax(logits)[target] in float32, and whether the target is a top-1
    prediction. One max over the vocabulary serves both the log-sum-exp and the top-1 test (an
    argmax would be another, slower, pass over the [B, L, V] logits); a target tied for the
    maximum counts as correct."""
    max_BxL, _, sum_BxL, target_logit_BxL = _logit_stats(logits_BxLxV, targets_BxL)
    return max_BxL + jnp.log(sum_BxL) - target_logit_BxL, target_logit_BxL >= max_BxL


def _sums(ce_BxL: jax.Array, top1_BxL: jax.Array, w_BxL: jax.Array, class_ids_BxL: jax.Array,
          num_classes: int) -> Sums:
    supervised_BxL = (w_BxL > 0).astype(jnp.float32)
    # Masked: a pad token may hold any target (even one outside the vocabulary); never let its CE
    # (possibly inf) leak into a sum as 0 * inf = nan.
    wce_BxL = jnp.where(w_BxL > 0, w_BxL * ce_BxL, 0.0)
    correct_BxL = top1_BxL.astype(jnp.float32) * supervised_BxL
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
    ce_BxL, top1_BxL = cross_entropy(logits_BxLxV, targets_BxL)
    return _sums(ce_BxL, top1_BxL, w_BxL, class_ids_BxL, num_classes)


def head_loss_sums(
    x_BxLxE: jax.Array,
    lm_head_ExV: jax.Array,
    targets_BxL: jax.Array,
    w_BxL: jax.Array,
    class_ids_BxL: jax.Array,
    num_classes: int,
    chunk_length: int = 0,
) -> Sums:
    """`loss_sums(lm_head(x, W), ...)` for training, with the LM head fused into the loss.

    The loss is linear in the per-token CE with known coefficients (the weights), so the gradient
    with respect to the logits, w_t * (softmax_t - onehot_t), is computed in the forward pass and
    contracted at once into dx and dW: the [B, L, V] logits, probabilities and their gradient live
    only inside one pass over `chunk_length` positions at a time (0 = the whole row), are never
    kept for the backward, and need no layout transposes there. Gradients flow only through
    sums["wce"]; every other sum (per class CE included) is a metric with zero gradient.
    """
    wce, ce_BxL, top1_BxL = _fused_head_ce(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length)
    sums = _sums(jax.lax.stop_gradient(ce_BxL), top1_BxL, w_BxL, class_ids_BxL, num_classes)
    sums["wce"] = wce
    return sums


def _head_chunk(x_BxCxE: jax.Array, lm_head_ExV: jax.Array, targets_BxC: jax.Array, w_BxC: jax.Array, grads: bool):
    """One chunk of positions: (sum w*CE, CE, top-1, d(sum w*CE)/dx, d(sum w*CE)/dW); the two
    gradients are None unless `grads`."""
    logits_BxCxV = lm_head(x_BxCxE, lm_head_ExV)
    max_BxC, exp_BxCxV, sum_BxC, target_logit_BxC = _logit_stats(logits_BxCxV, targets_BxC)
    ce_BxC = max_BxC + jnp.log(sum_BxC) - target_logit_BxC
    coef_BxC = jnp.where(w_BxC > 0, w_BxC, 0.0).astype(jnp.float32)
    wce = jnp.sum(jnp.where(w_BxC > 0, coef_BxC * ce_BxC, 0.0))
    top1_BxC = target_logit_BxC >= max_BxC
    if not grads:
        return wce, ce_BxC, top1_BxC, None, None
    onehot_BxCxV = jax.nn.one_hot(targets_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)
    dlogits_BxCxV = ((exp_BxCxV / sum_BxC[..., None] - onehot_BxCxV) * coef_BxC[..., None]).astype(x_BxCxE.dtype)
    dx_BxCxE = jnp.einsum("bcv,ev->bce", dlogits_BxCxV, lm_head_ExV, preferred_element_type=jnp.float32)
    dw_ExV = jnp.einsum("bce,bcv->ev", x_BxCxE, dlogits_BxCxV, preferred_element_type=jnp.float32)
    return wce, ce_BxC, top1_BxC, dx_BxCxE.astype(x_BxCxE.dtype), dw_ExV


def _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length: int, grads: bool):
    B, L, E = x_BxLxE.shape
    if chunk_length <= 0 or chunk_length >= L:
        wce, ce, top1, dx, dw = _head_chunk(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, grads)
    else:
        if L % chunk_length:
            raise ValueError(f"loss chunk length {chunk_length} does not divide the sequence length {L}")
        n = L // chunk_length
        chunks = lambda a: jnp.moveaxis(a.reshape(B, n, chunk_length, *a.shape[2:]), 1, 0)  # noqa: E731
        unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, L, *a.shape[3:])  # noqa: E731

        def body(dw_acc, xs):
            wce_c, ce_c, top1_c, dx_c, dw_c = _head_chunk(xs[0], lm_head_ExV, xs[1], xs[2], grads)
            return (dw_acc + dw_c if grads else None), (wce_c, ce_c, top1_c, dx_c)

        dw0 = jnp.zeros(lm_head_ExV.shape, jnp.float32) if grads else None
        dw, (wce, ce, top1, dx) = jax.lax.scan(body, dw0, (chunks(x_BxLxE), chunks(targets_BxL), chunks(w_BxL)))
        wce, ce, top1 = wce.sum(), unchunk(ce), unchunk(top1)
        dx = unchunk(dx) if grads else None
    if not grads:
        return (wce, ce, top1), None
    return (wce, ce, top1), (dx, dw.astype(lm_head_ExV.dtype))


def _fused_head_ce_fwd(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length):
    return _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, grads=True)


def _fused_head_ce_bwd(chunk_length, residuals, cotangents):
    del chunk_length
    dx, dw = residuals
    g_wce = cotangents[0]  # ce and top1 are stop-gradient'ed by head_loss_sums
    return (g_wce * dx).astype(dx.dtype), (g_wce * dw).astype(dw.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_head_ce(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length):
    return _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, grads=False)[0]


_fused_head_ce.defvjp(_fused_head_ce_fwd, _fused_head_ce_bwd)


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
