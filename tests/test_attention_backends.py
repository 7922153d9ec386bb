"""Accelerator attention backends against the XLA reference. On CPU the wiring (masks, head
grouping, layouts) is checked through Pallas' interpreter (splash) and JAX's XLA path of the
cuDNN call; on a TPU/GPU the real kernels are compared too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.model.attention import get_backend, xla_attention


def _inputs(B=2, L=256, H=4, K=2, D=64, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, L, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, L, K, D)), dtype)
    # Row 0: three packed segments then padding; row 1: one segment filling the row.
    seg = np.zeros((B, L), np.int32)
    seg[0, :100], seg[0, 100:180], seg[0, 180:240] = 1, 2, 3
    seg[1, :] = 1
    return q, k, v, jnp.asarray(seg)


def _check(name, monkeypatch, env, dtype=jnp.float32, atol=2e-5, window=0):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    attend = get_backend(name)
    q, k, v, seg = _inputs(dtype=dtype)
    ref = xla_attention(q, k, v, seg, seg, sliding_window=window)
    out = attend(q, k, v, seg, seg, sliding_window=window)
    real = seg != 0  # padding rows attend among themselves; their values are never used
    np.testing.assert_allclose(np.asarray(out, np.float32)[np.asarray(real)],
                               np.asarray(ref, np.float32)[np.asarray(real)], atol=atol)
    # Decode-shaped calls use the reference path.
    out_dec = attend(q[:, :1], k, v, seg[:, :1], seg, 5, sliding_window=window)
    np.testing.assert_allclose(np.asarray(out_dec), np.asarray(xla_attention(q[:, :1], k, v, seg[:, :1], seg, 5,
                                                                              sliding_window=window)))


def _dense_reference(q, k, v, q_seg, kv_seg, q_offset, window):
    """Softmax attention in float64 NumPy over an explicit [B, L, S] mask (GQA by repeating heads)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, L, H, D = q.shape
    S = k.shape[1]
    k, v = (np.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
    i, j = np.arange(L)[:, None] + q_offset, np.arange(S)[None, :]
    mask = (j <= i) & ((j > i - window) if window else True)
    mask = mask[None] & (np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(D)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


@pytest.mark.parametrize("window", [1, 37, 100])
def test_sliding_window_matches_a_dense_reference(window):
    """Key j visible to the query at slot i iff i - window < j <= i and the segments agree: packed
    rows (segments 100, 80, 60 long, so the window binds inside some and not others), a prefill
    into a longer cache, and a decode step at slot 200 (keys before slot 201 - window drop out)."""
    from openchat_jax.model.attention import PREFILL_BLOCK, xla_attention_autodiff

    q, k, v, seg = _inputs(L=384)
    seg = seg.at[0, :].set(jnp.asarray(np.repeat([1, 2, 3, 0], [100, 80, 60, 144]), jnp.int32))
    real = np.asarray(seg) != 0
    for fn in (xla_attention, xla_attention_autodiff):  # 3 causal blocks of 128; one block
        out = fn(q, k, v, seg, seg, sliding_window=window)
        ref = _dense_reference(q, k, v, seg, seg, 0, window)
        np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-5)
    L = PREFILL_BLOCK + 20
    out = xla_attention(q[:, :L], k, v, seg[:, :L], seg, sliding_window=window)
    np.testing.assert_allclose(np.asarray(out)[real[:, :L]], _dense_reference(q[:, :L], k, v, seg[:, :L], seg, 0, window)[real[:, :L]], atol=2e-5)
    ones = jnp.ones_like(seg)
    out = xla_attention(q[:, 200:201], k, v, ones[:, :1], ones, 200, sliding_window=window)
    np.testing.assert_allclose(np.asarray(out), _dense_reference(q[:, 200:201], k, v, ones[:, :1], ones, 200, window), atol=2e-5)
    if window < 100:  # the window changes the answer (else the checks above prove nothing about it)
        assert np.abs(np.asarray(out) - _dense_reference(q[:, 200:201], k, v, ones[:, :1], ones, 200, 0)).max() > 1e-2


@pytest.mark.parametrize("window", [0, 37])
def test_cudnn_backend_masks_match_reference(monkeypatch, window):
    on_gpu = jax.default_backend() == "gpu"
    # cuDNN's kernel takes half precision only; float32 calls take the XLA reference (checked in _check).
    _check("cudnn", monkeypatch, {} if on_gpu else {"OPENCHAT_CUDNN_IMPLEMENTATION": "xla"}, jnp.bfloat16, 3e-2, window)
    _check("cudnn", monkeypatch, {} if on_gpu else {"OPENCHAT_CUDNN_IMPLEMENTATION": "xla"}, jnp.float32, 0.0, window)


@pytest.mark.parametrize("window", [0, 37])
def test_splash_backend_matches_reference(monkeypatch, window):
    on_tpu = jax.default_backend() == "tpu"
    try:
        _check("splash", monkeypatch, {} if on_tpu else {"OPENCHAT_SPLASH_INTERPRET": "1"}, window=window)
    except NotImplementedError as e:  # pragma: no cover - interpreter gaps on some JAX versions
        pytest.skip(f"Pallas TPU interpreter unavailable on this JAX: {e}")


def test_splash_in_sharded_model_forward_matches_xla(monkeypatch):
    """Under a mesh the splash kernel runs per shard (shard_map); logits equal the xla backend's."""
    from jax.sharding import Mesh

    from openchat_jax.model.config import TINY
    from openchat_jax.model.llama import forward, init_params
    from openchat_jax.model.partitioning import use_rules

    if jax.default_backend() != "tpu":
        monkeypatch.setenv("OPENCHAT_SPLASH_INTERPRET", "1")
    cfg = TINY.replace(num_layers=2)
    params = init_params(cfg, jax.random.key(0))
    _, _, _, seg = _inputs(B=4, L=128)
    seg = jnp.concatenate([seg, seg])[:4, :128]
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 128)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(128), (4, 128))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    rules = [("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")]
    with use_rules(mesh, rules):
        out = jax.jit(lambda p: forward(p, cfg.replace(attention="splash"), tokens, positions, seg).logits)(params)
    ref = forward(params, cfg, tokens, positions, seg).logits
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-4)


@pytest.mark.parametrize("L", [128, 384])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_xla_backward_equals_autodiff_of_its_forward(dtype, tol, L):
    """The hand-written backward (probabilities recomputed from the saved log-sum-exp) against
    JAX differentiating the same forward over all keys, on packed segments with padding and
    grouped heads. At L = 384 the reference backend attends in 3 causal query blocks of 128
    (segments cross the block boundaries); at 128 in one."""
    from openchat_jax.model import attention
    from openchat_jax.model.attention import xla_attention_autodiff

    assert attention.CAUSAL_BLOCK == 128
    q, k, v, seg = _inputs(L=L)
    seg = seg.at[0, :100].set(1).at[0, 100:].set(0).at[0, 60:100].set(2)
    if L > 128:
        seg = seg.at[0, 100:300].set(3).at[0, 300:].set(4)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg).astype(jnp.float32) * cot)

    ours = jax.jit(jax.grad(objective(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(objective(xla_attention_autodiff), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        assert a.dtype == dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b).max() > 0.1, name
        np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0, err_msg=name)
    out, out_ref = (np.asarray(f(q, k, v, seg, seg), np.float32) for f in (xla_attention, xla_attention_autodiff))
    if L == 128:
        np.testing.assert_array_equal(out, out_ref)
    else:  # blocked: sums over fewer (masked, exactly zero) terms, so the rounding may differ
        np.testing.assert_allclose(out, out_ref, atol=tol * np.abs(out_ref).max(), rtol=0)


def test_prefill_attends_in_query_blocks_with_the_same_result():
    """A prompt written into a longer cache (q_offset 0, L < S; left padding and empty slots carry
    segment 0) is attended in blocks of PREFILL_BLOCK queries, the last one shorter, each against the
    keys up to its own last slot: the [L, S] scores are never built whole, and the output equals one
    block over all keys. On the CPU (model/cpu.py's xla backend) the blocks run in order."""
    from openchat_jax.model import attention, cpu
    from openchat_jax.model.attention import PREFILL_BLOCK, _blocks, xla_attention_autodiff

    L, S = 2 * PREFILL_BLOCK + 88, 2 * PREFILL_BLOCK + 188
    assert _blocks(L, S, PREFILL_BLOCK, 0) == [(0, 256, 256), (256, 512, 512), (512, 600, 600)]
    q, _, _, _ = _inputs(B=2, L=L)
    _, k, v, _ = _inputs(B=2, L=S, seed=1)
    q_seg = np.ones((2, L), np.int32)
    q_seg[0, :37] = 0  # a left-padded prompt
    kv_seg = np.zeros((2, S), np.int32)
    kv_seg[:, :L] = q_seg  # the cache past the prompt is still empty
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    blocked = jax.jit(lambda q, k, v: cpu.attention("xla")(q, k, v, q_seg, kv_seg, 0))
    hlo = blocked.lower(q, k, v).as_text()
    assert f"{L}x{S}" not in hlo and "256x256xf32" in hlo
    # One block's scores alive at a time (the blocks run in order): the temporaries are under half
    # of one block over all keys (all three blocks' scores together would be ~0.6 of it).
    temp = blocked.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    one_block = jax.jit(lambda q, k, v: xla_attention_autodiff(q, k, v, q_seg, kv_seg, 0))
    assert temp < 0.5 * one_block.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    out = np.asarray(blocked(q, k, v))
    ref = np.asarray(xla_attention_autodiff(q, k, v, q_seg, kv_seg, 0))
    real = np.asarray(q_seg) != 0
    np.testing.assert_allclose(out[real], ref[real], atol=2e-5 * np.abs(ref).max(), rtol=0)
    assert attention.CAUSAL_BLOCKS == 4  # training-shaped calls keep their few blocks


def test_training_blocks_allow_a_shorter_last_block():
    """L = 500 (not a multiple of 4 x 128): blocks of 128, 128, 128, 116; the forward and the
    hand-written backward equal JAX differentiating one block over all keys."""
    from openchat_jax.model.attention import _blocks, xla_attention_autodiff

    assert _blocks(500, 500, 128, 0) == [(0, 128, 128), (128, 256, 256), (256, 384, 384), (384, 500, 500)]
    q, k, v, seg = _inputs(L=500)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg) * cot)

    ours = jax.jit(jax.grad(objective(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(objective(xla_attention_autodiff), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * np.abs(np.asarray(b)).max(), rtol=0,
                                   err_msg=name)


def test_xla_backward_with_a_sliding_window_equals_autodiff():
    """The hand-written backward applies the window too (3 causal blocks of 128, window 50)."""
    from openchat_jax.model.attention import xla_attention_autodiff

    q, k, v, seg = _inputs(L=384)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg, sliding_window=50) * cot)

    ours = jax.jit(jax.grad(objective(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(objective(xla_attention_autodiff), argnums=(0, 1, 2)))(q, k, v)
    unwindowed = jax.grad(lambda q: jnp.sum(xla_attention(q, k, v, seg, seg) * cot))(q)
    assert np.abs(np.asarray(unwindowed) - np.asarray(ref[0])).max() > 1e-2
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * np.abs(np.asarray(b)).max(), rtol=0, err_msg=name)
def test_auto_is_splash_on_tpu_cudnn_on_gpu_and_xla_elsewhere():
    from openchat_jax.errors import ConfigError
    from openchat_jax.model.attention import resolve_backend
    from openchat_jax.model.config import LlamaConfig

    assert LlamaConfig().attention == "auto"
    assert [resolve_backend("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    assert resolve_backend("xla", "tpu") == "xla"  # a named backend is used as named
    if jax.default_backend() == "cpu":
        assert get_backend("auto") is xla_attention
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        LlamaConfig(attention="flash")


# A whole attention backend in one module: plain softmax attention, causal within each segment.
TOY_BACKEND = '''
import jax
import jax.numpy as jnp


def toy_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_segment_ids_BxL, kv_segment_ids_BxS, q_offset=0,
                  sliding_window=0):
    L, H, D = q_BxLxHxD.shape[1:]
    S, K = k_BxSxKxD.shape[1:3]
    k_BxSxHxD = jnp.repeat(k_BxSxKxD, H // K, axis=2)
    v_BxSxHxD = jnp.repeat(v_BxSxKxD, H // K, axis=2)
    scores = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxHxD, preferred_element_type=jnp.float32) / D**0.5
    slot_L = jnp.arange(L) + q_offset
    causal_LxS = jnp.arange(S)[None, :] <= slot_L[:, None]
    if sliding_window:
        causal_LxS &= jnp.arange(S)[None, :] > slot_L[:, None] - sliding_window
    same_BxLxS = q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :]
    probs = jax.nn.softmax(jnp.where((causal_LxS & same_BxLxS)[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhls,bshd->blhd", probs.astype(v_BxSxHxD.dtype), v_BxSxHxD)
'''


def test_a_new_backend_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """docs/architecture.md's recipe: write the module, add its line to attention.BACKENDS, name it
    in model.attention; the model's forward and gradient then match the xla backend."""
    from openchat_jax.model import attention
    from openchat_jax.model.config import TINY
    from openchat_jax.model.llama import forward, init_params

    (tmp_path / "toy_attention_backend.py").write_text(TOY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(attention.BACKENDS, "toy", "toy_attention_backend:toy_attention")  # the registry line

    cfg = TINY.replace(num_layers=2, attention="toy", dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    _, _, _, seg = _inputs(B=2, L=128)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 128)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(128), (2, 128))

    def loss(p, c):
        logits = forward(p, c, tokens, positions, seg).logits
        return jnp.where((seg != 0)[..., None], logits, 0.0).sum(), logits

    (_, toy), toy_grads = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    (_, ref), ref_grads = jax.value_and_grad(loss, has_aux=True)(params, cfg.replace(attention="xla"))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(toy)[real], np.asarray(ref)[real], atol=1e-4)
    for g, r in zip(jax.tree.leaves(toy_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-4)
