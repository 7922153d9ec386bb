"""Attention backends behind one signature.

attend(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset,
       sliding_window=0) -> out_BxLxHxD

Query i sits at slot `q_offset + i` of the key/value sequence (0 in training; the cache index when
decoding). It sees key j iff j <= q_offset + i and both carry the same segment id, so attention is
causal and never crosses packed conversations; with sliding_window = W > 0 (Mistral) also only if
j > q_offset + i - W. A packed conversation's slots are consecutive, as are a cached prompt's and
its answer's, so the slot distance is the position distance transformers windows on. Heads are
grouped: H = K * G (GQA).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

AttendFn = Callable[..., jax.Array]


# The mask travels as what it is made of, (q_segment_ids_BxL, kv_segment_ids_BxS, q_slot_L), and each
# query block builds its own [B, 1, 1, T, S'] slice: a whole [B, L, S] mask is 264 MB for 16
# prompts of 4k tokens, and the backward would keep it as a residual.
Mask = tuple[jax.Array, jax.Array, jax.Array]
BlockHook = Callable[[jax.Array, jax.Array], jax.Array]


def _block_mask(mask: Mask, start: int, end: int, key_end: int, window: int) -> jax.Array:
    """[B, 1, 1, end - start, key_end]: key j visible to query i (causal at its slot, within the
    sliding window when window > 0, same segment)."""
    q_segment_ids_BxL, kv_segment_ids_BxS, q_slot_L = mask
    key_slot_S = jnp.arange(key_end)[None, :]
    causal_TxS = key_slot_S <= q_slot_L[start:end, None]
    if window:
        causal_TxS &= key_slot_S > q_slot_L[start:end, None] - window
    same_segment_BxTxS = q_segment_ids_BxL[:, start:end, None] == kv_segment_ids_BxS[:, None, :key_end]
    return (causal_TxS[None] & same_segment_BxTxS)[:, None, None]


# Training-shaped calls attend in at most CAUSAL_BLOCKS query blocks of at least CAUSAL_BLOCK
# positions; a prefill (queries from slot 0 into a longer cache) in blocks of PREFILL_BLOCK
# (see `_causal_blocks`).
CAUSAL_BLOCK = 128
CAUSAL_BLOCKS = 4
PREFILL_BLOCK = 256


def _causal_blocks(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask: Mask, q_offset, window: int,
                   between_blocks: BlockHook | None = None) -> jax.Array:
    """Attention in query blocks, each against the keys up to its last position (the later keys are
    masked anyway, so the scores, softmax and their gradients skip them: 10 of 16 score blocks with
    4 blocks).
    - A causal training call (q_offset 0, L == S): at most CAUSAL_BLOCKS blocks. Few blocks: the
      key/value gradient accumulates over all of them, and with 32 blocks at L = 4096 the planner's
      13B peak grew by 1.3 GiB.
    - A prefill (q_offset a Python int, L < S: a prompt written into a cache with room for the
      answer): blocks of PREFILL_BLOCK queries. No gradient is taken there, and one block over all
      keys would hold [B, H, L, S] float32 scores (4.2 GB for 16 prompts of 4k tokens and 4 heads).
    - Anything else (a decode step, a traced cache index, short rows) is one block over all keys."""
    L, S = q_BxLxKxGxD.shape[1], k_BxSxKxD.shape[1]
    static_offset = isinstance(q_offset, int)
    if static_offset and q_offset == 0 and L == S:
        T = max(CAUSAL_BLOCK, -(-L // CAUSAL_BLOCKS))
    elif static_offset and L < S:
        T = PREFILL_BLOCK
    else:
        T = L
    key_offset = q_offset if static_offset else S  # with a traced offset, every block sees all keys
    return _attend(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask, T, key_offset, window, between_blocks)


# Softmax attention in query blocks of T positions (the last one may be shorter), query i at key
# slot key_offset + i, so the block ending at query `end` sees the keys [0, key_offset + end)
# (capped at S), with a hand-written backward. It works head-major
# ([B, K, G, L, D] queries, [B, K, S, D] keys and values): q, k, v and the output are transposed
# once per call, every block is a contiguous slice along the length axis, and the key/value
# gradients accumulate in place into one buffer. In the model's [B, L, K, G, D] layout each
# block's slices and sums cost a transpose and a pad per block.
def _blocks(L: int, S: int, T: int, key_offset: int) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) of each block."""
    return [(start, min(start + T, L), min(S, key_offset + min(start + T, L))) for start in range(0, L, T)]


def _attend_fwd(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask: Mask, T: int, key_offset: int, window: int,
                between_blocks: BlockHook | None = None):
    L, S, D = q_BxLxKxGxD.shape[1], k_BxSxKxD.shape[1], q_BxLxKxGxD.shape[-1]
    q_BxKxGxLxD = jnp.transpose(q_BxLxKxGxD, (0, 2, 3, 1, 4))
    k_BxKxSxD = jnp.transpose(k_BxSxKxD, (0, 2, 1, 3))
    v_BxKxSxD = jnp.transpose(v_BxSxKxD, (0, 2, 1, 3))
    outs, lses = [], []
    for start, end, key_end in _blocks(L, S, T, key_offset):
        q_blk = q_BxKxGxLxD[:, :, :, start:end]
        if between_blocks is not None and L < S and outs:  # a prefill (no gradient)
            q_blk = between_blocks(q_blk, outs[-1])
        probs, lse = _block_probs(q_blk, k_BxKxSxD[:, :, :key_end], _block_mask(mask, start, end, key_end, window), D)
        outs.append(jnp.einsum("bkgls,bksd->bkgld", probs.astype(v_BxSxKxD.dtype), v_BxKxSxD[:, :, :key_end],
                               preferred_element_type=jnp.float32).astype(v_BxSxKxD.dtype))
        lses.append(lse)
    out_BxKxGxLxD = jnp.concatenate(outs, axis=3)
    # Saved: the inputs and the row log-sum-exp, not the [B, K, G, L, S] probabilities (which a
    # layer scan would otherwise stack for every layer); the backward recomputes them.
    residuals = (q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, mask, out_BxKxGxLxD, jnp.concatenate(lses, axis=3))
    return jnp.transpose(out_BxKxGxLxD, (0, 3, 1, 2, 4)), residuals


def _block_probs(q_BxKxGxTxD, k_BxKxSxD, mask_Bx1x1xTxS, D: int, lse_BxKxGxT=None):
    """Softmax probabilities of one query block (f32) and, when not given, their row log-sum-exp."""
    scores = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxTxD, k_BxKxSxD, preferred_element_type=jnp.float32) * (D**-0.5)
    scores = jnp.where(mask_Bx1x1xTxS, scores, jnp.finfo(jnp.float32).min)
    if lse_BxKxGxT is None:
        max_ = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
        lse_BxKxGxT = max_ + jnp.log(jnp.sum(jnp.exp(scores - max_[..., None]), axis=-1))
    return jnp.exp(scores - lse_BxKxGxT[..., None]), lse_BxKxGxT


def _attend_bwd(T: int, key_offset: int, window: int, between_blocks: BlockHook | None, residuals, dout_BxLxKxGxD):
    """The standard softmax-attention backward, block by block: dS = P * (dP - rowsum(dO * O))."""
    q, k, v, mask, out, lse = residuals  # head-major
    L, S, D = q.shape[3], k.shape[2], q.shape[-1]
    dout = jnp.transpose(dout_BxLxKxGxD, (0, 2, 3, 1, 4)).astype(v.dtype)
    delta_BxKxGxL = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for start, end, key_end in _blocks(L, S, T, key_offset):
        q_blk, dout_blk = q[:, :, :, start:end], dout[:, :, :, start:end]
        probs, _ = _block_probs(q_blk, k[:, :, :key_end], _block_mask(mask, start, end, key_end, window), D,
                                lse[..., start:end])
        dv = dv.at[:, :, :key_end].add(jnp.einsum("bkgls,bkgld->bksd", probs.astype(v.dtype), dout_blk,
                                                  preferred_element_type=jnp.float32))
        dprobs = jnp.einsum("bkgld,bksd->bkgls", dout_blk, v[:, :, :key_end], preferred_element_type=jnp.float32)
        dscores = (probs * (dprobs - delta_BxKxGxL[..., start:end, None]) * (D**-0.5)).astype(q.dtype)
        dqs.append(jnp.einsum("bkgls,bksd->bkgld", dscores, k[:, :, :key_end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :key_end].add(jnp.einsum("bkgls,bkgld->bksd", dscores, q_blk, preferred_element_type=jnp.float32))
    dq = jnp.transpose(jnp.concatenate(dqs, axis=3).astype(q.dtype), (0, 3, 1, 2, 4))
    to_model = lambda a: jnp.transpose(a.astype(k.dtype), (0, 2, 1, 3))  # noqa: E731
    return dq, to_model(dk), to_model(dv), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask: Mask, T: int, key_offset: int, window: int,
            between_blocks: BlockHook | None) -> jax.Array:
    return _attend_fwd(q_BxLxKxGxD, k_BxSxKxD, v_BxSxKxD, mask, T, key_offset, window, between_blocks)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


def _grouped(core: Callable[..., jax.Array], q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
             q_segment_ids_BxL: jax.Array, kv_segment_ids_BxS: jax.Array, q_offset: jax.Array | int = 0,
             sliding_window: int = 0) -> jax.Array:
    B, L, H, D = q_BxLxHxD.shape
    K = k_BxSxKxD.shape[2]
    mask = (q_segment_ids_BxL, kv_segment_ids_BxS, jnp.arange(L) + q_offset)
    return core(q_BxLxHxD.reshape(B, L, K, H // K, D), k_BxSxKxD, v_BxSxKxD, mask, q_offset,
                sliding_window).reshape(B, L, H, D)


def xla_attention(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, q_segment_ids_BxL: jax.Array,
                  kv_segment_ids_BxS: jax.Array, q_offset: jax.Array | int = 0, sliding_window: int = 0, *,
                  between_blocks: BlockHook | None = None) -> jax.Array:
    """The reference backend: plain einsums, softmax in float32, and a hand-written backward that
    keeps only the row log-sum-exp for the gradient (it recomputes the probabilities); causal
    training calls skip the key blocks after each query block. `between_blocks(q_block,
    previous_block_out)` may rewrite a prefill's query block before it is computed (model/cpu.py
    orders the blocks that way)."""
    core = functools.partial(_causal_blocks, between_blocks=between_blocks)
    return _grouped(core, q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset,
                    sliding_window)

# The same forward, in one block over all keys, differentiated by JAX (the reference for the
# hand-written backward).
xla_attention_autodiff: AttendFn = functools.partial(
    _grouped, lambda q, k, v, mask, q_offset, window: _attend_fwd(q, k, v, mask, q.shape[1], k.shape[1], window)[0])


# Backends by name, as "module:function" with the `attend` signature, imported on first use so a
# CPU install never loads an accelerator's kernels. A new backend is one module and one line here.
BACKENDS: dict[str, str] = {
    "xla": f"{__name__}:xla_attention",
    "xla_autodiff": f"{__name__}:xla_attention_autodiff",
    "splash": "openchat_jax.model.attention_splash:splash_attention",
    "cudnn": "openchat_jax.model.attention_cudnn:cudnn_attention",
}
# `auto` (the default): the backend for the platform jax computes on; any other platform gets xla.
AUTO_BACKENDS = {"tpu": "splash", "gpu": "cudnn"}


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def resolve_backend(name: str, platform: str | None = None) -> str:
    """`auto` -> the backend for `platform` (default: jax's default backend); other names as given."""
    if name == "auto":
        return AUTO_BACKENDS.get(platform or jax.default_backend(), "xla")
    return name


def get_backend(name: str) -> AttendFn:
    resolved = resolve_backend(name)
    if resolved not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; have {sorted(backend_names())}")
    module, _, function = BACKENDS[resolved].partition(":")
    return getattr(importlib.import_module(module), function)
