"""Small random Hugging Face Llama / Mistral checkpoints (torch CPU) built in tmp folders for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

# GQA (6 query heads share 2 kv heads), sizes that are not powers of two, non-default theta/eps.
GQA = dict(
    vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
)
# Multi-head attention with head_dim != hidden_size / num_heads.
MHA_WIDE_HEADS = dict(
    vocab_size=77, hidden_size=36, intermediate_size=90, num_hidden_layers=2, num_attention_heads=3,
    num_key_value_heads=3, head_dim=14, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
)

# Llama-3 style: rope scaling of type llama3 (an original context short enough that the low, medium
# and high frequency bands all occur at head_dim 16), tied embeddings, GQA.
LLAMA3 = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
    tie_word_embeddings=True,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=32),
)
# Linear rope scaling with head_dim != hidden_size / num_heads.
LINEAR_WIDE_HEADS = dict(
    MHA_WIDE_HEADS, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
)
# Mistral: a sliding window (12) much shorter than the test sequences, GQA.
MISTRAL = dict(
    vocab_size=89, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256, sliding_window=12,
)


def hf_config(**overrides: Any) -> transformers.PretrainedConfig:
    """A LlamaConfig over GQA's fields, or a MistralConfig when `sliding_window` is given."""
    kind = transformers.MistralConfig if "sliding_window" in overrides else transformers.LlamaConfig
    return kind(**{**GQA, **overrides})


def random_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """Float32 model with every weight random, norms included (HF initialises those to ones,
    which would hide a swapped attn_norm/mlp_norm)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` tokens (<unk>, <s>, </s>, w3, w4, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_hf(
    model: transformers.PreTrainedModel,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(out, **kwargs)
    model.to(torch.float32)
    if tokenizer:
        make_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out


def make_hf_checkpoint(out: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                       tokenizer: bool = False, **config: Any) -> Path:
    return save_hf(random_hf_model(hf_config(**config), seed), out, dtype=dtype, max_shard_size=max_shard_size,
                   tokenizer=tokenizer)


def read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder (single file or index + shards) as numpy, dtype kept."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(folder / file, "numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
