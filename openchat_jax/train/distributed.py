"""Multi-process start-up and preemption signals.

`initialize` starts jax.distributed when the run spans processes: explicit flags win; on TPU pod
slices and under SLURM (SLURM_NTASKS > 1) JAX detects the cluster itself; otherwise the run is
single-process and nothing is started. `StopSignal` turns SIGTERM/SIGINT into a flag that the
train loop polls between steps, so a preempted run saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax

from openchat_jax.errors import ConfigError


def _on_cluster() -> bool:
    """True where jax.distributed can configure itself: SLURM with several tasks, Cloud TPU VMs
    (pod slices read the worker list from the metadata server, not the environment), GKE, MPI."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)
    if slurm_tasks > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        return True
    try:  # JAX's own detectors (private API: fall back to the checks above if it moves)
        from jax._src.clusters import ClusterEnv

        return any(
            env.is_env_present() for env in ClusterEnv._cluster_types
            if not getattr(env, "opt_in_only_method", False) and env.__name__ != "SlurmCluster"
        )
    except Exception:  # noqa: BLE001
        return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
) -> bool:
    """Start jax.distributed if needed; returns True when the run is multi-process."""
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError(
                "multi-process flags go together: --coordinator-address, --num-processes and --process-id"
            )
        if not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise ConfigError(f"--process-id {process_id} is outside [0, --num-processes {num_processes})")
        if num_processes == 1:
            return False
        if cpu_collectives or jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _on_cluster():
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


class StopSignal:
    """Set by SIGTERM (preemption) or SIGINT; the previous handlers are restored by `close`."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
