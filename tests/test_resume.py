"""Runs that survive interruptions, through `openchat-jax train` in subprocesses on a prepared dataset:
exact resume after SIGKILL, SIGTERM saves and resumes exactly, a damaged newest checkpoint is
skipped, non-finite batches are skipped and N in a row stop the run naming the step."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from openchat_jax.data.prepare import prepare
from openchat_jax.errors import OpenChatError
from openchat_jax.model.checkpoint_io import load_params
from openchat_jax.train.checkpointing import Checkpointer
from openchat_jax.train.config import base_config
from openchat_jax.train.loop import build_run, make_checkpointer, train
from openchat_jax.train.metrics import read_metrics
from tests.test_train_loop import FakeLoader, fake_batches
from tests.tokenizer_fixture import tiny_tokenizer_dir, write_sharegpt_conversations  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]
SEQ = 64
STEPS = 10
SLOW_ENV = "OPENCHAT_TEST_SLOW_AFTER_STEP"  # read by the config file below, never by the library

# The config file every subprocess runs. With SLOW_ENV=n it makes each step after step n take a
# second longer (by wrapping the batch placement), so a test can land a signal while the run is
# still going; the library itself has no test hook.
CONFIG_FILE = """\
import os, time
from pathlib import Path
from tests.test_resume import resume_config

_slow_after = int(os.environ.get({slow_env!r}, "0"))
if _slow_after:
    from openchat_jax.train import mesh as _mesh
    _place, _calls = _mesh.global_batch, [0]

    def _slow_global_batch(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] > _slow_after:
            time.sleep(1.0)
        return _place(*args, **kwargs)

    _mesh.global_batch = _slow_global_batch


def get_config():
    return resume_config(Path({tok!r}), Path({dataset!r}), Path({workdir!r}))
"""


def resume_config(tok_dir: Path, dataset_dir: Path, workdir: Path):
    config = base_config("tiny")
    config.model.update(vocab_size=0, embed=32, mlp=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    config.data.tokenizer = str(tok_dir)
    config.data.dataset_dir = str(dataset_dir)
    config.data.max_length = SEQ
    config.data.num_workers = 1
    config.data.label_field = "model"
    config.workdir = str(workdir)
    config.train.update(global_batch_size=8, num_steps=STEPS, lr=3e-3, warmup_ratio=0.2, progress=False,
                        tensorboard=False)
    config.checkpoint.update(save_every=5, keep=3)
    return config


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer_dir, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("resume_data")
    write_sharegpt_conversations(root / "conv.jsonl", 40)
    config = resume_config(tiny_tokenizer_dir, root / "dataset", root / "unused")
    config.data.files = [str(root / "conv.jsonl")]
    prepare(config.data)
    return root / "dataset"


def _env(slow_after: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(SLOW_ENV, None)
    if slow_after:
        env[SLOW_ENV] = str(slow_after)
    return env


def _write_config(tok: Path, dataset: Path, workdir: Path) -> Path:
    path = workdir.parent / f"{workdir.name}_cfg.py"
    path.write_text(CONFIG_FILE.format(slow_env=SLOW_ENV, tok=str(tok), dataset=str(dataset), workdir=str(workdir)))
    return path


def _command(config_file: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "openchat-jax"), "train", "--config", str(config_file)]


def _run(config_file: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(config_file), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _start_slow(config_file: Path, slow_after: int) -> subprocess.Popen:
    return subprocess.Popen(_command(config_file), cwd=REPO, env=_env(slow_after), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _committed(ckpt_dir: Path, step: int) -> bool:
    # Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once complete.
    return (ckpt_dir / str(step)).is_dir()


def _params(workdir: Path) -> list[np.ndarray]:
    params, _ = load_params(str(workdir / "final"))
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tiny_tokenizer_dir, dataset, tmp_path_factory):  # noqa: F811
    """The uninterrupted 10-step run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _run(_write_config(tiny_tokenizer_dir, dataset, workdir))
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [5, 10]
    return workdir, _losses(rows), _params(workdir)


def _assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_sigkill_after_step5_checkpoint_then_restart_is_exact(tiny_tokenizer_dir, dataset, reference, tmp_path):  # noqa: F811
    """SIGKILL after the step-5 checkpoint; the restarted run continues exactly as an uninterrupted one."""
    _, ref_losses, ref_params = reference
    workdir = tmp_path / "run"
    config_file = _write_config(tiny_tokenizer_dir, dataset, workdir)
    proc = _start_slow(config_file, slow_after=5)
    _wait_for(lambda: _committed(workdir / "checkpoints", 5), proc, "the step-5 checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["5"]
    assert not (workdir / "final").exists()
    before = len(read_metrics(workdir))

    restarted = _run(config_file)
    assert "resumed from step 5" in restarted.stderr
    rows = read_metrics(workdir)[before:]
    assert [r["step"] for r in rows] == [6, 7, 8, 9, 10]
    assert [r["loss"] for r in rows] == [ref_losses[s] for s in range(6, 11)]  # bitwise (JSON round trip)
    _assert_bitwise_equal(_params(workdir), ref_params)


def test_sigterm_saves_and_the_run_resumes_exactly(tiny_tokenizer_dir, dataset, reference, tmp_path):  # noqa: F811
    """SIGTERM mid-run (not at a save step) -> checkpoint at the stop step, exit 0."""
    _, ref_losses, ref_params = reference
    workdir = tmp_path / "run"
    config_file = _write_config(tiny_tokenizer_dir, dataset, workdir)
    proc = _start_slow(config_file, slow_after=5)
    _wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 6, proc,
              "step 6's metrics")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    stopped_at = int(out.strip().splitlines()[-1].removeprefix("stopped at step "))
    assert 6 <= stopped_at < STEPS
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [5, stopped_at]
    assert not (workdir / "final").exists()
    before = len(read_metrics(workdir))

    restarted = _run(config_file)
    assert f"resumed from step {stopped_at}" in restarted.stderr
    rows = read_metrics(workdir)[before:]
    assert [r["step"] for r in rows] == list(range(stopped_at + 1, STEPS + 1))
    assert [r["loss"] for r in rows] == [ref_losses[s] for s in range(stopped_at + 1, STEPS + 1)]
    _assert_bitwise_equal(_params(workdir), ref_params)


def test_damaged_newest_checkpoint_is_skipped_by_train(tiny_tokenizer_dir, dataset, reference, tmp_path, caplog):  # noqa: F811
    """A damaged newest checkpoint: checkpoint 10 truncated -> warning, resume from 5."""
    ref_dir, ref_losses, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
    files = [p for p in (workdir / "checkpoints" / "10" / "state").rglob("*") if p.is_file() and p.stat().st_size]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    config = resume_config(tiny_tokenizer_dir, dataset, workdir)
    with caplog.at_level("WARNING"):
        result = train(config, checkpointer=make_checkpointer(config), save_final=False)
    assert any("10 failed to restore" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in result.history] == [6, 7, 8, 9, 10] and result.steps_done == 10
    # In-process (the pytest process's matmul settings), so close rather than bitwise.
    np.testing.assert_allclose([r["loss"] for r in result.history], [ref_losses[s] for s in range(6, 11)], rtol=1e-5)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "10.damaged", "5"]
    restored = Checkpointer(str(workdir / "checkpoints"), save_every=5).restore_latest(
        build_run(config).abstract_state())
    assert restored.step == 10 and restored.skipped == []  # the damaged one was overwritten by a good one


# -- non-finite batches, on synthetic batches -----------------------------------------------------


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    config = base_config("tiny")
    config.model.update(vocab_size=0, embed=32, mlp=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    config.data.max_length = 32
    config.workdir = str(tmp_path_factory.mktemp("fake_run"))
    config.train.update(global_batch_size=8, num_steps=4, lr=1e-3, progress=False, max_nonfinite_in_a_row=2,
                        tensorboard=False)
    return build_run(config, loader=FakeLoader(fake_batches(4)))


def _poisoned(b):  # a target outside the vocabulary: its log-probability is nan
    t = b["targets"].copy()
    t[b["weights"] > 0] = 10_000
    return dict(b, targets=t)


def _with(run, batches, workdir: Path):
    import dataclasses

    config = dataclasses.replace(run.config, workdir=str(workdir))
    return dataclasses.replace(run, config=config, loader=FakeLoader(batches), total_steps=len(batches))


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nonfinite_batch_leaves_state_unchanged_and_the_run_continues(fake_run, tmp_path):
    batches = fake_batches(4, seed=3)
    one = _with(fake_run, batches[:1], tmp_path / "one")  # same schedule (built for 4 steps)
    after_one = train(one.config, run=one, save_final=False).state

    poisoned = [batches[0], _poisoned(batches[1]), batches[2], batches[3]]
    run = _with(fake_run, poisoned, tmp_path / "run")
    seen = []
    original = run.step_fn

    def spy(state, batch):
        seen.append(jax.device_get(state))
        return original(state, batch)

    run.step_fn = spy
    ckpt = make_checkpointer(run.config)
    result = train(run.config, run=run, checkpointer=ckpt, save_final=False)
    assert [r["nonfinite"] for r in result.history] == [0, 1, 0, 0]
    assert [r["nonfinite_total"] for r in result.history] == [0, 1, 1, 1]
    assert result.steps_done == 4
    # The state entering step 3 (after the skipped step 2) is the state after step 1.
    assert _tree_equal(seen[2]["params"], after_one["params"])
    assert _tree_equal(seen[2]["opt_state"], after_one["opt_state"])
    assert not _tree_equal(result.state["params"], after_one["params"])  # later steps trained
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [4]


def test_nonfinite_steps_in_a_row_stop_with_the_step_and_no_bad_checkpoint(fake_run, tmp_path):
    batches = fake_batches(4, seed=4)
    run = _with(fake_run, [batches[0], _poisoned(batches[1]), _poisoned(batches[2]), batches[3]], tmp_path / "run")
    with pytest.raises(OpenChatError, match=r"step 3: 2 non-finite steps in a row \(train.max_nonfinite_in_a_row=2\)"):
        train(run.config, run=run, checkpointer=make_checkpointer(run.config))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_stop_right_after_a_periodic_save_does_not_save_the_step_twice(fake_run, tmp_path):
    class StopAfter:
        def __init__(self, loader, after):
            self.loader, self.after = loader, after

        def __bool__(self):
            return self.loader.k >= self.after

    run = _with(fake_run, fake_batches(4, seed=5), tmp_path / "run")
    config = dataclasses.replace(run.config, checkpoint=dataclasses.replace(run.config.checkpoint, save_every=2))
    run.config = config
    result = train(config, run=run, checkpointer=make_checkpointer(config), stop=StopAfter(run.loader, 2))
    assert result.stopped and result.steps_done == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
