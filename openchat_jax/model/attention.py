"""Attention backends behind one signature.

attend(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset) -> out_BxLxHxD

Query i sits at slot `q_offset + i` of the key/value sequence (0 in training; the cache index when
decoding). It sees key j iff j <= q_offset + i and both carry the same segment id, so attention is
causal and never crosses packed conversations. Heads are grouped: H = K * G (GQA).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttendFn = Callable[..., jax.Array]


def xla_attention(
    q_BxLxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    q_segment_ids_BxL: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    q_offset: jax.Array | int = 0,
) -> jax.Array:
    """Reference backend: plain einsums, softmax in float32."""
    B, L, H, D = q_BxLxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    G = H // K
    q_BxLxKxGxD = q_BxLxHxD.reshape(B, L, K, G, D)
    scores_BxKxGxLxS = jnp.einsum(
        "blkgd,bskd->bkgls", q_BxLxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    q_slot_L = jnp.arange(L) + q_offset
    causal_LxS = jnp.arange(S)[None, :] <= q_slot_L[:, None]
    same_segment_BxLxS = q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :]
    mask_Bx1x1xLxS = (causal_LxS[None] & same_segment_BxLxS)[:, None, None]
    scores_BxKxGxLxS = jnp.where(mask_Bx1x1xLxS, scores_BxKxGxLxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxLxKxGxD = jnp.einsum("bkgls,bskd->blkgd", probs_BxKxGxLxS, v_BxSxKxD)
    return out_BxLxKxGxD.reshape(B, L, H, D)


_BACKENDS: dict[str, AttendFn] = {"xla": xla_attention}


def register_backend(name: str, fn: AttendFn) -> None:
    _BACKENDS[name] = fn


def get_backend(name: str) -> AttendFn:
    if name not in _BACKENDS:
        # Accelerator backends register themselves on import; import lazily so CPU installs
        # never need their kernels.
        if name in ("splash", "cudnn"):
            import importlib

            importlib.import_module(f"openchat_jax.model.attention_{name}")
        if name not in _BACKENDS:
            raise ValueError(f"attention backend {name!r} is not available; have {sorted(_BACKENDS)}")
    return _BACKENDS[name]
