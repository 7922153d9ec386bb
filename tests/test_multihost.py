"""Acceptance 2 of issue 5: two processes x 4 CPU devices (jax.distributed on localhost, gloo
collectives) train like one process x 8 devices, through a checkpoint saved by the two-process
run and a restore from it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np

from openchat_jax.train.metrics import read_metrics
from tests.test_resume import REPO, _command, _env, _write_config, dataset  # noqa: F401  (pytest fixture)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

# A constant learning rate, so a run of 3 steps is the first 3 steps of a run of 5.
CONSTANT_LR = ["--config.train.warmup_ratio=0.0", "--config.train.end_lr_ratio=1.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(config_file: Path, steps: int) -> list[str]:
    port = _free_port()
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [
        subprocess.Popen(
            _command(config_file) + CONSTANT_LR + [
                f"--config.train.num_steps={steps}", "--coordinator-address", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "\n".join(outs)
    return outs


def test_two_processes_match_one_process_through_save_and_restore(tiny_tokenizer_dir, dataset, tmp_path):  # noqa: F811
    one_dir = tmp_path / "one"
    proc = subprocess.run(_command(_write_config(tiny_tokenizer_dir, dataset, one_dir)) + CONSTANT_LR
                          + ["--config.train.num_steps=5"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = {r["step"]: r["loss"] for r in read_metrics(one_dir)}
    assert sorted(one) == [1, 2, 3, 4, 5]

    two_dir = tmp_path / "two"
    config_file = _write_config(tiny_tokenizer_dir, dataset, two_dir)
    _two_processes(config_file, steps=3)  # ends with a checkpoint at step 3, written by both processes
    assert (two_dir / "checkpoints" / "3").is_dir()
    outs = _two_processes(config_file, steps=5)  # restores it in both processes
    assert all("resumed from step 3" in out for out in outs), outs
    rows = read_metrics(two_dir)  # only process 0 writes
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert not (two_dir / "metrics.jsonl.1").exists()
    two = [r["loss"] for r in rows]
    np.testing.assert_allclose(two, [one[s] for s in range(1, 6)], rtol=1e-5, atol=1e-5)
    assert os.path.isdir(two_dir / "checkpoints" / "5")
