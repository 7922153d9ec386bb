"""Orbax checkpoints of the whole train state, with a fallback past damaged checkpoints.

A checkpoint `WORKDIR/checkpoints/<step>/` holds two items:
  state: the train-state pytree (params, opt_state, step, rng, ...) as sharded arrays; every
         process writes its own shards and restores straight into the target shardings.
  data:  the data iterator's JSON state (so the next batch after a resume is the next batch).
Orbax writes into a temporary folder and renames it once complete, so a save cut short by a
kill is never listed. A complete-looking checkpoint whose files were damaged afterwards fails
to restore; `restore_latest` then warns and tries the one before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from openchat_jax.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class Restored:
    step: int
    state: Any
    data_state: dict[str, Any]
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

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, check_finite: bool = True) -> None:
        """Start saving (returns once arrays are copied off the devices; writing goes on in the
        background). A state with a non-finite value is refused: it would poison every resume."""
        if check_finite and not _all_finite(state):
            raise CheckpointError(f"refusing to save step {step}: the train state holds non-finite values")
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True, custom_metadata=self.custom_metadata,
        )

    def custom_metadata_of(self, step: int) -> dict[str, Any]:
        """What `custom_metadata` held when checkpoint `step` was saved ({} if nothing)."""
        return dict(self._manager.metadata(step).custom_metadata or {})

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process was told of a preemption (multi-host safe)."""
        return self._manager.reached_preemption(step)

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """Restore the newest checkpoint that restores cleanly into `abstract_state` (a pytree of
        jax.ShapeDtypeStruct with shardings); None if there is none at all."""
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning("checkpoint %s/%d failed to restore (%s); trying the one before", self.directory, step, reason)
                skipped.append((step, reason))
                continue
            return Restored(step, restored["state"], dict(restored["data"]), skipped)
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
