"""Two processes x 4 CPU devices (jax.distributed on localhost, gloo
collectives) train like one process x 8 devices, through a checkpoint saved by the two-process
run and a restore from it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from openchat_jax.train.metrics import read_metrics
from tests.test_resume import REPO, SLOW_ENV, _command, _env, _write_config, dataset  # noqa: F401  (pytest fixture)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

# A constant learning rate, so a run of 3 steps is the first 3 steps of a run of 5.
CONSTANT_LR = ["--config.train.warmup_ratio=0.0", "--config.train.end_lr_ratio=1.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(config_file: Path, steps: int, extra: tuple[str, ...] = (), env_extra=None):
    port = _free_port()
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env.update(env_extra or {})
    return [
        subprocess.Popen(
            _command(config_file) + CONSTANT_LR + list(extra) + [
                f"--config.train.num_steps={steps}", "--coordinator-address", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        assert p.returncode == 0, "\n".join(outs)
    return outs


def test_two_processes_match_one_process_through_save_and_restore(tiny_tokenizer_dir, dataset, tmp_path):  # noqa: F811
    one_dir = tmp_path / "one"
    # The one-process reference runs alongside the first two-process run (compiles are single-threaded).
    one_proc = subprocess.Popen(_command(_write_config(tiny_tokenizer_dir, dataset, one_dir)) + CONSTANT_LR
                                + ["--config.train.num_steps=5"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    two_dir = tmp_path / "two"
    config_file = _write_config(tiny_tokenizer_dir, dataset, two_dir)
    # Ends with a checkpoint at step 3, written by both processes.
    _finish(_start_two_processes(config_file, steps=3) + [one_proc])
    one = {r["step"]: r["loss"] for r in read_metrics(one_dir)}
    assert sorted(one) == [1, 2, 3, 4, 5]
    assert (two_dir / "checkpoints" / "3").is_dir()
    # Restores it in both processes. With a constant lr, 3 then 5 steps follow the 5-step run; the
    # changed step count is a changed trajectory setting, so it is allowed explicitly.
    outs = _finish(_start_two_processes(config_file, steps=5, extra=("--config.train.allow_changed_resume=True",)))
    assert all("resumed from step 3" in out for out in outs), outs
    assert all("changed settings (train.allow_changed_resume): resolved.total_steps: 3 -> 5" in out for out in outs)
    rows = read_metrics(two_dir)  # only process 0 writes
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert not (two_dir / "metrics.jsonl.1").exists()
    two = [r["loss"] for r in rows]
    np.testing.assert_allclose(two, [one[s] for s in range(1, 6)], rtol=1e-5, atol=1e-5)
    assert os.path.isdir(two_dir / "checkpoints" / "5")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tiny_tokenizer_dir, dataset, tmp_path):  # noqa: F811
    """Multi-host preemption: only process 1 gets SIGTERM; JAX's preemption service picks a step
    at which both processes save and leave (a local flag would strand the other in a collective)."""
    workdir = tmp_path / "two"
    procs = _start_two_processes(_write_config(tiny_tokenizer_dir, dataset, workdir), steps=10,
                                 env_extra={SLOW_ENV: "3"})
    try:
        deadline = time.monotonic() + 240
        while not ((workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 4):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outs = _finish(procs)
    stopped = {int(out.strip().splitlines()[-1].removeprefix("stopped at step ")) for out in outs}
    assert len(stopped) == 1, outs
    (step,) = stopped
    assert 4 <= step < 10
    assert (workdir / "checkpoints" / str(step)).is_dir()
    assert not (workdir / "final").exists()
