"""TPU splash attention (Pallas) behind the `attend` signature: block-sparse causal attention
(within a local window of `sliding_window` keys when set) with segment ids. Used for training-shaped calls (q_offset == 0, L == S); decoding calls fall back
to the XLA reference. Under an active sharding context the kernel runs per shard (shard_map over
batch and heads), as a Pallas call cannot be partitioned by XLA itself.

`interpret=True` (set OPENCHAT_SPLASH_INTERPRET=1) runs the kernel in Pallas' interpreter, which
is how the CPU test checks the wiring against the reference; real runs need a TPU.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from openchat_jax.model import partitioning
from openchat_jax.model.attention import register_backend, xla_attention


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, length: int, block: int, window: int, interpret: bool):
    if 0 < window < length:  # causal and key j > i - window: a left window of window - 1 keys
        head_mask = splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = splash_mask.CausalMask((length, length))
    mask = splash_mask.MultiHeadMask([head_mask for _ in range(num_heads)])
    sizes = splash.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_seg_BxL, kv_seg_BxS, window: int):
    B, L, H, D = q_BxLxHxD.shape
    groups = H // k_BxSxKxD.shape[2]
    block = min(512, L)
    kernel = _kernel(H, L, block, window, os.environ.get("OPENCHAT_SPLASH_INTERPRET") == "1")
    q_BxHxLxD = (q_BxLxHxD * (D**-0.5)).transpose(0, 2, 1, 3)
    k_BxHxSxD = jnp.repeat(k_BxSxKxD, groups, axis=2).transpose(0, 2, 1, 3)
    v_BxHxSxD = jnp.repeat(v_BxSxKxD, groups, axis=2).transpose(0, 2, 1, 3)
    segments = splash.SegmentIds(q=q_seg_BxL, kv=kv_seg_BxS)
    out_BxHxLxD = jax.vmap(kernel)(q_BxHxLxD, k_BxHxSxD, v_BxHxSxD, segments)
    return out_BxHxLxD.transpose(0, 2, 1, 3)


def splash_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset=0,
                     sliding_window: int = 0):
    L, S = q_BxLxHxD.shape[1], k_BxSxKxD.shape[1]
    if not (isinstance(q_offset, int) and q_offset == 0 and L == S and L % 128 == 0):
        return xla_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset,
                             sliding_window=sliding_window)
    local = functools.partial(_local, window=sliding_window)
    active = partitioning._ACTIVE.get()
    if active is None:
        return local(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS)
    mesh, rules = active
    qspec = partitioning.logical_to_spec(("batch", None, "heads", None), rules, mesh)
    kvspec = partitioning.logical_to_spec(("batch", None, "kv_heads", None), rules, mesh)
    segspec = PartitionSpec(qspec[0], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(qspec, kvspec, kvspec, segspec, segspec), out_specs=qspec, check_vma=False
    )(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS)


register_backend("splash", splash_attention)
