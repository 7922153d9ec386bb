"""Checkpointer: round trip into shardings, keep-K, refuse non-finite, skip damaged checkpoints."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openchat_jax.errors import CheckpointError
from openchat_jax.train.checkpointing import Checkpointer


def _state(scale: float, mesh: Mesh):
    sharding = NamedSharding(mesh, P("fsdp", None))
    params = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * scale, sharding), "b": jnp.full((4,), scale)}
    return {
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),
        "step": jnp.asarray(int(scale), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(scale))),
    }


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2)
    for step in (2, 4, 6):
        ckpt.save(step, _state(float(step), mesh), {"epoch": 0, "batches": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # keep=2
    restored = ckpt.restore_latest(_abstract(_state(0.0, mesh)))
    assert restored.step == 6 and restored.data_state == {"epoch": 0, "batches": 6} and restored.skipped == []
    assert _equal(restored.state, _state(6.0, mesh))
    assert restored.state["params"]["w"].sharding == NamedSharding(mesh, P("fsdp", None))
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path: Path, mesh):
    assert Checkpointer(str(tmp_path / "none"), save_every=1).restore_latest(_abstract(_state(0.0, mesh))) is None


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path: Path, mesh, caplog):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3)
    ckpt.save(1, _state(1.0, mesh), {"batches": 1})
    ckpt.save(2, _state(2.0, mesh), {"batches": 2})
    ckpt.close()
    damaged = [p for p in (tmp_path / "ckpt" / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert damaged
    for p in damaged:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # truncate every file
    fresh = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3)
    with caplog.at_level("WARNING"):
        restored = fresh.restore_latest(_abstract(_state(0.0, mesh)))
    assert restored.step == 1 and restored.data_state == {"batches": 1}
    assert [s for s, _ in restored.skipped] == [2]
    assert _equal(restored.state, _state(1.0, mesh))
    assert any("failed to restore" in r.message for r in caplog.records)


def test_all_damaged_is_a_clear_error(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(1, _state(1.0, mesh), {})
    ckpt.close()
    for p in (tmp_path / "ckpt" / "1" / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint .* restores"):
        Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(_abstract(_state(0.0, mesh)))


def test_non_finite_state_is_never_saved(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    bad = _state(1.0, mesh)
    bad["params"]["b"] = bad["params"]["b"].at[0].set(jnp.nan)
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.save(1, bad, {})
    ckpt.close()
    assert ckpt.all_steps() == []


def test_bad_options_fail_before_work(tmp_path: Path):
    with pytest.raises(CheckpointError, match="save_every"):
        Checkpointer(str(tmp_path), save_every=0)
