"""A Hugging Face Llama / Mistral folder read and validated tensor by tensor: headers are read and
every tensor's presence, shape and dtype checked before any data is read; the stacked leaves are
then filled one at a time from memory-mapped safetensors files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import traverse_util
from safetensors import safe_open

from openchat_jax.errors import CheckpointError
from openchat_jax.hf.config_json import llama_config_from_hf
from openchat_jax.hf.weights import DTYPES, INDEX_FILE, SINGLE_FILE, LeafPath, hf_shape, hf_tensor_names, to_jax
from openchat_jax.model import checkpoint_io
from openchat_jax.model.checkpoint_io import read_json
from openchat_jax.model.llama import Params

# Buffers some older checkpoints carry; recomputed from rope_theta, so safe to ignore.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


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
            want = hf_shape(path[-1], self.cfg)
            if shape != want:
                raise CheckpointError(f"{where}: tensor {name} has shape {shape}, config.json implies {want}")
            if dtype not in DTYPES:
                raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}; supported: {sorted(DTYPES)}")
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
        return DTYPES[self.tensors[name][1]]

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
                        out[layer] = to_jax(path[-1], self.read(name), cfg)
            else:
                name = next(n for n, p, _ in names if p == path)
                out = to_jax(path[0], self.read(name), cfg)
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
