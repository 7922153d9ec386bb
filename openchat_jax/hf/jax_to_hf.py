"""`convert jax-to-hf`: our weights folder -> an HF LlamaForCausalLM / MistralForCausalLM folder,
restoring one stacked leaf at a time and writing shard by shard. The chat files come after, from
`hf.chat_files`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from openchat_jax.errors import CheckpointError, ConfigError
from openchat_jax.hf.config_json import hf_config_from_llama
from openchat_jax.hf.weights import DTYPES, INDEX_FILE, SINGLE_FILE, hf_shape, hf_tensor_names, to_hf
from openchat_jax.model import checkpoint_io

DEFAULT_MAX_SHARD_SIZE = "5GB"


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
    generation_config.json are openchat_jax.hf.chat_files' (the CLI calls it afterwards)."""
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
        if cast not in DTYPES.values():
            raise ConfigError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    max_bytes = parse_size(max_shard_size)

    names = list(hf_tensor_names(cfg))
    sizes = []
    for name, path, _ in names:
        itemsize = (cast or meta[path].dtype).itemsize
        sizes.append((name, int(np.prod(hf_shape(path[-1], cfg))) * itemsize))
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
            w = to_hf(path[-1], leaf if layer is None else leaf[layer], cfg)
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
