"""The Flax Llama is transformers' LlamaForCausalLM / MistralForCausalLM: logits and per-layer
hidden states on random small configs (GQA, non-power-of-two sizes, head_dim != embed / heads,
Llama-3 rope scaling with tied embeddings, linear rope scaling, Mistral's sliding window shorter
than the sequence), packed rows, scanned vs unrolled layers, remat policies, KV-cache decoding and
greedy generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures
from openchat_jax import hf
from openchat_jax.model.llama import forward, init_cache


_PAIRS: dict[str, tuple] = {}
CONFIGS = {
    "gqa": hf_fixtures.GQA, "mha_wide_heads": hf_fixtures.MHA_WIDE_HEADS, "llama3": hf_fixtures.LLAMA3,
    "linear_wide_heads": hf_fixtures.LINEAR_WIDE_HEADS, "mistral": hf_fixtures.MISTRAL,
}


def _pair(name: str, tmp_path_factory) -> tuple:
    """(HF torch model, our params, our cfg) holding the same random weights, loaded through the
    HF reader (so the weight mapping is under test too)."""
    if name not in _PAIRS:
        model = hf_fixtures.random_hf_model(hf_fixtures.hf_config(**CONFIGS[name]), seed=1)
        folder = hf_fixtures.save_hf(model, tmp_path_factory.mktemp(name))
        ckpt = hf.HFCheckpoint(folder)
        cfg = ckpt.cfg.replace(dtype="float32", param_dtype="float32", remat_policy="none")
        _PAIRS[name] = (model, jax.tree.map(jnp.asarray, ckpt.params()), cfg)
    return _PAIRS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def family(request, tmp_path_factory):
    """The pairs whose forward differs from plain Llama-2 (rope scaling + tied head; sliding window)."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """The GQA pair only, for the slower checks (compile time dominates on CPU)."""
    return _pair("gqa", tmp_path_factory)


def _row_inputs(tokens: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    B, L = tokens.shape
    return jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), (B, L)), jnp.ones((B, L), jnp.int32)


def test_logits_and_hidden_states_match_transformers(pair):
    model, params, cfg = pair
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64))
    layer_outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: layer_outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        out = model(torch.as_tensor(tokens), output_hidden_states=True)
    for h in hooks:
        h.remove()

    ours = jax.jit(lambda p, *a: forward(p, cfg, *a, layer_outputs=True))(params, *_row_inputs(tokens))
    logits, hidden = ours.logits, ours.layer_outputs
    assert logits.shape == (2, 64, cfg.vocab_size) and hidden.shape == (cfg.num_layers, 2, 64, cfg.embed)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4, rtol=0)
    assert _relative_error(logits, out.logits.numpy()) <= 1e-4

    # Our hidden[i] is layer i's output; HF's output_hidden_states is (embeddings, layer 0 .. layer
    # Ly-2 outputs, final-normed last layer), so the last layer is checked through a forward hook.
    hs = out.hidden_states
    assert len(hs) == cfg.num_layers + 1 and len(layer_outputs) == cfg.num_layers
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(hidden[i]), layer_outputs[i].numpy(), atol=1e-4, rtol=0)
        if i < cfg.num_layers - 1:
            np.testing.assert_allclose(np.asarray(hidden[i]), hs[i + 1].numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        final = model.model.norm(layer_outputs[-1])
    np.testing.assert_allclose(final.numpy(), hs[-1].numpy(), atol=1e-6)


def _relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the logits' scale)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_config_read_from_the_hf_fields(pair):
    """Each fixture's distinguishing field reaches our config (else the parity below proves less)."""
    model, params, cfg = pair
    hf_cfg = model.config
    assert cfg.head_dim == hf_cfg.head_dim and cfg.tie_embeddings == bool(hf_cfg.tie_word_embeddings)
    assert ("lm_head" in params) != cfg.tie_embeddings
    assert cfg.rope_type == hf_cfg.rope_parameters["rope_type"]
    assert cfg.sliding_window == (getattr(hf_cfg, "sliding_window", None) or 0)


def test_rope_frequencies_equal_transformers(pair):
    """`rope_frequencies` against the inv_freq transformers' rotary module holds, to float32 rounding."""
    from openchat_jax.model.llama import rope_frequencies

    model, _, cfg = pair
    ref = model.model.rotary_emb.inv_freq.numpy()
    ours = rope_frequencies(cfg)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_family_features_change_the_logits(family):
    """The fixtures exercise what they claim: dropping the rope scaling or the sliding window
    changes the logits well beyond the parity tolerance, so the parity test has teeth."""
    _, params, cfg = family
    inputs = _row_inputs(np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 64)))
    plain = cfg.replace(rope_type="default", sliding_window=0)
    assert _relative_error(forward(params, plain, *inputs).logits, forward(params, cfg, *inputs).logits) > 1e-2


def test_packed_row_equals_each_sequence_alone(pair):
    _, params, cfg = pair
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, 23), rng.integers(0, cfg.vocab_size, 30)
    pad = np.zeros(64 - 23 - 30, np.int64)
    tokens = np.concatenate([a, b, pad])[None]
    positions = np.concatenate([np.arange(23), np.arange(30), np.arange(len(pad))])[None]
    segments = np.concatenate([np.full(23, 1), np.full(30, 2), np.zeros(len(pad), int)])[None]
    fwd = jax.jit(lambda p, *x: forward(p, cfg, *x).logits)
    packed = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
    alone_a = np.asarray(fwd(params, *_row_inputs(a[None])))
    alone_b = np.asarray(fwd(params, *_row_inputs(b[None])))
    np.testing.assert_allclose(packed[0, :23], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, 23:53], alone_b[0], atol=1e-5, rtol=0)
    # The check has teeth: without segment ids, b would attend to a and differ.
    leaky = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.ones_like(jnp.asarray(segments))))
    assert np.abs(leaky[0, 23:53] - alone_b[0]).max() > 1e-3


def test_scanned_and_unrolled_layers_agree(gqa):
    _, params, cfg = gqa
    inputs = _row_inputs(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 32)))
    scanned, _, _, h_scanned = forward(params, cfg.replace(scan_layers=True), *inputs, layer_outputs=True)
    unrolled, _, _, h_unrolled = forward(params, cfg.replace(scan_layers=False), *inputs, layer_outputs=True)
    # Not bit-identical: XLA fuses the scan body and the unrolled layers differently.
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(h_scanned), np.asarray(h_unrolled), atol=1e-5, rtol=0)


def test_remat_policies_give_the_same_gradients(gqa):
    _, params, cfg = gqa
    rng = np.random.default_rng(3)
    inputs = _row_inputs(rng.integers(0, cfg.vocab_size, (2, 8)))
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))

    def loss(p, c):
        logits = forward(p, c, *inputs).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    grads = {
        policy: jax.jit(jax.grad(lambda p, c=cfg.replace(remat_policy=policy): loss(p, c)))(params)
        for policy in ("none", "full", "dots", "minimal")
    }
    ref = jax.tree.leaves(grads["none"])
    assert max(float(jnp.abs(g).max()) for g in ref) > 1e-3  # a real gradient, not all zeros
    for policy in ("full", "dots", "minimal"):
        for path, g, r in zip(jax.tree.leaves_with_path(grads[policy]), jax.tree.leaves(grads[policy]), ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=0, err_msg=f"{policy} {path[0]}")


@pytest.mark.parametrize("name", ["gqa", "mistral"])
def test_kv_cache_decode_matches_full_forward(name, tmp_path_factory):
    """With Mistral the 17 tokens outrun the window of 12: the cached keys beyond it must drop out."""
    _, params, cfg = _pair(name, tmp_path_factory)
    B, prompt, total, cache_len = 2, 10, 17, 24
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (B, total))
    full = np.asarray(forward(params, cfg, *_row_inputs(tokens)).logits)

    step = jax.jit(lambda p, c, t, pos, idx: forward(p, cfg, t, pos, jnp.ones_like(t), cache=c, cache_index=idx)[::2])
    cache = init_cache(cfg, B, cache_len, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(prompt), (B, prompt))
    logits, cache = step(params, cache, jnp.asarray(tokens[:, :prompt]), pos, 0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt], atol=1e-4, rtol=0)
    for t in range(prompt, total):
        logits, cache = step(params, cache, jnp.asarray(tokens[:, t : t + 1]), jnp.full((B, 1), t), t)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=1e-4, rtol=0, err_msg=f"step {t}")
    assert np.asarray(cache["segment_ids"])[:, :total].all() and not np.asarray(cache["segment_ids"])[:, total:].any()


def test_rope_table_lookup_equals_the_direct_formula():
    """The CPU's `rope_tables(..., num_positions)` looks the angles' sin and cos up in a table; it must equal
    NumPy's sin/cos of the same float32 angles (HF's formula), and a position outside the table
    (negative ones included) gives NaN rather than a silently wrong rotation."""
    from openchat_jax.model.cpu import rope_tables

    D, theta, size = 16, 10000.0, 64
    positions = np.array([[0, 1, 2, 63], [5, -1, 40, 64]], np.int32)
    inv_freq = (1.0 / theta ** (np.arange(0, D, 2, dtype=np.float32) / D)).astype(np.float32)
    sin, cos = jax.jit(lambda p: rope_tables(p, inv_freq, size))(positions)
    angles = positions.astype(np.float32)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    inside = (positions >= 0) & (positions < size)
    np.testing.assert_allclose(np.asarray(sin)[inside], np.sin(angles)[inside], atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos)[inside], np.cos(angles)[inside], atol=2e-6)
    assert np.isnan(np.asarray(sin)[~inside]).all() and np.isnan(np.asarray(cos)[~inside]).all()
    direct = rope_tables(jnp.asarray(positions), inv_freq, None)
    np.testing.assert_allclose(np.asarray(sin)[inside], np.asarray(direct[0])[inside], atol=2e-6)


def test_decode_step_reads_the_cache_without_transposing_it(gqa):
    """The cache is head-major ([layers, B, K, S, D]), the layout attention computes in, so a
    compiled decode step holds no transpose of a layer's keys or values (in the activations'
    [B, S, K, D] layout each step transposed the whole cache: two thirds of a step at 4k slots)."""
    import re

    _, params, cfg = gqa
    B, S = 2, 96
    cache = init_cache(cfg, B, S, jnp.float32)
    assert cache["k"].shape == (cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim)
    step = jax.jit(lambda p, c, t: forward(p, cfg, t, jnp.full((B, 1), 40), jnp.ones_like(t), cache=c,
                                           cache_index=40)[::2])
    hlo = step.lower(params, cache, jnp.zeros((B, 1), jnp.int32)).compile().as_text()
    layer_size = B * cfg.num_kv_heads * S * cfg.head_dim
    transposed = [m for m in re.finditer(r"= f32\[([0-9,]+)\]\{[0-9,]+\} (transpose|fusion)\(([^\n]*)", hlo)
                  if np.prod([int(d) for d in m.group(1).split(",")]) == layer_size
                  and ("transpose" in m.group(2) or "transpose" in m.group(3))]
    assert not transposed, [m.group(0)[:160] for m in transposed]


def test_greedy_generation_matches_transformers(family):
    """KV-cache generation (left-padded prompts, one decode step at a time) against transformers'
    greedy generate: with Llama-3's tied head and scaled rope, and with Mistral's window outrun by
    prompt + answer (up to 14 + 16 tokens against a window of 12)."""
    from openchat_jax.infer.generate import generate_tokens
    from tests.test_infer_generate import hf_greedy

    model, params, cfg = family
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 9, 14)]
    ours = generate_tokens(params, cfg, prompts, max_new_tokens=16, stop_ids=[], length_bucket=8)
    theirs = hf_greedy(model, prompts, 16)
    for b, g in enumerate(ours):
        assert g.tokens == theirs[b].tolist(), f"prompt {b}"
    assert len({tuple(g.tokens) for g in ours}) == len(prompts)
