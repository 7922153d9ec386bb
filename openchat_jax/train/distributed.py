"""Multi-process start-up and preemption signals.

`initialize` starts jax.distributed when the run spans processes: explicit flags win; on TPU pod
slices and under SLURM (SLURM_NTASKS > 1) JAX detects the cluster itself; otherwise the run is
single-process and nothing is started. `StopSignal` turns SIGTERM/SIGINT into a flag that the
train loop polls between steps, so a preempted run saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import threading
from types import FrameType

import jax

from openchat_jax.errors import ConfigError


def _on_cluster() -> bool:
    """True where jax.distributed can configure itself: SLURM with several tasks, Open MPI, GKE TPU
    jobs, multislice, Kubernetes with the `kubernetes` client, and Cloud TPU VMs (a pod slice reads
    its worker list from the metadata server, not the environment). JAX's own detectors are private
    (jax._src.clusters), so these are the signals they read, checked here; SLURM with one task is
    left single-process, where JAX would start a one-process coordinator."""
    env = os.environ
    slurm_tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if slurm_tasks > 1:
        return True
    if any(k in env for k in ("MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri")):
        return True
    if "KUBERNETES_SERVICE_HOST" in env and importlib.util.find_spec("kubernetes") is not None:
        return True
    # A Cloud TPU VM exposes its chips as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e and later);
    # TPU_SKIP_MDS_QUERY says there is no metadata server to ask (JAX then skips it too).
    if "TPU_SKIP_MDS_QUERY" in env:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


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
