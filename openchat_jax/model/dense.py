"""The model's weight matmuls: `dense("ble,ehd->blhd", x, w)`, an einsum of an activation and a
weight, with products accumulated in float32, the result in x's dtype, and a backward by hand.

Why not `jnp.einsum` and autodiff (measured on a 2-core Intel Xeon with AMX, docs/benchmarks.md):
1. bfloat16: `einsum(bf16, bf16)` returns bf16, and XLA:CPU runs such a dot on its slow path
   (~0.3 TFLOP/s), while bf16 x bf16 -> f32 runs on the AMX units (~1.6 TFLOP/s). Asking for f32
   output fixes the forward only: autodiff then feeds the backward dots an f32 cotangent and
   upcasts the bf16 operand, so every backward dot is an f32 dot. Here the cotangent is cast to
   the compute dtype and the backward dots accumulate in f32 as well (as TPUs and GPUs do).
2. Layout (CPU only): for the weight gradient dW = x^T dy, XLA:CPU chose to transpose the larger operand
   (dy, e.g. [B*L, mlp]) inside the elementwise fusion that produces it, a strided write that
   cost more than the matmul itself. Transposing x (the narrower side) on its own, behind an
   optimization barrier, leaves dy row-major and hands the dot operands in its native layout.

The spec has two operands; every axis of x is in w or in the output, and the same for w (so the
gradient of each operand is an einsum of the other operand and the cotangent).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import jax
import jax.numpy as jnp

# None: the CPU layout handling of the weight gradient iff JAX's default backend is the CPU.
_CPU_LAYOUT: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dense_cpu_layout", default=None)


@contextlib.contextmanager
def accelerator_layout() -> Iterator[None]:
    """Trace the backward as for a TPU/GPU even on a CPU host (the planner compiles an
    accelerator's step on fake CPU devices)."""
    token = _CPU_LAYOUT.set(False)
    try:
        yield
    finally:
        _CPU_LAYOUT.reset(token)


def _cpu_layout() -> bool:
    chosen = _CPU_LAYOUT.get()
    return jax.default_backend() == "cpu" if chosen is None else chosen


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> tuple[str, str, str]:
    try:
        inputs, out = spec.replace(" ", "").split("->")
        x, w = inputs.split(",")
    except ValueError:
        raise ValueError(f"dense needs a two-operand einsum spec 'x,w->out', got {spec!r}") from None
    for name, axes in (("x", x), ("w", w)):
        missing = set(axes) - set(out) - set(x if name == "w" else w)
        if missing or len(set(axes)) != len(axes):
            raise ValueError(f"dense spec {spec!r}: each axis of {name} must appear once, and in the other operand or the output")
    return x, w, out


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) accumulated in float32, returned in x.dtype (w is cast to x.dtype first)."""
    return _dense_fwd(spec, x, w)[0]


def _dense_fwd(spec: str, x: jax.Array, w: jax.Array):
    _parse(spec)
    # Saves the weight as given (a scan over layers forwards it instead of stacking a cast copy).
    return _einsum(spec, x, w.astype(x.dtype), x.dtype), (x, w)


def _dense_bwd(spec: str, residuals, dy: jax.Array):
    x, w = residuals
    xs, ws, outs = _parse(spec)
    dy = dy.astype(x.dtype)
    dx = _einsum(f"{outs},{ws}->{xs}", dy, w.astype(x.dtype), x.dtype)
    if not _cpu_layout():  # TPU/GPU dots take either operand layout at no cost
        return dx, _einsum(f"{xs},{outs}->{ws}", x, dy, w.dtype)
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
    dw = _einsum(f"{lhs_spec},{rhs_spec}->{natural}", lhs, rhs, w.dtype)
    if natural != ws:
        dw = jnp.transpose(jax.lax.optimization_barrier(dw), [natural.index(a) for a in ws])
    return dx, dw


def _tokens_last(spec: str, w_spec: str, a: jax.Array) -> tuple[str, jax.Array]:
    """`a` with its axes shared with the weight first and the others (batch, length) last,
    materialised in that order (the barrier keeps XLA from folding the transpose back into the
    dot). XLA:CPU may still fuse the transpose with a scan's dynamic slice of a saved activation,
    a strided copy several times slower than the transpose alone; a barrier on `a` does not stop
    it (XLA drops it: same fusions), and saving `a` transposed in the forward was slower (figures
    in docs/benchmarks.md)."""
    order = [i for i, ax in enumerate(spec) if ax in w_spec] + [i for i, ax in enumerate(spec) if ax not in w_spec]
    return "".join(spec[i] for i in order), jax.lax.optimization_barrier(jnp.transpose(a, order))


dense.defvjp(_dense_fwd, _dense_bwd)
