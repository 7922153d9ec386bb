"""The weight matmuls' mixed precision, on every platform: `dense`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=64)
def parse_spec(spec: str) -> tuple[str, str, str]:
    """The axes of x, w and the output of a dense spec 'x,w->out'."""
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


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum(spec, a, b) accumulated in float32, returned in `dtype`."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) accumulated in float32, returned in x.dtype (the compute dtype; w is cast
    to it first). Every axis of x is in w or in the output, and the same for w.

    Mixed precision as TPU MXUs and GPU tensor cores run it: compute-dtype (bf16) operands, float32
    accumulation, in the forward and in both gradients. Autodiff of the float32-output einsum would
    feed the backward dots a float32 cotangent and upcast the other operand, and TPUs run f32 x f32
    dots as multi-pass matmuls; so the cotangent is cast to the compute dtype here, and each
    gradient is returned in its operand's dtype (the weight's is the float32 master weight's)."""
    return dense_fwd(spec, x, w)[0]


def dense_fwd(spec: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    parse_spec(spec)
    # Saves the weight as given (a scan over layers forwards it instead of stacking a cast copy).
    return einsum_f32(spec, x, w.astype(x.dtype), x.dtype), (x, w)


def input_grad(spec: str, dy: jax.Array, w: jax.Array) -> jax.Array:
    """dx of `dense` for the compute-dtype cotangent `dy`, in dy's dtype."""
    xs, ws, outs = parse_spec(spec)
    return einsum_f32(f"{outs},{ws}->{xs}", dy, w.astype(dy.dtype), dy.dtype)


def _dense_bwd(spec: str, residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    xs, ws, outs = parse_spec(spec)
    dy = dy.astype(x.dtype)
    return input_grad(spec, dy, w), einsum_f32(f"{xs},{outs}->{ws}", x, dy, w.dtype)


dense.defvjp(dense_fwd, _dense_bwd)
