"""Shared pieces for the generation tests (no tests here): a small random model with spread-out
logits (so greedy choices are not near-ties between implementations), weights folders with the
fixture tokenizer, and the exported HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.model.config import TINY, LlamaConfig
from openchat_jax.model.llama import init_params

# GQA (6 heads over 2 kv heads), float32, scanned layers; vocab 96 divides a tensor axis of 2.
SMALL = TINY.replace(
    vocab_size=96, embed=48, mlp=100, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
    max_position_embeddings=128, init_std=0.15, dtype="float32", remat_policy="none",
)


def random_params(cfg: LlamaConfig, seed: int = 0):
    """init_params with random (not all-ones) norm scales, so a swapped norm would show."""
    params = init_params(cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1000), 3))
    for where, name in ((params["blocks"], "attn_norm"), (params["blocks"], "mlp_norm"), (params, "final_norm")):
        where[name] = 1.0 + 0.2 * jax.random.normal(next(keys), where[name].shape, jnp.float32)
    return params


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def save_weights(folder: Path, params, cfg: LlamaConfig, tokenizer_dir: Path | None = None,
                 classes: list[dict] | None = None) -> Path:
    """A weights folder as training / `convert hf-to-jax` write it (plus the tokenizer and classes)."""
    from openchat_jax.data.tokenizer import load_tokenizer
    from openchat_jax.model.checkpoint_io import save_params

    special = None
    if tokenizer_dir is not None:
        tok, eot = load_tokenizer(tokenizer_dir)
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "eot_token_id": eot}
    save_params(str(folder), jax.device_get(params), cfg, special_tokens=special)
    if tokenizer_dir is not None:
        tok.save_pretrained(str(folder / "tokenizer"))
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes))
    return folder


def tokenizer_vocab(tokenizer_dir: Path) -> int:
    from openchat_jax.data.tokenizer import load_tokenizer

    return len(load_tokenizer(tokenizer_dir)[0])


CLASSES = [
    {"name": "gpt3", "condition": "GPT3", "weight": 0.1},
    {"name": "gpt4", "condition": "GPT4", "weight": 1.0},
]


# Fixtures imported into several test modules get one definition per module; this cache makes
# the (slow-ish) weights folder and model once per session all the same.
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session")
def chat_ckpt(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A weights folder as training leaves it: params sized to the fixture tokenizer (with
    <|end_of_turn|>), tokenizer/, special_tokens.json and classes.json."""
    if "ckpt" not in _SESSION:
        cfg = SMALL.replace(vocab_size=tokenizer_vocab(tiny_tokenizer_dir))
        folder = tmp_path_factory.mktemp("chat_ckpt") / "weights"
        _SESSION["ckpt"] = save_weights(folder, random_params(cfg, seed=5), cfg, tiny_tokenizer_dir, classes=CLASSES)
    return _SESSION["ckpt"]


@pytest.fixture(scope="session")
def chat_model(chat_ckpt):
    from openchat_jax.infer.engine import load_chat_model

    if "model" not in _SESSION:
        _SESSION["model"] = load_chat_model(chat_ckpt)
    return _SESSION["model"]
