"""The JAX-side weights folder: what `convert hf-to-jax` writes, what training writes as its final
output, and what `convert jax-to-hf` and generation read.

Layout of a weights folder DIR (a local path or gs://...):
  DIR/model_config.json    LlamaConfig fields (dataclasses.asdict); param_dtype = stored dtype
  DIR/params/<leaf>/       one orbax PyTree checkpoint per leaf of the params dict, named by its
                           dotted path (embed, blocks.wq, ..., lm_head; `llama.param_specs` layout),
                           holding {"value": array}
  DIR/special_tokens.json  optional: {"bos_token_id", "eos_token_id", "pad_token_id", "eot_token_id"}
  DIR/hf_config.json       optional: the source HF config.json, so export keeps its extra fields
  DIR/tokenizer/           optional: HF tokenizer files (with <|end_of_turn|> after --add-eot)

Why orbax and not safetensors for this side: the writer is usually a training job on a TPU pod
slice whose params are sharded jax.Arrays spread over many hosts. Orbax lets every process write
only its own shards (no gather onto one host), restores straight into any target sharding (each
host reads only the slices it needs) and works on gs://. safetensors would need a gather to one
writer and has no gs:// support.

Why one checkpoint per leaf: orbax copies a whole pytree to host memory before writing it, so
saving the converted model in one call would hold it twice. Saved leaf by leaf (`save_param_leaves`)
a conversion holds at most a couple of stacked leaves, and readers restore one leaf at a time
(`iter_params`): a 13B model never needs two full copies in host memory. model_config.json is
written last, so a folder without it is an unfinished save.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from openchat_jax.errors import CheckpointError, ConfigError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import Params, param_specs

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
SPECIAL_TOKENS = "special_tokens.json"
HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer"
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "eot_token_id")

LeafPath = tuple[str, ...]


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def expected_shapes(cfg: LlamaConfig) -> dict[LeafPath, tuple[int, ...]]:
    """Leaf path (e.g. ("blocks", "wq")) -> shape, in `param_specs` order."""
    out: dict[LeafPath, tuple[int, ...]] = {}
    for name, spec in param_specs(cfg).items():
        if _is_spec(spec):
            out[(name,)] = spec[0]
        else:
            for sub, s in spec.items():
                out[(name, sub)] = s[0]
    return out


def _check_tree(flat: dict[LeafPath, Any], cfg: LlamaConfig, where: str) -> None:
    expected = expected_shapes(cfg)
    missing = [".".join(p) for p in expected if p not in flat]
    extra = [".".join(p) for p in flat if p not in expected]
    if missing or extra:
        raise CheckpointError(f"{where}: params do not match model_config (missing {missing}, unexpected {extra})")
    for path, shape in expected.items():
        if tuple(flat[path].shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {'.'.join(path)} has shape {tuple(flat[path].shape)}, expected {shape} from the model config"
            )


def _write_json(path: epath.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: epath.Path | Path) -> Any:
    """The JSON value in `path` (local or gs://); a CheckpointError naming the file, and the line
    where it is malformed, when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _leaf_dir(root: epath.Path, path: LeafPath) -> epath.Path:
    leaf = root / PARAMS / ".".join(path)
    # orbax refuses relative paths ("Checkpoint path should be absolute"); cloud paths already are.
    return leaf if "://" in str(leaf) else epath.Path(os.path.abspath(leaf))


def save_params(
    ckpt_dir: str,
    params: Params,
    cfg: LlamaConfig,
    *,
    special_tokens: dict[str, int | None] | None = None,
    copy_assets_from: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write a weights folder. `params` may hold numpy arrays or (sharded) jax.Arrays; with several
    processes every process must call this (each writes its own shards). `copy_assets_from`, another
    weights folder (e.g. the one training started from), supplies special_tokens.json, hf_config.json
    and tokenizer/ unless given here. model_config.json records the stored dtype as param_dtype when
    all leaves share one."""
    flat = traverse_util.flatten_dict(params)
    _check_tree(flat, cfg, str(ckpt_dir))
    save_param_leaves(
        ckpt_dir, ((p, flat[p]) for p in expected_shapes(cfg)), cfg,
        special_tokens=special_tokens, copy_assets_from=copy_assets_from, overwrite=overwrite,
    )


def save_param_leaves(
    ckpt_dir: str,
    leaves: Iterable[tuple[LeafPath, Any]],
    cfg: LlamaConfig,
    *,
    special_tokens: dict[str, int | None] | None = None,
    copy_assets_from: str | None = None,
    overwrite: bool = False,
) -> None:
    """`save_params` for leaves produced one at a time ((path, array) pairs, e.g. ("blocks", "wq")),
    each written and released before the next is asked for."""
    root = epath.Path(ckpt_dir)
    if (root / PARAMS).exists() and not overwrite:
        raise CheckpointError(f"{root / PARAMS} already exists: choose another --out, or pass --overwrite to replace it")
    primary = jax.process_index() == 0
    if primary:
        if (root / MODEL_CONFIG).exists():
            (root / MODEL_CONFIG).unlink()  # an overwrite is unfinished until the new one is written
        if (root / PARAMS).exists():
            (root / PARAMS).rmtree()
        (root / PARAMS).mkdir(parents=True, exist_ok=True)
    _sync(f"mkdir:{root}")

    expected = expected_shapes(cfg)
    dtypes: set[np.dtype] = set()
    done: list[LeafPath] = []
    ckpt = _checkpointer()
    for path, value in leaves:
        name = ".".join(path)
        if path not in expected or path in done:
            raise CheckpointError(f"{root}: unexpected or repeated tensor {name}")
        if tuple(value.shape) != expected[path]:
            raise CheckpointError(
                f"{root}: tensor {name} has shape {tuple(value.shape)}, expected {expected[path]} from the model config"
            )
        ckpt.save(_leaf_dir(root, path), args=ocp.args.PyTreeSave({"value": value}))
        dtypes.add(np.dtype(value.dtype))
        done.append(path)
        del value
    missing = [".".join(p) for p in expected if p not in done]
    if missing:
        raise CheckpointError(f"{root}: params do not match model_config (missing {missing})")
    if len(dtypes) == 1:
        cfg = cfg.replace(param_dtype=str(dtypes.pop()))

    if primary:
        source = epath.Path(copy_assets_from) if copy_assets_from else None
        if special_tokens is None and source is not None and (source / SPECIAL_TOKENS).exists():
            special_tokens = read_json(source / SPECIAL_TOKENS)
        if special_tokens is not None:
            unknown = sorted(set(special_tokens) - set(SPECIAL_TOKEN_KEYS))
            if unknown:
                raise CheckpointError(f"special_tokens: unknown keys {unknown}; known: {list(SPECIAL_TOKEN_KEYS)}")
            _write_json(root / SPECIAL_TOKENS, {k: special_tokens.get(k) for k in SPECIAL_TOKEN_KEYS})
        if source is not None:
            if (source / HF_CONFIG).exists():
                (source / HF_CONFIG).copy(root / HF_CONFIG, overwrite=True)
            if (source / TOKENIZER).is_dir():
                (root / TOKENIZER).mkdir(parents=True, exist_ok=True)
                for f in (source / TOKENIZER).iterdir():
                    f.copy(root / TOKENIZER / f.name, overwrite=True)
        _write_json(root / MODEL_CONFIG, dataclasses.asdict(cfg))  # last: marks the folder complete
    _sync(f"done:{root}")


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"openchat_jax.save_params:{tag}")


def read_model_config(ckpt_dir: str) -> LlamaConfig:
    path = epath.Path(ckpt_dir) / MODEL_CONFIG
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no {MODEL_CONFIG} (not a weights folder written by save_params / convert hf-to-jax)")
    try:
        return LlamaConfig.from_config_dict(read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_special_tokens(ckpt_dir: str) -> dict[str, int | None]:
    """bos/eos/pad/eot token ids recorded with the weights ({} when none were recorded)."""
    path = epath.Path(ckpt_dir) / SPECIAL_TOKENS
    return read_json(path) if path.exists() else {}


def read_hf_config(ckpt_dir: str) -> dict[str, Any] | None:
    path = epath.Path(ckpt_dir) / HF_CONFIG
    return read_json(path) if path.exists() else None


def tokenizer_dir(ckpt_dir: str) -> epath.Path | None:
    path = epath.Path(ckpt_dir) / TOKENIZER
    return path if path.is_dir() else None


def stored_metadata(ckpt_dir: str, cfg: LlamaConfig | None = None) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    """Shape and dtype of every stored leaf (no tensor data read), checked against the model config."""
    cfg = read_model_config(ckpt_dir) if cfg is None else cfg
    root = epath.Path(ckpt_dir)
    ckpt = _checkpointer()
    flat: dict[LeafPath, jax.ShapeDtypeStruct] = {}
    for path in expected_shapes(cfg):
        leaf_dir = _leaf_dir(root, path)
        if not leaf_dir.exists():
            raise CheckpointError(f"{root}: missing tensor {'.'.join(path)} (no {PARAMS}/{'.'.join(path)}/)")
        try:
            meta = ckpt.metadata(leaf_dir).item_metadata.tree["value"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
            raise CheckpointError(f"{leaf_dir}: cannot read the orbax checkpoint metadata ({type(e).__name__}: {e})") from None
        flat[path] = jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
    _check_tree(flat, cfg, str(root / PARAMS))
    return flat


def _restore_leaf(ckpt: ocp.Checkpointer, root: epath.Path, path: LeafPath, args: ocp.RestoreArgs) -> Any:
    try:
        return ckpt.restore(_leaf_dir(root, path), args=ocp.args.PyTreeRestore(restore_args={"value": args}))["value"]
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged data
        raise CheckpointError(f"{_leaf_dir(root, path)}: cannot restore tensor {'.'.join(path)} ({type(e).__name__}: {e})") from None


def load_params(
    ckpt_dir: str,
    shardings: Any = None,
    *,
    dtype: Any = None,
) -> tuple[Params, LlamaConfig]:
    """Restore (params, cfg). Without `shardings`, leaves come back as host numpy arrays. With
    `shardings` (one jax.sharding.Sharding for every leaf, or a pytree of them shaped like params),
    each process reads only its slices straight into those shardings. `dtype` casts on restore
    (e.g. float32 master weights from a bfloat16 checkpoint); the returned cfg says what came back."""
    cfg = read_model_config(ckpt_dir)
    meta = stored_metadata(ckpt_dir, cfg)
    if shardings is None:
        flat_shard: dict[LeafPath, Any] = {p: None for p in meta}
    elif isinstance(shardings, jax.sharding.Sharding):
        flat_shard = {p: shardings for p in meta}
    else:
        flat_shard = traverse_util.flatten_dict(shardings)
        if set(flat_shard) != set(meta):
            raise CheckpointError(f"load_params({ckpt_dir}): shardings tree does not match the params tree")

    root, ckpt = epath.Path(ckpt_dir), _checkpointer()
    flat: dict[LeafPath, Any] = {}
    for path, m in meta.items():
        if flat_shard[path] is None:
            args: ocp.RestoreArgs = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        else:
            args = ocp.ArrayRestoreArgs(sharding=flat_shard[path], global_shape=m.shape, dtype=dtype)
        flat[path] = _restore_leaf(ckpt, root, path, args)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=str(np.dtype(dtype)))
    return traverse_util.unflatten_dict(flat), cfg


def iter_params(ckpt_dir: str, cfg: LlamaConfig | None = None) -> Iterator[tuple[LeafPath, np.ndarray]]:
    """Yield (leaf path, host numpy array) one leaf at a time, in `param_specs` order, so a caller
    that streams leaves out holds at most one stacked leaf in memory."""
    cfg = read_model_config(ckpt_dir) if cfg is None else cfg
    meta = stored_metadata(ckpt_dir, cfg)
    root, ckpt = epath.Path(ckpt_dir), _checkpointer()
    for path in meta:
        yield path, _restore_leaf(ckpt, root, path, ocp.RestoreArgs(restore_type=np.ndarray))
