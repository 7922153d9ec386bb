"""Everything the model does only because XLA:CPU runs it faster or in less memory. The model picks
this module when it computes on the CPU (`LlamaConfig.platform`, see `llama.kernels_for`); a TPU
or GPU trace runs the plain versions in `llama.PlainKernels` and contains none of this. Both
expose the same names: `dense`, `rope_tables`, `attention`, `CACHE_AXES`, `write_cache`,
`read_cache`. Measurements: docs/benchmarks.md.

- `dense`: the weight matmul of model/precision.py (bf16 operands, f32 accumulation, in forward
  and backward) with its weight gradient laid out for XLA:CPU. For dW = x^T dy, XLA:CPU transposes
  the larger operand (dy, e.g. [B*L, mlp]) inside the elementwise fusion that produces it, a
  strided write that costs more than the matmul. Transposing the narrower side on its own, behind
  an optimization barrier, leaves dy row-major.
- `rope_tables`: computed directly, XLA:CPU fuses sin and cos into each rotation and recomputes
  them for every head; a table of every position, looked up, computes them once.
- `attention("xla")`: a prefill's query blocks run one after the other (XLA:CPU would run the
  independent blocks side by side, holding every block's scores).
- The KV cache is head-major, [layers, B, K, S, D], the layout the xla backend computes in: in the
  activations' [B, S, K, D] every decode step transposed each layer's whole cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from openchat_jax.model import precision
from openchat_jax.model.attention import AttendFn, get_backend, xla_attention


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """precision.dense (same values, same dtypes) with the weight gradient laid out for XLA:CPU."""
    return precision.dense_fwd(spec, x, w)[0]


def _dense_bwd(spec: str, residuals, dy: jax.Array):
    x, w = residuals
    xs, ws, outs = precision.parse_spec(spec)
    dy = dy.astype(x.dtype)
    dx = precision.input_grad(spec, dy, w)
    # dW contracts x and dy over their shared (token) axes. The smaller of the two is transposed
    # on its own so that those axes come last in it; the other is used as it is.
    if x.size <= dy.size:
        lhs_spec, lhs = _tokens_last(xs, ws, x)
        rhs_spec, rhs = outs, dy
    else:
        lhs_spec, lhs = _tokens_last(outs, ws, dy)
        rhs_spec, rhs = xs, x
    # The dot's own output order (lhs's weight axes, then rhs's), transposed to w's afterwards:
    # asked for w's order directly, XLA transposes both (large) operands instead of the small result.
    natural = "".join(a for a in lhs_spec if a in ws) + "".join(a for a in rhs_spec if a in ws)
    dw = precision.einsum_f32(f"{lhs_spec},{rhs_spec}->{natural}", lhs, rhs, w.dtype)
    if natural != ws:
        dw = jnp.transpose(jax.lax.optimization_barrier(dw), [natural.index(a) for a in ws])
    return dx, dw


def _tokens_last(spec: str, w_spec: str, a: jax.Array) -> tuple[str, jax.Array]:
    """`a` with its axes shared with the weight first and the others (batch, length) last,
    materialised in that order (the barrier keeps XLA from folding the transpose back into the
    dot). XLA:CPU may still fuse the transpose with a scan's dynamic slice of a saved activation,
    a strided copy several times slower than the transpose alone; a barrier on `a` does not stop
    it (XLA drops it: same fusions), and saving `a` transposed in the forward was slower."""
    order = [i for i, ax in enumerate(spec) if ax in w_spec] + [i for i, ax in enumerate(spec) if ax not in w_spec]
    return "".join(spec[i] for i in order), jax.lax.optimization_barrier(jnp.transpose(a, order))


dense.defvjp(precision.dense_fwd, _dense_bwd)


def rope_tables(positions_BxL: jax.Array, inv_freq_D2: np.ndarray, num_positions: int | None) -> tuple[jax.Array, jax.Array]:
    """sin and cos [B, L, D] of the rotary angles. With `num_positions` (every position a call may
    hold: training, scoring), computed once for positions 0 .. num_positions - 1 and looked up; a
    position outside the table, negative ones included, gives NaN rather than a wrong rotation.
    Without (decoding a few positions), computed directly."""
    if num_positions is None:
        return _sin_cos(positions_BxL, inv_freq_D2)
    sin_TxD, cos_TxD = (t[0] for t in _sin_cos(jnp.arange(num_positions)[None], inv_freq_D2))
    index_BxL = jnp.where(positions_BxL < 0, num_positions, positions_BxL)  # take() would wrap negatives
    look_up = functools.partial(jnp.take, indices=index_BxL, axis=0, mode="fill", fill_value=jnp.nan)
    return look_up(sin_TxD), look_up(cos_TxD)


def _sin_cos(positions_BxL: jax.Array, inv_freq_D2: np.ndarray) -> tuple[jax.Array, jax.Array]:
    freqs_BxLxD2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_D2, jnp.float32)
    angles_BxLxD = jnp.concatenate([freqs_BxLxD2, freqs_BxLxD2], axis=-1)
    return jnp.sin(angles_BxLxD), jnp.cos(angles_BxLxD)


def _after_previous_block(q_blk: jax.Array, previous_out: jax.Array) -> jax.Array:
    """`q_blk` plus a zero read from the previous block's output (same row and head), so XLA:CPU
    computes the blocks in order; it drops an optimization_barrier."""
    return q_blk + (previous_out[..., :1, :1] * 0).astype(q_blk.dtype)


def attention(name: str) -> AttendFn:
    """The backend `name` (already resolved from `auto`), with the xla backend's prefill blocks in order."""
    if name == "xla":
        return functools.partial(xla_attention, between_blocks=_after_previous_block)
    return get_backend(name)


CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def write_cache(cache_LyxBxKxSxD: jax.Array, new_BxLxKxD: jax.Array, layer: jax.Array | int,
                index: jax.Array | int) -> jax.Array:
    new = jnp.swapaxes(new_BxLxKxD, 1, 2)[None].astype(cache_LyxBxKxSxD.dtype)
    return jax.lax.dynamic_update_slice(cache_LyxBxKxSxD, new, (layer, 0, 0, index, 0))


def read_cache(cache_LyxBxKxSxD: jax.Array, layer: jax.Array | int) -> jax.Array:
    """One layer's [B, S, K, D] (the backends' signature); the xla backend's own transpose to
    head-major cancels this one."""
    return jnp.swapaxes(jax.lax.dynamic_index_in_dim(cache_LyxBxKxSxD, layer, keepdims=False), 1, 2)
