"""The kernels are chosen by platform: a TPU/GPU trace of the model (traced here on the CPU, as the
planner does) holds none of model/cpu.py's constructs, and a CPU trace holds them all."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from openchat_jax.model.config import TINY
from openchat_jax.model.llama import forward, init_cache, init_params

CFG = TINY.replace(vocab_size=64, num_layers=2, max_position_embeddings=64, dtype="bfloat16")


def _row(length: int, batch: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = jnp.ones((batch, length), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)), jnp.ones_like(tokens)


def _training_traces(platform: str) -> tuple[str, str]:
    """The forward's jaxpr and the forward + backward's lowered StableHLO, on 16 positions. The
    attention backend is xla_autodiff, so every custom_vjp left is the weight matmul's."""
    cfg = CFG.replace(platform=platform, attention="xla_autodiff")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    inputs = _row(16)

    def loss(p):
        return jnp.sum(forward(p, cfg, *inputs).logits.astype(jnp.float32))

    return str(jax.make_jaxpr(loss)(params)), jax.jit(jax.grad(loss)).lower(params).as_text()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_an_accelerator_trace_holds_no_cpu_construct(platform):
    jaxpr, hlo = _training_traces(platform)
    # The weight matmuls are precision.dense's (a custom VJP for the mixed precision), ...
    assert jaxpr.count("custom_vjp_call") == 7 * 1
    assert "optimization_barrier" not in hlo  # ... without cpu.dense's weight-gradient layout
    # Rotary angles computed for the row's own positions, not a table of max_position_embeddings.
    assert re.findall(r"f32\[([\d,]+)\] = sin", jaxpr) == ["2,16,32"]


def test_the_cpu_trace_holds_them():
    """The same checks can fail: the CPU's trace has each construct."""
    jaxpr, hlo = _training_traces("cpu")
    assert jaxpr.count("custom_vjp_call") == 7 * 1  # seven weight matmuls in the scanned layer body
    assert "optimization_barrier" in hlo
    assert re.findall(r"f32\[([\d,]+)\] = sin", jaxpr) == ["1,64,32"]


@pytest.mark.parametrize("platform,ordered,cache_shape", [
    ("tpu", False, (2, 1, 320, 2, 32)),  # [layers, B, S, K, D]: the backends' own layout
    ("cpu", True, (2, 1, 2, 320, 32)),  # head-major, and the prefill's query blocks in order
])
def test_prefill_ordering_and_cache_layout_by_platform(platform, ordered, cache_shape):
    cfg = CFG.replace(platform=platform, attention="xla")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    cache = init_cache(cfg, 1, 320)
    assert cache["k"].shape == cache_shape
    # 300 queries into 320 slots: two prefill blocks (attention.PREFILL_BLOCK = 256).
    jaxpr = str(jax.make_jaxpr(lambda p, c: forward(p, cfg, *_row(300, 1), cache=c, cache_index=0))(params, cache))
    assert bool(re.search(r"= mul \S+ 0\.0:bf16\[\]", jaxpr)) == ordered
