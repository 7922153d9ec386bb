"""Orbax checkpoints of the whole train state, with a fallback past damaged checkpoints.

A checkpoint `WORKDIR/checkpoints/<step>/` holds two items:
  state: the train-state pytree (params, opt_state, step, rng, ...) as sharded arrays; every
         process writes its own shards and restores straight into the target shardings.
  data:  the data iterator's state, one `process_<i>-of-<n>.json` per process, written and read
         by grain's orbax CheckpointHandler (`get_state()`/`set_state()` on the iterator), so the
         next batch after a resume is the next batch on every process.
Orbax writes into a temporary folder and renames it once complete, so a save cut short by a
kill is never listed. A complete-looking checkpoint whose files were damaged afterwards fails
to restore; `restore_latest` then warns and tries the one before. A data state written by another
number of processes, or in the older single-file format, is an error naming the file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from openchat_jax.errors import CheckpointError, OpenChatError

log = logging.getLogger(__name__)

PROCESS_FILE = re.compile(r"process_\d+-of-(?P<count>\d+)\.json")  # grain's handler's file names
OLD_DATA_FILE = "metadata"  # ocp.args.JsonSave's file: the data state of checkpoints before per-process files


@dataclass
class Restored:
    step: int
    state: Any
    skipped: list[tuple[int, str]]  # (step, reason) for each newer checkpoint that failed


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]).all()


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.inexact)]
    return bool(_finite_flags(leaves)) if leaves else True  # compiled once per state structure


class Checkpointer:
    """Asynchronous saves every `save_every` steps (and on demand), keeping the newest `keep`."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every <= 0:
            raise CheckpointError(f"checkpoint.save_every must be > 0, got {save_every}")
        if keep <= 0:
            raise CheckpointError(f"checkpoint.keep must be > 0, got {keep}")
        self.directory = str(directory)
        self.save_every = save_every
        self.custom_metadata: dict[str, Any] | None = None  # JSON saved with every checkpoint (the classes)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, loader: grain.DatasetIterator, *, check_finite: bool = True) -> None:
        """Start saving (returns once arrays are copied off the devices and this process's `loader`
        state is written; the arrays are written in the background). A state with a non-finite
        value is refused: it would poison every resume."""
        if check_finite and not _all_finite(state):
            raise CheckpointError(f"refusing to save step {step}: the train state holds non-finite values")
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=grain.checkpoint.CheckpointSave(loader)),
            force=True, custom_metadata=self.custom_metadata,
        )

    def custom_metadata_of(self, step: int) -> dict[str, Any]:
        """What `custom_metadata` held when checkpoint `step` was saved ({} if nothing)."""
        return dict(self._manager.metadata(step).custom_metadata or {})

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process was told of a preemption (multi-host safe)."""
        return self._manager.reached_preemption(step)

    def _check_data_files(self, step: int) -> None:
        """Raise if checkpoint `step` holds no data state for this process for a reason that an older
        checkpoint would not fix (a missing or damaged file is left to the restore: it falls back)."""
        item = epath.Path(self.directory) / str(step) / "data"
        names = sorted(p.name for p in item.iterdir()) if item.is_dir() else []
        counts: dict[int, str] = {}  # process count -> its first file
        for name in names:
            if m := PROCESS_FILE.fullmatch(name):
                counts.setdefault(int(m["count"]), name)
        if counts and jax.process_count() not in counts:
            count, name = min(counts.items())
            raise CheckpointError(
                f"{item / name}: the data iterator state was written by {count} processes, this run has "
                f"{jax.process_count()}: resume with the same number of processes")
        if not counts and OLD_DATA_FILE in names:
            raise CheckpointError(
                f"{item / OLD_DATA_FILE}: the data iterator state is in the older single-file format; this "
                "version keeps one process_<i>-of-<n>.json per process and cannot resume from it: resume "
                "with the version that wrote it, or start a new workdir")

    def restore_latest(self, abstract_state: Any, loader: grain.DatasetIterator | None = None) -> Restored | None:
        """Restore the newest checkpoint that restores cleanly into `abstract_state` (a pytree of
        jax.ShapeDtypeStruct with shardings), and set `loader` (if given) to this process's saved
        data state; None if there is no checkpoint at all."""
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if loader is not None:
                self._check_data_files(step)
                items["data"] = grain.checkpoint.CheckpointRestore(loader)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except OpenChatError:  # the loader refused the state (other settings): not damage
                raise
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning("checkpoint %s/%d failed to restore (%s); trying the one before", self.directory, step, reason)
                skipped.append((step, reason))
                continue
            return Restored(step, restored["state"], skipped)
        if skipped:
            raise CheckpointError(
                f"no checkpoint under {self.directory} restores: "
                + "; ".join(f"step {s}: {r}" for s, r in skipped)
            )
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
