"""Schedule closed form and lr="auto", weight-decay mask, FLOPs formula, metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from openchat_jax.errors import ConfigError
from openchat_jax.model.config import LLAMA2_13B, TINY
from openchat_jax.model.llama import init_params
from openchat_jax.train.config import base_config
from openchat_jax.train.flops import flops_per_token, matmul_params
from openchat_jax.train.metrics import MetricsWriter, named_scalars, read_metrics
from openchat_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer, peak_learning_rate, warmup_steps


def closed_form(n: int, peak: float, T: int, W: int, end_ratio: float = 0.1) -> float:
    """lr of update n (1-based), written independently of the implementation."""
    end = end_ratio * peak
    if n <= W:
        return peak * n / W
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (n - W) / (T - W)))


@pytest.mark.parametrize("T", [1000, 37])
def test_schedule_matches_closed_form(T):
    peak = 6.7e-5
    W = warmup_steps(T, 0.05)
    assert W == round(0.05 * T)
    schedule = lr_schedule(peak, T, warmup_ratio=0.05, end_lr_ratio=0.1)
    mid = W + (T - W) // 2
    # optax passes count = updates already applied, i.e. update n runs at schedule(n - 1).
    for n in (1, W, W + 1, mid, T):
        assert float(schedule(n - 1)) == pytest.approx(closed_form(n, peak, T, W), rel=1e-6), n
    assert float(schedule(W - 1)) == pytest.approx(peak, rel=1e-6)  # end of warmup: the peak
    assert float(schedule(T - 1)) == pytest.approx(0.1 * peak, rel=1e-6)  # last step: 10% of peak
    if (T - W) % 2 == 0:
        assert float(schedule(mid - 1)) == pytest.approx(0.55 * peak, rel=1e-6)  # halfway down the cosine
    assert float(schedule(0)) == pytest.approx(peak / W, rel=1e-6)  # the first update already moves


def test_auto_lr_and_paper_config():
    assert peak_learning_rate("auto", 200_000) == pytest.approx(3e-4 * math.sqrt(0.05), rel=1e-12)
    assert f"{peak_learning_rate('auto', 200_000):.1e}" == "6.7e-05"  # the paper's figure
    assert peak_learning_rate("auto", 4_000_000) == pytest.approx(3e-4)
    assert peak_learning_rate("2e-5", 1) == 2e-5 and peak_learning_rate(1e-4, 1) == 1e-4
    for bad in ("fast", -1.0, 0, float("nan")):
        with pytest.raises(ConfigError, match="train.lr"):
            peak_learning_rate(bad, 200_000)
    from openchat_jax.config import load_config

    paper = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama2_13b_openchat.py")
    tokens = paper.train.global_batch_size * paper.data.max_length
    assert paper.data.max_length == 4096 and 190_000 <= tokens <= 210_000
    assert paper.train.lr == "auto" and paper.train.epochs == 5
    assert peak_learning_rate(paper.train.lr, tokens) == pytest.approx(3e-4 * math.sqrt(tokens / 4e6))
    assert (paper.train.b1, paper.train.b2, paper.train.eps, paper.train.weight_decay, paper.train.grad_clip) == (
        0.9, 0.95, 1e-5, 0.1, 1.0)
    assert paper.model.embed == LLAMA2_13B.embed and paper.model.dtype == "bfloat16"


def test_weight_decay_mask_spares_norms_and_embeddings():
    cfg = TINY.replace(num_layers=1, vocab_size=64)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    mask = decay_mask(params, decay_norms=False, decay_embeddings=False)
    assert mask["blocks"]["attn_norm"] is False and mask["final_norm"] is False
    assert mask["embed"] is False and mask["lm_head"] is False and mask["blocks"]["wq"] is True
    # With zero gradients an AdamW update is pure decay: -lr * wd * p where decayed, 0 elsewhere.
    train = base_config("tiny").train
    train.update(lr=0.5, warmup_ratio=0.0, end_lr_ratio=1.0, decay_norms=False, decay_embeddings=False)
    tx, _, _ = make_optimizer(train, total_steps=10, tokens_per_step=1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["blocks"]["wq"], -0.5 * 0.1 * params["blocks"]["wq"], rtol=1e-6)
    for name in ("embed", "lm_head", "final_norm"):
        assert not np.asarray(updates[name]).any(), name
    assert not np.asarray(updates["blocks"]["mlp_norm"]).any()


def test_flops_per_token_formula():
    cfg = TINY.replace(vocab_size=100, embed=8, mlp=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, mlp 3*8*16 = 384; lm head 8*100
    assert matmul_params(cfg) == 2 * (192 + 384) + 800
    assert flops_per_token(cfg, seq_len=10) == 6 * 1952 + 12 * 2 * 10 * 2 * 4
    # Llama-2-13B at 4096: ~6 * 13B plus attention (~12 * 40 * 4096 * 5120)
    f = flops_per_token(LLAMA2_13B, 4096)
    assert f == pytest.approx(6 * (LLAMA2_13B.num_params() - LLAMA2_13B.vocab_size * 5120 - 81 * 5120) + 12 * 40 * 4096 * 5120)


def test_named_scalars_and_writer(tmp_path):
    raw = {"loss": np.float32(2.0), "nonfinite": np.int32(0), "class_loss": np.array([1.5, 0.0]),
           "class_accuracy": np.array([0.25, 0.0]), "class_tokens": np.array([10.0, 0.0])}
    scalars = named_scalars(raw, ["gpt4", "gpt3"])
    assert scalars == {"loss": 2.0, "nonfinite": 0.0, "class/gpt4/loss": 1.5, "class/gpt4/accuracy": 0.25,
                       "class/gpt4/tokens": 10.0, "class/gpt3/tokens": 0.0}  # absent class: no loss of 0
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(1, scalars)
    writer.write(2, {"loss": float("nan")})
    writer.close()
    rows = read_metrics(tmp_path)
    assert rows[0] == {"step": 1, **scalars} and rows[1] == {"step": 2, "loss": "nan"}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    MetricsWriter(tmp_path / "other", enabled=False).write(1, scalars)  # non-primary process: no files
    assert not (tmp_path / "other").exists()
