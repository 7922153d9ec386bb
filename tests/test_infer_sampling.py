"""Sampling functions against NumPy references: top-k / top-p masks, temperature 0 == greedy, and
that draws only come from the kept tokens with the renormalised probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.errors import ConfigError
from openchat_jax.infer.sampling import SamplingConfig, greedy, processed_logits, sample, top_k_mask, top_p_mask


def np_top_k_keep(logits: np.ndarray, k: int) -> np.ndarray:
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1 : k]
    return logits >= kth


def np_top_p_keep(logits: np.ndarray, p: float) -> np.ndarray:
    """Per row: walk tokens from most to least likely, keeping each while the mass before it < p."""
    keep = np.zeros_like(logits, dtype=bool)
    for b, row in enumerate(logits):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-row, kind="stable")
        mass = 0.0
        for j in order:
            if mass >= p:
                break
            keep[b, j] = True
            mass += probs[j]
    return keep


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 2.0


@pytest.mark.parametrize("k", [1, 3, 17, 49])
def test_top_k_mask_matches_numpy(logits, k):
    masked = np.asarray(top_k_mask(jnp.asarray(logits), k))
    keep = np_top_k_keep(logits, k)
    assert keep.sum(axis=-1).tolist() == [k] * len(logits)  # no ties in random floats
    np.testing.assert_array_equal(np.isfinite(masked), keep)
    np.testing.assert_array_equal(masked[keep], logits[keep])


def test_top_k_keeps_ties():
    row = jnp.array([[1.0, 3.0, 3.0, 0.0]])
    assert np.isfinite(np.asarray(top_k_mask(row, 1))).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_mask_matches_numpy(logits, p):
    masked = np.asarray(top_p_mask(jnp.asarray(logits), p))
    keep = np_top_p_keep(logits, p)
    np.testing.assert_array_equal(np.isfinite(masked), keep)
    np.testing.assert_array_equal(masked[keep], logits[keep])
    assert keep.sum(axis=-1).min() >= 1


def test_top_p_hand_case():
    # probs 0.5, 0.3, 0.2: p=0.5 keeps one token, p=0.6 two, p=0.81 all three
    row = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    assert np.isfinite(np.asarray(top_p_mask(row, 0.5))).sum() == 1
    assert np.isfinite(np.asarray(top_p_mask(row, 0.6))).sum() == 2
    assert np.isfinite(np.asarray(top_p_mask(row, 0.81))).sum() == 3


def test_processed_logits_order_matches_numpy(logits):
    cfg = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
    got = np.asarray(processed_logits(jnp.asarray(logits), cfg))
    scaled = logits / 0.7
    keep = np_top_k_keep(scaled, 10)
    masked = np.where(keep, scaled, -np.inf)
    keep &= np_top_p_keep(masked, 0.8)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    np.testing.assert_allclose(got[keep], scaled[keep], rtol=1e-6)


def test_temperature_zero_is_greedy(logits):
    x = jnp.asarray(logits)
    want = np.argmax(logits, axis=-1)
    for seed in range(3):
        got = sample(x, jax.random.key(seed), SamplingConfig(temperature=0.0, top_k=5, top_p=0.5))
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(greedy(x)), want)


def test_sampling_frequencies_follow_masked_distribution():
    logits = jnp.asarray(np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]], np.float32)))
    cfg = SamplingConfig(temperature=1.0, top_k=4, top_p=0.8)  # top-k keeps 4, top-p then keeps 3
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, cfg))(keys))[:, 0]
    counts = np.bincount(draws, minlength=6) / len(draws)
    expected = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    np.testing.assert_allclose(counts, expected, atol=0.015)
    assert counts[3:].sum() == 0


def test_sampling_is_a_function_of_the_key(logits):
    cfg = SamplingConfig(temperature=1.0)
    x = jnp.asarray(logits)
    a = np.asarray(sample(x, jax.random.key(7), cfg))
    b = np.asarray(sample(x, jax.random.key(7), cfg))
    np.testing.assert_array_equal(a, b)
    draws = {tuple(np.asarray(sample(x, jax.random.key(s), cfg))) for s in range(8)}
    assert len(draws) > 1


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_config(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


@pytest.mark.slow  # ~40 s on the shared 2-core machine (torch import, export, two compiles)
def test_decode_benchmark_runs_and_agrees_with_transformers():
    """Smoke test of `python benchmarks/decode.py` on a very small model."""
    from benchmarks.decode import bench_decode
    from tests.test_infer_fixtures import SMALL

    lines: list[str] = []
    rows = bench_decode(batch_sizes=(1, 2), prompt_len=8, new_tokens=4, repeats=1, cfg=SMALL, torch_threads=(1,),
                        print_fn=lines.append)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["same_tokens"] and r["jax_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 for r in rows)
    assert lines[1].startswith("| batch |") and len(lines) == 5
