"""The weight matmul of both kernel sets (model/cpu.py's, with its weight gradient laid out for
XLA:CPU, and model/precision.py's, which TPUs and GPUs take) against jnp.einsum + autodiff, and, in
bfloat16, that every dot of their forward and backward multiplies bf16 by bf16 into float32."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.model import precision
from openchat_jax.model.cpu import dense
from openchat_jax.model.llama import PlainKernels

# (spec, x shape, w shape): the model's seven weight matmuls in miniature, both transposition
# branches (x smaller than dy, and dy smaller than x).
CASES = [
    ("ble,ehd->blhd", (2, 5, 6), (6, 3, 4)),
    ("ble,ekd->blkd", (2, 5, 6), (6, 1, 4)),
    ("blhd,hde->ble", (2, 5, 3, 4), (3, 4, 6)),
    ("ble,em->blm", (2, 5, 6), (6, 16)),
    ("blm,me->ble", (2, 5, 16), (16, 6)),
]


@pytest.mark.parametrize("backend", ["cpu", "accelerator"])
@pytest.mark.parametrize("spec,x_shape,w_shape", CASES)
def test_value_and_gradients_match_autodiff(spec, x_shape, w_shape, backend):
    dense_fn = dense if backend == "cpu" else PlainKernels.dense
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x, w).shape
    cot = jax.random.normal(kc, out_shape, jnp.float32)

    def objective(f):
        return lambda a, b: jnp.sum(f(a, b) * cot)

    ours = objective(lambda a, b: dense_fn(spec, a, b))
    ref = objective(lambda a, b: jnp.einsum(spec, a, b, precision="highest"))
    np.testing.assert_allclose(jax.jit(lambda a, b: dense_fn(spec, a, b))(x, w), jnp.einsum(spec, x, w, precision="highest"),
                               rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,x_shape,w_shape", CASES)
def test_the_accelerators_gradients_are_autodiff_of_a_float32_einsum(spec, x_shape, w_shape):
    """precision.dense against jax's own autodiff of a float32 einsum: in float32 equal up to the
    order XLA sums the products in (its dots differ from autodiff's in operand and axis order); in
    bfloat16 (f32 master weight) within bf16 rounding of the cotangent and gradients, with each
    gradient in its operand's dtype."""
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x32 = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x32, w).shape
    cot = jax.random.normal(kc, out_shape, jnp.float32)

    def grads(f, x):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * cot), argnums=(0, 1)))(x, w)

    def reference(a, b):
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(a.dtype).astype(jnp.float32))

    ours = grads(lambda a, b: precision.dense(spec, a, b), x32)
    for g, g_ref in zip(ours, grads(reference, x32)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(g_ref))))

    x16 = x32.astype(jnp.bfloat16)
    ours, ref = grads(lambda a, b: precision.dense(spec, a, b), x16), grads(reference, x16)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    for g, g_ref in zip(ours, ref):
        scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=0, atol=1e-2 * scale)


@pytest.mark.parametrize("dense_fn", [dense, precision.dense], ids=["cpu", "accelerator"])
def test_bfloat16_dots_accumulate_in_float32_forward_and_backward(dense_fn):
    x = jnp.ones((2, 5, 6), jnp.bfloat16)
    w = jnp.ones((6, 16), jnp.float32)  # f32 master weight, cast to the compute dtype inside

    def loss(a, b):
        return jnp.sum(dense_fn("ble,em->blm", a, b).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", hlo)
    assert len(dots) == 3  # forward, dx, dw
    for lhs, rhs, out in dots:
        assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>") and out.endswith("xf32>"), (lhs, rhs, out)
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    # d/dx sum((x W)^2) = 2 (x W) W^T with x, W all ones: 2 * 6 * 16 everywhere.
    np.testing.assert_array_equal(np.asarray(gx, np.float32), np.full((2, 5, 6), 192.0, np.float32))


def test_bad_spec_is_a_clear_error():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match="two-operand"):
        dense("ab->b", x, w)
    with pytest.raises(ValueError, match="each axis of x"):
        dense("az,bc->ac", x, w)


def test_the_accelerators_weight_gradient_is_plain_on_a_cpu_host():
    """The planner compiles a TPU/GPU step on fake CPU devices: the accelerator's backward has no
    CPU-only transposes behind barriers, the CPU's has."""
    x, w = jnp.ones((2, 5, 6)), jnp.ones((6, 16))

    def backward_hlo(dense_fn) -> str:
        return jax.jit(jax.grad(lambda a, b: jnp.sum(dense_fn("ble,em->blm", a, b)), argnums=(0, 1))).lower(x, w).as_text()

    assert jax.default_backend() == "cpu"
    assert "optimization_barrier" in backward_hlo(dense)
    assert "optimization_barrier" not in backward_hlo(PlainKernels.dense)
