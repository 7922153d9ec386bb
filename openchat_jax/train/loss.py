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
from openchat_jax.model.partitioning import constrain, shard_count

Sums = dict[str, jax.Array]


LOSS_NORMALIZATIONS = ("token", "message")


def token_weights(weights_BxL: jax.Array, weighted: bool, normalization: str = "token") -> jax.Array:
    """The weights the loss uses. `weighted=False` (paper's ablation) keeps which tokens are
    supervised (weight > 0) but gives each of them weight 1.0. `normalization="message"` then
    divides each message's weights by its token count (`message_mean_weights`)."""
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss normalization {normalization!r} is not one of {LOSS_NORMALIZATIONS}")
    w_BxL = weights_BxL.astype(jnp.float32) if weighted else (weights_BxL > 0).astype(jnp.float32)
    return message_mean_weights(w_BxL) if normalization == "message" else w_BxL


def message_mean_weights(w_BxL: jax.Array) -> jax.Array:
    """Each message's token weights divided by the message's token count: the loss becomes
    sum_m w_m * mean_{t in m} CE_t / sum_m w_m, a per-message mean.

    This is OpenChat's `--per-sequence-loss` (ochat/data/generate_dataset.py passes it to
    ochat/config/conversation_template.py, which sets `w /= len(text) + len(self.eot_tokens_)` for
    every token of a message's text and its <|end_of_turn|>; ochat/training_deepspeed/train.py
    divides the step's sum(w * CE) by the step's sum of those weights, `all_numseq`). A message
    is a maximal run of weight > 0 positions within a row: the template puts a role prefix of
    weight 0 before every message and a segment's last position has weight 0, so the supervised
    targets of two messages never touch (data/template.py), and a run holds exactly a message's
    text tokens and its <|end_of_turn|>. One difference: a message cut by `data.max_length` is
    averaged over the tokens it keeps, where the reference divides by its uncut length.
    """
    L = w_BxL.shape[-1]
    on_BxL = w_BxL > 0
    pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), w_BxL.shape)
    prev_on = jnp.pad(on_BxL[:, :-1], ((0, 0), (1, 0)))
    next_on = jnp.pad(on_BxL[:, 1:], ((0, 0), (0, 1)))
    start_BxL = jax.lax.cummax(jnp.where(on_BxL & ~prev_on, pos_BxL, -1), axis=1)
    end_BxL = jax.lax.cummin(jnp.where(on_BxL & ~next_on, pos_BxL, L), axis=1, reverse=True)
    count_BxL = (end_BxL - start_BxL + 1).astype(jnp.float32)
    return jnp.where(on_BxL, w_BxL / jnp.where(on_BxL, count_BxL, 1.0), 0.0)


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
    sums = _sums(ce_BxL, top1_BxL, w_BxL, class_ids_BxL, num_classes)
    sums["lm_head_tokens"] = jnp.asarray(targets_BxL.size, jnp.float32)
    return sums


def head_loss_sums(
    x_BxLxE: jax.Array,
    lm_head_ExV: jax.Array,
    targets_BxL: jax.Array,
    w_BxL: jax.Array,
    class_ids_BxL: jax.Array,
    num_classes: int,
    chunk_length: int = 0,
    skip_unsupervised: bool = True,
) -> Sums:
    """`loss_sums(lm_head(x, W), ...)` for training, with the LM head fused into the loss.

    The loss is linear in the per-token CE with known coefficients (the weights), so the gradient
    with respect to the logits, w_t * (softmax_t - onehot_t), is computed in the forward pass and
    contracted at once into dx and dW: the [B, L, V] logits, probabilities and their gradient live
    only inside one pass over `chunk_length` positions at a time (0 = the whole row), are never
    kept for the backward, and need no layout transposes there. Gradients flow only through
    sums["wce"]; every other sum (per class CE included) is a metric with zero gradient.

    `skip_unsupervised` (with chunks): tokens of weight 0 (prompts, padding) add nothing to the
    loss or its gradient, so their logits are not computed. The tokens each batch shard holds are
    put supervised-first (a stable, shard-local permutation; the batch sharding is kept) and the
    chunks past the last supervised token are never run. Results are the same either way; see
    `_fused_head_ce_impl`. sums["lm_head_tokens"] counts the positions whose logits were computed.
    """
    wce, ce_BxL, top1_BxL, computed = _fused_head_ce(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, skip_unsupervised)
    sums = _sums(jax.lax.stop_gradient(ce_BxL), top1_BxL, w_BxL, class_ids_BxL, num_classes)
    sums["wce"] = wce
    sums["lm_head_tokens"] = computed
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


def _chunked_head(x_NxRxCxE, lm_head_ExV, targets_NxRxC, w_NxRxC, num_chunks: jax.Array | int, grads: bool):
    """`_head_chunk` on chunks [i] for i < num_chunks (traced: a dynamic trip count) of chunk-major
    inputs (each chunk contiguous); outputs of chunks not run stay 0 (CE, dx) / False (top-1)."""
    at = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
    put = lambda buf, a, i: jax.lax.dynamic_update_index_in_dim(buf, a, i, axis=0)  # noqa: E731

    def body(i, carry):
        wce, ce, top1, dx, dw = carry
        wce_c, ce_c, top1_c, dx_c, dw_c = _head_chunk(at(x_NxRxCxE, i), lm_head_ExV, at(targets_NxRxC, i), at(w_NxRxC, i), grads)
        if grads:
            dx, dw = put(dx, dx_c, i), dw + dw_c
        return wce + wce_c, put(ce, ce_c, i), put(top1, top1_c, i), dx, dw

    init = (
        jnp.zeros((), jnp.float32), jnp.zeros(w_NxRxC.shape, jnp.float32), jnp.zeros(w_NxRxC.shape, bool),
        jnp.zeros_like(x_NxRxCxE) if grads else None, jnp.zeros(lm_head_ExV.shape, jnp.float32) if grads else None,
    )
    return jax.lax.fori_loop(0, num_chunks, body, init)


def _supervised_first(w_GxN: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A stable permutation of each row putting tokens of weight > 0 first, its inverse, and the
    most supervised tokens in any row."""
    supervised_GxN = w_GxN > 0
    order_GxN = jnp.argsort(~supervised_GxN, axis=1, stable=True)
    return order_GxN, jnp.argsort(order_GxN, axis=1), supervised_GxN.sum(axis=1).max()


def _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length: int, skip: bool, grads: bool):
    B, L, E = x_BxLxE.shape
    if chunk_length <= 0 or chunk_length >= L:
        wce, ce, top1, dx, dw = _head_chunk(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, grads)
        out = (wce, ce, top1, jnp.asarray(B * L, jnp.float32))
        return (out, (dx, dw.astype(lm_head_ExV.dtype))) if grads else (out, None)
    if L % chunk_length:
        raise ValueError(f"loss chunk length {chunk_length} does not divide the sequence length {L}")
    n = L // chunk_length
    # The rows are walked in groups of B/G rows flattened into N tokens, n chunks of B/G rows x
    # chunk_length positions each. Without skipping, every row is a group and keeps its order.
    # Skipping: one group per batch shard (G = 1 on one device), reordered supervised-first, and
    # only the first ceil(most supervised tokens in a group / chunk size) chunks run.
    G = shard_count("batch", B) if skip else B
    N = B // G * L
    size = N // n

    def group(a):  # [B, L, ...] -> [G, N, ...], sharded like the batch
        return constrain(a.reshape(G, N, *a.shape[2:]), ("batch", "length", "embed")[: a.ndim])

    if skip:
        order, inverse, most = _supervised_first(group(w_BxL))
        run = (most + size - 1) // size
    else:
        order = inverse = None
        run = n

    def take(a, idx):
        return a if idx is None else jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    def chunks(a):  # [B, L, ...] -> chunk-major [n, G, size, ...]
        return jnp.moveaxis(take(group(a), order).reshape(G, n, size, *a.shape[2:]), 1, 0)

    def unchunk(a):  # chunk-major [n, G, size, ...] -> [B, L, ...] in the original order
        return take(jnp.moveaxis(a, 0, 1).reshape(G, N, *a.shape[3:]), inverse).reshape(B, L, *a.shape[3:])

    wce, ce, top1, dx, dw = _chunked_head(chunks(x_BxLxE), lm_head_ExV, chunks(targets_BxL), chunks(w_BxL), run, grads)
    out = (wce, unchunk(ce), unchunk(top1), jnp.asarray(run * size * G, jnp.float32))
    return (out, (unchunk(dx), dw.astype(lm_head_ExV.dtype))) if grads else (out, None)


def _fused_head_ce_fwd(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, skip):
    return _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, skip, grads=True)


def _fused_head_ce_bwd(chunk_length, skip, residuals, cotangents):
    del chunk_length, skip
    dx, dw = residuals
    g_wce = cotangents[0]  # ce, top1 and the count are stop-gradient'ed / integral
    return (g_wce * dx).astype(dx.dtype), (g_wce * dw).astype(dw.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_head_ce(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, skip):
    return _fused_head_ce_impl(x_BxLxE, lm_head_ExV, targets_BxL, w_BxL, chunk_length, skip, grads=False)[0]


_fused_head_ce.defvjp(_fused_head_ce_fwd, _fused_head_ce_bwd)


def zero_sums(num_classes: int) -> Sums:
    scalar = jnp.zeros((), jnp.float32)
    vec = jnp.zeros((num_classes,), jnp.float32)
    return {
        "wce": scalar, "weight": scalar, "class_wce": vec, "class_weight": vec,
        "class_tokens": vec, "class_correct": vec, "tokens": scalar, "correct": scalar, "lm_head_tokens": scalar,
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
        # Positions whose logits were computed (< all tokens when the fused loss skips unsupervised ones).
        "lm_head_tokens": sums["lm_head_tokens"],
    }
