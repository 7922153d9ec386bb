"""GPU attention through cuDNN's fused kernel (`jax.nn.dot_product_attention`) behind the
`attend` signature. The packed-row mask (same segment) is passed as a boolean mask, causality as
`is_causal` and a sliding window as `local_window_size`; grouped heads are handled natively by the
kernel. Decoding calls (q_offset != 0) use the XLA reference.

`OPENCHAT_CUDNN_IMPLEMENTATION=xla` routes the same call through JAX's XLA implementation, which
is how the CPU test checks the masks; real runs use cuDNN on NVIDIA GPUs.
"""

from __future__ import annotations

import os

import jax

from openchat_jax.model.attention import register_backend, xla_attention


def cudnn_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset=0,
                    sliding_window: int = 0):
    L, S = q_BxLxHxD.shape[1], k_BxSxKxD.shape[1]
    if not (isinstance(q_offset, int) and q_offset == 0 and L == S):
        return xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset,
                             sliding_window=sliding_window)
    same_segment_Bx1xLxS = (q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BxLxHxD, k_BxSxKxD, v_BxSxKxD,
        mask=same_segment_Bx1xLxS,
        is_causal=True,
        # (left, right): query i sees keys i - left .. i, so left = W - 1 keeps keys > i - W.
        local_window_size=(sliding_window - 1, 0) if 0 < sliding_window < L else None,
        implementation=os.environ.get("OPENCHAT_CUDNN_IMPLEMENTATION", "cudnn"),
    ).astype(q_BxLxHxD.dtype)


register_backend("cudnn", cudnn_attention)
