"""grain loader over a prepared dataset: per-epoch shuffle, per-process shard, packed [B, L] batches.

Batch k of the run (k = epoch * batches_per_epoch + b) is a pure function of (seed, k, process):
the epoch's packing plan (see packing.py) lists rows; global batch b takes rows
[b * B_global, (b + 1) * B_global), and process p takes its B_local = B_global / process_count
consecutive rows of those. The last batch of an epoch is filled up with empty rows (all weights
0) instead of dropping examples, so every process yields the same number of batches. A process
may then get a local batch with no weighted token; the global batch always has some.

Every batch is a dict of numpy arrays, each [B_local, L]:
  tokens       int32    example tokens, pad_id on padding
  targets      int32    next token within the same segment (0 at a segment's last token and on pad)
  weights      float32  loss weight of the target (0 at a segment's last token and on pad)
  segment_ids  int32    1, 2, ... per example in the row; 0 on pad
  positions    int32    0, 1, ... restarting per segment; 0 on pad
  class_ids    int32    class index of the segment (dataset_info classes); -1 on pad

State: the loader is a grain DatasetIterator. `get_state()` is a JSON-serialisable dict (grain's
iterator state plus the settings that must match); `set_state()` on a new loader with the same
settings continues identically. Checkpoints save it per process through grain's orbax handler.
"""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from openchat_jax.data.packing import EpochPlan, plan_epoch
from openchat_jax.data.prepare import INDEX_FILE, load_dataset_info
from openchat_jax.errors import ConfigError, DataError

BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions", "class_ids")


class PackedLoader(grain.DatasetIterator):
    def __init__(self, dataset_dir: str | Path, *, global_batch_size: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 shuffle: bool = True, num_threads: int = 4, prefetch: int = 8):
        super().__init__()
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ConfigError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                              f"process_count {process_count}")
        if seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.dataset_dir = Path(dataset_dir)
        self.info = load_dataset_info(self.dataset_dir)
        index_path = self.dataset_dir / INDEX_FILE
        try:
            with np.load(index_path) as index:
                self.lengths = index["lengths"].astype(np.int64)
                self.example_class_ids = index["class_ids"].astype(np.int32)
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{index_path}: cannot read the example index ({e})") from None
        if len(self.lengths) != self.info["num_examples"] or len(self.lengths) == 0:
            raise DataError(f"{index_path}: {len(self.lengths)} examples, dataset_info.json says "
                            f"{self.info['num_examples']}")
        longest = int(self.lengths.max())
        if longest > seq_len:
            raise ConfigError(f"seq_len {seq_len} is shorter than the longest prepared example ({longest} tokens); "
                              f"prepare with data.max_length <= {seq_len}")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seq_len, self.seed, self.shuffle = seq_len, int(seed), shuffle
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs = num_epochs
        self.pad_id = int(self.info.get("pad_id", 0))
        self._plans: dict[int, EpochPlan] = {}
        self._lock = threading.Lock()
        self._source = None
        self.rows_per_epoch = self.plan(0).num_rows
        self.batches_per_epoch = math.ceil(self.rows_per_epoch / global_batch_size)
        self.num_batches = None if num_epochs is None else self.batches_per_epoch * num_epochs
        dataset = grain.MapDataset.range(self.num_batches if self.num_batches is not None else sys.maxsize)
        self._dataset = dataset.map(self.batch)
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = None  # created on first use: a loader built only for batches_per_epoch reads nothing

    @property
    def _iter(self):
        if self._it is None:
            # Open the TFDS source here, in the calling thread: opening it first inside grain's
            # reader threads races with TFDS's lazy imports ("'LazyModule' object is not callable").
            _ = self.source
            self._it = iter(self._dataset.to_iter_dataset(self._read_options))
        return self._it

    # -- plans -------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = plan_epoch(self.lengths, self.seq_len, self.seed, epoch, self.shuffle)
                if self._plans and plan.num_rows != self.rows_per_epoch:  # FFD row count is shuffle-free
                    raise AssertionError(f"epoch {epoch}: {plan.num_rows} rows, expected {self.rows_per_epoch}")
                for old in [e for e in self._plans if e < epoch - 1]:
                    del self._plans[old]
                self._plans[epoch] = plan
            return plan

    def local_rows(self, k: int) -> list[np.ndarray]:
        """Example indices of each of this process's rows in batch k (empty arrays for pad rows)."""
        epoch, b = divmod(k, self.batches_per_epoch)
        plan = self.plan(epoch)
        first = b * self.global_batch_size + self.process_index * self.local_batch_size
        empty = np.zeros(0, np.int64)
        return [plan.row(r) if r < plan.num_rows else empty for r in range(first, first + self.local_batch_size)]

    # -- batches -----------------------------------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            from openchat_jax.data.tfds_builder import open_data_source

            with self._lock:
                if self._source is None:
                    self._source = open_data_source(self.dataset_dir)
        return self._source

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Batch k of this process (random access; what the iterator yields at step k)."""
        if self.num_batches is not None and not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range [0, {self.num_batches})")
        rows = self.local_rows(k)
        wanted = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        records = self._read(wanted.tolist())
        return pack_rows([[records[i] for i in items.tolist()] for items in rows], self.seq_len, self.pad_id)

    def _read(self, indices: list[int]) -> dict[int, dict[str, Any]]:
        if not indices:
            return {}
        src = self.source
        got = src.__getitems__(indices) if hasattr(src, "__getitems__") else [src[i] for i in indices]
        out = {}
        for i, rec in zip(indices, got):
            if len(rec["tokens"]) != self.lengths[i]:
                raise DataError(f"{self.dataset_dir}: record {i} has {len(rec['tokens'])} tokens, index says "
                                f"{self.lengths[i]} (dataset and index.npz disagree; prepare again)")
            out[i] = rec
        return out

    # -- iteration and state -----------------------------------------------------------------
    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def start_prefetch(self) -> None:
        self._iter.start_prefetch()

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "process_index": self.process_index, "process_count": self.process_count,
                "num_examples": int(len(self.lengths)), "shuffle": self.shuffle}

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self._iter.get_state(), **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise ConfigError("loader state does not match this loader (saved, current): "
                              + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in mismatched.items()))
        _ = self.source
        self._it = iter(self._dataset.to_iter_dataset(self._read_options))
        self._it.set_state(state["iterator"])


def pack_rows(rows: Sequence[Sequence[Mapping[str, Any]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch (see the module docstring) with one row per entry of `rows`, each a list of records
    {"tokens", "weights", "class_id"} placed one after the other."""
    B, L = len(rows), seq_len
    out = {
        "tokens": np.full((B, L), pad_id, np.int32),
        "targets": np.zeros((B, L), np.int32),
        "weights": np.zeros((B, L), np.float32),
        "segment_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, L), np.int32),
        "class_ids": np.full((B, L), -1, np.int32),
    }
    arange = np.arange(L, dtype=np.int32)
    for r, records in enumerate(rows):
        off = 0
        for seg, rec in enumerate(records, start=1):
            tok, w = rec["tokens"], rec["weights"]
            n = len(tok)
            end = off + n
            out["tokens"][r, off:end] = tok
            out["targets"][r, off:end - 1] = tok[1:]
            out["weights"][r, off:end - 1] = w[1:]
            out["segment_ids"][r, off:end] = seg
            out["positions"][r, off:end] = arange[:n]
            out["class_ids"][r, off:end] = rec["class_id"]
            off = end
    return out


def make_loader(dataset_dir: str | Path, *, global_batch_size: int, seq_len: int, seed: int,
                process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                shuffle: bool = True, num_threads: int = 4, prefetch: int = 8) -> PackedLoader:
    """See the module docstring. `batches_per_epoch`, `num_batches` (None when endless) and `info`
    (dataset_info.json) are attributes of the returned loader."""
    return PackedLoader(dataset_dir, global_batch_size=global_batch_size, seq_len=seq_len, seed=seed,
                        process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                        shuffle=shuffle, num_threads=num_threads, prefetch=prefetch)
