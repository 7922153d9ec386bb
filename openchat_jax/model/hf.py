"""HF <-> JAX checkpoints for Llama and Mistral (transformers' LlamaForCausalLM /
MistralForCausalLM layout, safetensors).

Both directions work tensor by tensor: headers are read and every tensor's presence, shape and
dtype checked before any data is read; import fills one stacked leaf at a time from memory-mapped
safetensors files, and export restores one stacked leaf at a time and writes shard by shard, so a
13B model never needs two full copies in host memory. Tensors keep their dtype (float32, bfloat16
or float16), so HF -> JAX -> HF is bit for bit.

Weight mapping (HF [out, in] matrices; ours [in, ...out] with layers stacked on axis 0):
  model.embed_tokens.weight [V, E]          -> embed [V, E]
  layers.i.input_layernorm.weight [E]       -> blocks.attn_norm[i]
  layers.i.self_attn.q_proj.weight [H*D, E] -> blocks.wq[i] = W.T.reshape(E, H, D)   (k, v: K heads)
  layers.i.self_attn.o_proj.weight [E, H*D] -> blocks.wo[i] = W.T.reshape(H, D, E)
  layers.i.post_attention_layernorm.weight  -> blocks.mlp_norm[i]
  layers.i.mlp.{gate,up}_proj.weight [M, E] -> blocks.w_{gate,up}[i] = W.T
  layers.i.mlp.down_proj.weight [E, M]      -> blocks.w_down[i] = W.T
  model.norm.weight [E]                     -> final_norm
  lm_head.weight [V, E]                     -> lm_head = W.T   (neither, with tie_word_embeddings)
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from openchat_jax.errors import CheckpointError, ConfigError
from openchat_jax.model import checkpoint_io
from openchat_jax.model.checkpoint_io import read_json
from openchat_jax.model.config import ROPE_TYPES, LlamaConfig
from openchat_jax.model.llama import Params

EOT_TOKEN = "<|end_of_turn|>"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"

_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
# Buffers some older checkpoints carry; recomputed from rope_theta, so safe to ignore.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

LeafPath = tuple[str, ...]
# HF per-layer name suffix -> our stacked leaf under `blocks`, in HF's usual order.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}


# ----------------------------------------------------------------------------- tensor mapping


def _hf_shape(leaf: str, cfg: LlamaConfig) -> tuple[int, ...]:
    E, H, K, D, M, V = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp, cfg.vocab_size
    return {
        "embed": (V, E), "final_norm": (E,), "lm_head": (V, E), "attn_norm": (E,), "mlp_norm": (E,),
        "wq": (H * D, E), "wk": (K * D, E), "wv": (K * D, E), "wo": (E, H * D),
        "w_gate": (M, E), "w_up": (M, E), "w_down": (E, M),
    }[leaf]


def _to_jax(leaf: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    E, H, K, D = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if leaf == "wq":
        return w.T.reshape(E, H, D)
    if leaf in ("wk", "wv"):
        return w.T.reshape(E, K, D)
    if leaf == "wo":
        return w.T.reshape(H, D, E)
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    return w


def _to_hf(leaf: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    E = cfg.embed
    if leaf in ("wq", "wk", "wv"):
        w = w.reshape(E, -1).T
    elif leaf == "wo":
        w = w.reshape(-1, E).T
    elif leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        w = w.T
    return np.ascontiguousarray(w)


def hf_tensor_names(cfg: LlamaConfig) -> Iterator[tuple[str, LeafPath, int | None]]:
    """(HF name, our leaf path, layer index or None) for every tensor, leaf by leaf in param_specs order."""
    for path in checkpoint_io.expected_shapes(cfg):
        if path[0] == "blocks":
            suffix = next(s for s, leaf in _LAYER_NAMES.items() if leaf == path[1])
            for i in range(cfg.num_layers):
                yield f"model.layers.{i}.{suffix}", path, i
        else:
            yield next(n for n, leaf in _TOP_NAMES.items() if leaf == path[0]), path, None


# ----------------------------------------------------------------------------- config.json


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


# ----------------------------------------------------------------------------- reading HF folders


class HFCheckpoint:
    """A validated HF Llama folder: config.json plus safetensors (single file or index + shards).
    Construction reads only JSON and safetensors headers."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        config_path = self.dir / "config.json"
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such folder")
        if not config_path.is_file():
            raise CheckpointError(f"{self.dir}: no config.json (expected a Hugging Face model folder)")
        self.hf_config = read_json(config_path)
        self.cfg = llama_config_from_hf(self.hf_config, str(config_path))
        self.weight_map = self._weight_map()
        self.tensors = self._headers()  # name -> (shape, dtype)
        self._validate()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).is_file():
                    raise CheckpointError(f"{index}: lists shard {file}, which does not exist in {self.dir}")
            return dict(weight_map)
        if (self.dir / SINGLE_FILE).is_file():
            with safe_open(self.dir / SINGLE_FILE, "numpy") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        others = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.safetensors"))
        raise CheckpointError(
            f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found"
            + (f" (found {others[:3]}; only safetensors with the standard names are read)" if others else "")
        )

    def _headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for file, names in by_file.items():
            try:
                with safe_open(self.dir / file, "numpy") as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise CheckpointError(f"{self.dir / file}: tensor {name} listed in {INDEX_FILE} is not in this file")
                        sl = f.get_slice(name)
                        out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
                raise CheckpointError(f"{self.dir / file}: cannot read safetensors header ({e})") from None
        return out

    def _validate(self) -> None:
        expected = {name: (path, layer) for name, path, layer in hf_tensor_names(self.cfg)}
        listing = self.dir / (INDEX_FILE if (self.dir / INDEX_FILE).is_file() else SINGLE_FILE)
        for name, (path, _) in expected.items():
            if name not in self.tensors:
                raise CheckpointError(f"{listing}: missing tensor {name}")
            where = self.dir / self.weight_map[name]
            shape, dtype = self.tensors[name]
            want = _hf_shape(path[-1], self.cfg)
            if shape != want:
                raise CheckpointError(f"{where}: tensor {name} has shape {shape}, config.json implies {want}")
            if dtype not in _DTYPES:
                raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}; supported: {sorted(_DTYPES)}")
        if self.cfg.tie_embeddings and "lm_head.weight" in self.tensors:
            # Some tied checkpoints store the head too; transformers ties it to the embedding (drops it).
            if self.tensors["lm_head.weight"] != self.tensors["model.embed_tokens.weight"] or not np.array_equal(
                self.read("lm_head.weight"), self.read("model.embed_tokens.weight")
            ):
                raise CheckpointError(
                    f"{self.dir / self.weight_map['lm_head.weight']}: lm_head.weight differs from "
                    "model.embed_tokens.weight, but config.json has tie_word_embeddings=true"
                )
        extra = sorted(
            n for n in self.tensors
            if n not in expected and not _IGNORED.fullmatch(n) and not (self.cfg.tie_embeddings and n == "lm_head.weight")
        )
        if extra:
            raise CheckpointError(
                f"{self.dir / self.weight_map[extra[0]]}: unexpected tensor {extra[0]}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + " for a Llama/Mistral without biases (biases/extra heads are unsupported)"
            )
        for path in checkpoint_io.expected_shapes(self.cfg):
            dtypes = {self.tensors[n][1] for n, p, _ in hf_tensor_names(self.cfg) if p == path}
            if len(dtypes) > 1:
                raise CheckpointError(f"{self.dir}: layers of {'.'.join(path)} mix dtypes {sorted(dtypes)}")

    def leaf_dtype(self, path: LeafPath) -> np.dtype:
        name = next(n for n, p, _ in hf_tensor_names(self.cfg) if p == path)
        return _DTYPES[self.tensors[name][1]]

    def read(self, name: str) -> np.ndarray:
        with safe_open(self.dir / self.weight_map[name], "numpy") as f:
            return f.get_tensor(name)

    def leaves(self, *, add_eot: bool = False) -> Iterator[tuple[LeafPath, np.ndarray]]:
        """Our stacked leaves one at a time; with add_eot, embed and lm_head get one more vocab entry
        initialised to the mean (in float32) of the existing ones."""
        cfg = self.cfg
        names = list(hf_tensor_names(cfg))
        for path, shape in checkpoint_io.expected_shapes(cfg).items():
            dtype = self.leaf_dtype(path)
            if path[0] == "blocks":
                out = np.empty(shape, dtype)
                for name, p, layer in names:
                    if p == path:
                        out[layer] = _to_jax(path[-1], self.read(name), cfg)
            else:
                name = next(n for n, p, _ in names if p == path)
                out = _to_jax(path[0], self.read(name), cfg)
                if add_eot and path[0] in ("embed", "lm_head"):
                    out = _append_mean(out, axis=0 if path[0] == "embed" else 1)
                else:
                    out = np.ascontiguousarray(out)
            yield path, out

    def params(self, *, add_eot: bool = False) -> Params:
        return traverse_util.unflatten_dict(dict(self.leaves(add_eot=add_eot)))


def _append_mean(w: np.ndarray, axis: int) -> np.ndarray:
    mean = np.mean(w, axis=axis, dtype=np.float32, keepdims=True).astype(w.dtype)
    return np.concatenate([w, mean], axis=axis)


# ----------------------------------------------------------------------------- tokenizer files


def _find_token_id(tokenizer_dir: Path, token: str) -> int | None:
    """The id of an added token, from tokenizer.json or added_tokens.json (None if absent)."""
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        for added in read_json(tj).get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
    at = tokenizer_dir / "added_tokens.json"
    if at.is_file() and token in (mapping := read_json(at)):
        return int(mapping[token])
    return None


def _write_tokenizer(src: Path, dst: Path, eot_id: int | None, add_eot: bool) -> None:
    """Save the source tokenizer (its own pipeline; see `data.tokenizer.save_tokenizer`) into `dst`,
    with <|end_of_turn|> registered as added special token `eot_id` when `add_eot`."""
    from openchat_jax.data.tokenizer import load_tokenizer, read_tokenizer, save_tokenizer

    if not add_eot:
        save_tokenizer(read_tokenizer(src), dst)
        return
    tokenizer, ref_id = load_tokenizer(src)  # adds the token at the next free id
    if ref_id != eot_id:
        raise CheckpointError(
            f"{src}: the tokenizer would give {EOT_TOKEN} id {ref_id}, but the embedding's new row is {eot_id} "
            f"(the tokenizer has {len(tokenizer) - 1} tokens, config.json vocab_size={eot_id})"
        )
    save_tokenizer(tokenizer, dst)
    written, got_id = load_tokenizer(dst)
    probe = [f"Hello{EOT_TOKEN}world {EOT_TOKEN} GPT4 User: 2 + 2?"]
    if got_id != eot_id or written(probe).input_ids != tokenizer(probe).input_ids:
        raise CheckpointError(f"{src}: adding {EOT_TOKEN} to the tokenizer files changed how it tokenizes")


# ----------------------------------------------------------------------------- the two directions


def import_hf(hf_dir: str, out_dir: str, *, add_eot: bool = False, overwrite: bool = False) -> LlamaConfig:
    """HF Llama folder -> weights folder (see checkpoint_io). Returns the written model config."""
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.cfg
    src = Path(hf_dir)
    tokenizer_files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    existing_eot = _find_token_id(src, EOT_TOKEN) if tokenizer_files else None
    if add_eot:
        if existing_eot is not None:
            raise CheckpointError(f"{src}: the tokenizer already has {EOT_TOKEN} (id {existing_eot}); drop --add-eot")
        eot_id: int | None = cfg.vocab_size
        cfg = cfg.replace(vocab_size=cfg.vocab_size + 1)
    else:
        eot_id = existing_eot
        if eot_id is not None and eot_id >= cfg.vocab_size:
            raise CheckpointError(
                f"{src}: tokenizer id {eot_id} of {EOT_TOKEN} is outside the embedding (vocab_size={cfg.vocab_size}); use --add-eot"
            )
    out = epath.Path(out_dir)
    if (out / checkpoint_io.PARAMS).exists() and not overwrite:
        raise CheckpointError(f"{out / checkpoint_io.PARAMS} already exists: choose another --out, or pass --overwrite to replace it")
    if any(f in tokenizer_files for f in ("tokenizer.json", "tokenizer.model")):
        with tempfile.TemporaryDirectory() as tmp:
            # Before the weights: a tokenizer that disagrees must fail before minutes of conversion.
            _write_tokenizer(src, Path(tmp), eot_id, add_eot)
            (out / checkpoint_io.TOKENIZER).mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                epath.Path(f).copy(out / checkpoint_io.TOKENIZER / f.name, overwrite=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / checkpoint_io.HF_CONFIG).write_text(json.dumps(ckpt.hf_config, indent=2) + "\n")
    special = {k: ckpt.hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special["eot_token_id"] = eot_id
    # Leaf by leaf: each stacked leaf is built, written and dropped before the next.
    checkpoint_io.save_param_leaves(str(out), ckpt.leaves(add_eot=add_eot), cfg, special_tokens=special, overwrite=overwrite)
    return checkpoint_io.read_model_config(str(out))


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, '1000' -> 1000 bytes (as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"max shard size {size!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ConfigError(f"max shard size {size!r} must be > 0")
    return value


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def export_hf(
    ckpt_dir: str,
    out_dir: str,
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Weights folder -> HF LlamaForCausalLM folder (config.json, safetensors sharded above
    `max_shard_size` with model.safetensors.index.json, tokenizer files). `dtype` casts (e.g.
    'bfloat16' for float32 training output); None keeps the stored dtype. Returns the files
    written. Holds one stacked leaf plus one shard in memory. Chat template and
    generation_config.json are openchat_jax.infer.export's (the CLI calls it afterwards)."""
    cfg = checkpoint_io.read_model_config(ckpt_dir)
    meta = checkpoint_io.stored_metadata(ckpt_dir, cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: folder exists and is not empty: choose another --out, or pass --overwrite to write into it")
    cast = None
    if dtype is not None:
        try:
            cast = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        except TypeError:
            raise ConfigError(f"dtype {dtype!r}: choose float32, bfloat16 or float16") from None
        if cast not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    max_bytes = parse_size(max_shard_size)

    names = list(hf_tensor_names(cfg))
    sizes = []
    for name, path, _ in names:
        itemsize = (cast or meta[path].dtype).itemsize
        sizes.append((name, int(np.prod(_hf_shape(path[-1], cfg))) * itemsize))
    shards = _plan_shards(sizes, max_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {name: files[i] for i, shard in enumerate(shards) for name in shard}
    pending: dict[str, dict[str, np.ndarray]] = {f: {} for f in files}
    wanted = {files[i]: len(shard) for i, shard in enumerate(shards)}

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:  # an overwrite must not mix old shards in
        stale.unlink(missing_ok=True)
    written: list[Path] = []
    for path, leaf in checkpoint_io.iter_params(ckpt_dir, cfg):
        if cast is not None:
            leaf = leaf.astype(cast, copy=False)
        for name, p, layer in names:
            if p != path:
                continue
            w = _to_hf(path[-1], leaf if layer is None else leaf[layer], cfg)
            file = file_of[name]
            pending[file][name] = w
            if len(pending[file]) == wanted[file]:
                save_file(pending.pop(file), str(out / file), metadata={"format": "pt"})
                written.append(out / file)
        del leaf
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": dict(sorted(file_of.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / INDEX_FILE)

    stored = cast or meta[("embed",)].dtype
    hf = hf_config_from_llama(
        cfg, str(stored), base=checkpoint_io.read_hf_config(ckpt_dir), special_tokens=checkpoint_io.read_special_tokens(ckpt_dir)
    )
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    written.append(out / "config.json")
    tok = checkpoint_io.tokenizer_dir(ckpt_dir)
    if tok is not None:
        for f in tok.iterdir():
            f.copy(out / f.name, overwrite=True)
            written.append(out / f.name)
    return written
