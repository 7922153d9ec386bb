"""Model shapes; field names are the logical axes in docs/architecture.md (embed, heads, kv_heads, head_dim, mlp)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from openchat_jax.errors import ConfigError
from openchat_jax.model.attention import backend_names

REMAT_POLICIES = ("none", "full", "dots", "minimal")
ROPE_TYPES = ("default", "linear", "llama3")  # transformers' rope_type names
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    embed: int = 4096  # hidden size
    mlp: int = 11008  # intermediate size
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    # Rotary frequency scaling as transformers' rope_parameters: "linear" divides every frequency by
    # rope_factor; "llama3" divides those of wavelength > original / low_freq_factor by it and
    # blends the band up to original / high_freq_factor.
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    # > 0 (Mistral): a query at slot i sees only the keys at slots > i - sliding_window.
    sliding_window: int = 0
    # The LM head is the embedding table (transposed): no lm_head weight.
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "full"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of attention.backend_names(): auto = splash on TPU, cudnn on GPU, else xla
    # The platform the model computes on, one of PLATFORMS: "cpu" runs model/cpu.py's kernels, "tpu"
    # and "gpu" the plain forward; "auto" = jax's default backend. It also resolves attention="auto".
    platform: str = "auto"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even (rotary embeddings)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"model.rope_type={self.rope_type!r}: choose one of {ROPE_TYPES}")
        if self.rope_factor <= 0:
            raise ConfigError(f"model.rope_factor={self.rope_factor} must be > 0")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be > "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor} (rope_type llama3)"
            )
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 0 (0: no window)")
        if self.platform not in PLATFORMS:
            raise ConfigError(f"model.platform={self.platform!r}: choose one of {PLATFORMS}")
        if self.attention not in backend_names():
            raise ConfigError(f"model.attention={self.attention!r}: choose one of {backend_names()}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not a dtype") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def resolved_platform(self) -> str:
        return jax.default_backend() if self.platform == "auto" else self.platform

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        per_layer = (
            2 * self.embed  # two RMSNorm scales
            + self.embed * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)  # q, o, k, v
            + 3 * self.embed * self.mlp
        )
        embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * self.embed
        return self.num_layers * per_layer + embeddings + self.embed

    def to_config_dict(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dataclasses.asdict(self))

    @classmethod
    def from_config_dict(cls, cfg: ml_collections.ConfigDict | dict) -> "LlamaConfig":
        values = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields: {unknown}; known: {sorted(known)}")
        return cls(**values)


# Llama-2 shapes from the paper (Touvron et al. 2023, Table 1) and the released config.json files.
LLAMA2_7B = LlamaConfig(embed=4096, mlp=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
LLAMA2_13B = LlamaConfig(embed=5120, mlp=13824, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128)
LLAMA2_70B = LlamaConfig(embed=8192, mlp=28672, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128)
# The bases of openchat-3.5 and openchat-3.6, as their released config.json files (Mistral-7B-v0.1:
# sliding window 4096; Meta-Llama-3-8B: rope theta 5e5, no rope scaling, which Llama-3.1 adds).
MISTRAL_7B = LlamaConfig(
    vocab_size=32000, embed=4096, mlp=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
    max_position_embeddings=32768, sliding_window=4096,
)
LLAMA3_8B = LlamaConfig(
    vocab_size=128256, embed=4096, mlp=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
    rope_theta=500000.0, max_position_embeddings=8192,
)
# Trains on one CPU in minutes; vocab_size is set from the tokenizer by the configs that use it.
TINY = LlamaConfig(
    vocab_size=512, embed=128, mlp=344, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
    max_position_embeddings=2048, dtype="float32", remat_policy="none",
)

PRESETS = {
    "llama2_7b": LLAMA2_7B, "llama2_13b": LLAMA2_13B, "llama2_70b": LLAMA2_70B, "mistral_7b": MISTRAL_7B,
    "llama3_8b": LLAMA3_8B, "tiny": TINY,
}
