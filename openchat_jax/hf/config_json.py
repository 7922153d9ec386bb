"""HF config.json <-> LlamaConfig, for transformers 4.x and 5.x Llama and Mistral configs."""

from __future__ import annotations

from typing import Any

from openchat_jax.errors import CheckpointError, ConfigError
from openchat_jax.model.config import ROPE_TYPES, LlamaConfig

# transformers' model_type -> the architecture it loads as; both are this forward pass (Mistral
# adds the sliding window, which transformers applies whenever config.sliding_window is set).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# transformers' MistralConfig default when config.json has no sliding_window key.
_MISTRAL_DEFAULT_WINDOW = 4096
_ROPE_SCALING_KEYS = {
    "linear": {"factor": "rope_factor"},
    "llama3": {
        "factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_position_embeddings",
    },
}


def _unsupported(where: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: unsupported {what} (openchat-jax implements transformers' LlamaForCausalLM and "
        "MistralForCausalLM without biases, with default, linear or llama3 rope scaling)"
    )


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """LlamaConfig's rope fields from `rope_parameters` (transformers 5) or `rope_theta` +
    `rope_scaling` (4.x); a type we do not compute, or a missing parameter, is named."""
    # transformers 5 lets rope_scaling override rope_parameters when a config.json has both.
    params = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise _unsupported(where, f"{key} of type {kind!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(where, f"{key}.partial_rotary_factor={params['partial_rotary_factor']}")
    fields: dict[str, Any] = {
        "rope_type": kind, "rope_theta": float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0),
    }
    for name, field in _ROPE_SCALING_KEYS.get(kind, {}).items():
        if params.get(name) is None:
            raise CheckpointError(f"{where}: {key} of type {kind!r} has no {name!r}")
        fields[field] = params[name]
    return fields


def llama_config_from_hf(hf: dict[str, Any], where: str) -> LlamaConfig:
    """LlamaConfig from a transformers config.json dict (4.x or 5.x) of a Llama or Mistral model;
    anything we would compute differently from transformers is refused with an 'unsupported'
    error naming the field."""
    archs, model_type = hf.get("architectures"), hf.get("model_type")
    if model_type not in ARCHITECTURES or (archs is not None and ARCHITECTURES[model_type] not in archs):
        raise CheckpointError(
            f"{where}: not a Llama or Mistral checkpoint (model_type={model_type!r}, architectures={archs}); "
            f"expected model_type and architectures among {ARCHITECTURES}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _unsupported(where, f"{flag}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(where, f"hidden_act={hf['hidden_act']!r}")
    if "quantization_config" in hf:
        raise _unsupported(where, "quantization_config (quantized weights)")
    if hf.get("layer_types"):
        raise _unsupported(where, "layer_types (per-layer attention kinds)")
    window = hf.get("sliding_window", _MISTRAL_DEFAULT_WINDOW) if model_type == "mistral" else None
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {missing}")
    heads = hf["num_attention_heads"]
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            embed=hf["hidden_size"],
            mlp=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            init_std=float(hf.get("initializer_range", 0.02)),
            sliding_window=window or 0,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **_rope_fields(hf, where),
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _rope_parameters(cfg: LlamaConfig) -> dict[str, Any]:
    """transformers' rope_parameters for cfg (its `rope_scaling` in 4.x, less rope_theta)."""
    params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    for name, field in _ROPE_SCALING_KEYS.get(cfg.rope_type, {}).items():
        params[name] = getattr(cfg, field)
    return params


def hf_config_from_llama(
    cfg: LlamaConfig, dtype: str, *, base: dict[str, Any] | None = None, special_tokens: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A LlamaForCausalLM (MistralForCausalLM with a sliding window, or when `base` is one)
    config.json that transformers 4.x and 5.x read; keeps `base`'s other fields."""
    hf = dict(base or {})
    model_type = "mistral" if cfg.sliding_window or hf.get("model_type") == "mistral" else "llama"
    rope = _rope_parameters(cfg)
    hf.update(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed, intermediate_size=cfg.mlp, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std, rope_theta=cfg.rope_theta, rope_parameters=rope,
        rope_scaling=None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, dtype=dtype,
    )
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window or None
        for key in ("attention_bias", "mlp_bias"):
            hf.pop(key, None)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if special_tokens and special_tokens.get(key) is not None:
            hf[key] = special_tokens[key]
    return hf
