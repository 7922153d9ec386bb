"""When `initialize` starts jax.distributed on its own: the cluster signals read from the
environment (no flags given)."""

from __future__ import annotations

import pytest

from openchat_jax.train import distributed

CLUSTER_VARS = (
    "SLURM_NTASKS", "SLURM_NPROCS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
    "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_SKIP_MDS_QUERY",
)


@pytest.fixture
def bare_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
    return monkeypatch


def test_no_cluster_signal_is_single_process(bare_env):
    assert distributed._on_cluster() is False
    assert distributed.initialize() is False


@pytest.mark.parametrize("name, value", [
    ("SLURM_NTASKS", "2"), ("SLURM_NPROCS", "4"), ("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.1:8080"),
    ("TPU_WORKER_HOSTNAMES", "w0,w1"), ("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1"),
])
def test_cluster_variables_are_detected(bare_env, name, value):
    bare_env.setenv(name, value)
    assert distributed._on_cluster() is True


def test_slurm_with_one_task_stays_single_process(bare_env):
    bare_env.setenv("SLURM_NTASKS", "1")
    assert distributed._on_cluster() is False


def test_cloud_tpu_vm_is_detected_by_its_device_files(bare_env):
    bare_env.setattr(distributed.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert distributed._on_cluster() is True
    bare_env.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert distributed._on_cluster() is False
