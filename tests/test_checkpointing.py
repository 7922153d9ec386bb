"""Checkpointer: round trip into shardings and of the data iterator, keep-K, refuse non-finite, skip
damaged checkpoints, clear errors for data states it cannot use."""

import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
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


def _iterator(position: int = 0) -> grain.DatasetIterator:
    """A grain iterator over 0, 1, 2, ... that has yielded `position` elements."""
    it = iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


def _next_after(position: int) -> int:
    return next(_iterator(position))


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2)
    it = _iterator()
    for step in (2, 4, 6):
        next(it), next(it)
        ckpt.save(step, _state(float(step), mesh), it)
    expected = next(it)  # advancing after the save changes nothing saved
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # keep=2
    # grain's handler: one JSON file per process
    assert json.loads((tmp_path / "ckpt" / "6" / "data" / "process_0-of-1.json").read_text()) == _iterator(6).get_state()
    fresh = _iterator()
    restored = ckpt.restore_latest(_abstract(_state(0.0, mesh)), fresh)
    assert restored.step == 6 and restored.skipped == []
    assert next(fresh) == expected == _next_after(6)
    assert _equal(restored.state, _state(6.0, mesh))
    assert restored.state["params"]["w"].sharding == NamedSharding(mesh, P("fsdp", None))
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path: Path, mesh):
    assert Checkpointer(str(tmp_path / "none"), save_every=1).restore_latest(_abstract(_state(0.0, mesh))) is None


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path: Path, mesh, caplog):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3)
    ckpt.save(1, _state(1.0, mesh), _iterator(1))
    ckpt.save(2, _state(2.0, mesh), _iterator(2))
    ckpt.close()
    damaged = [p for p in (tmp_path / "ckpt" / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert damaged
    for p in damaged:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # truncate every file
    fresh = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3)
    it = _iterator()
    with caplog.at_level("WARNING"):
        restored = fresh.restore_latest(_abstract(_state(0.0, mesh)), it)
    assert restored.step == 1 and next(it) == _next_after(1)
    assert [s for s, _ in restored.skipped] == [2]
    assert _equal(restored.state, _state(1.0, mesh))
    assert any("failed to restore" in r.message for r in caplog.records)


def test_all_damaged_is_a_clear_error(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(1, _state(1.0, mesh), _iterator())
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
        ckpt.save(1, bad, _iterator())
    ckpt.close()
    assert ckpt.all_steps() == []


def test_bad_options_fail_before_work(tmp_path: Path):
    with pytest.raises(CheckpointError, match="save_every"):
        Checkpointer(str(tmp_path), save_every=0)


def test_damaged_data_state_falls_back_to_previous(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3)
    ckpt.save(1, _state(1.0, mesh), _iterator(1))
    ckpt.save(2, _state(2.0, mesh), _iterator(2))
    ckpt.close()
    path = tmp_path / "ckpt" / "2" / "data" / "process_0-of-1.json"
    path.write_text(path.read_text()[:5])
    it = _iterator()
    restored = Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(_abstract(_state(0.0, mesh)), it)
    assert restored.step == 1 and [s for s, _ in restored.skipped] == [2] and next(it) == _next_after(1)


def test_restore_without_an_iterator_restores_the_state_only(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(3, _state(3.0, mesh), _iterator(3))
    ckpt.close()
    restored = Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(_abstract(_state(0.0, mesh)))
    assert restored.step == 3 and _equal(restored.state, _state(3.0, mesh))


def test_data_state_of_another_process_count_is_a_clear_error(tmp_path: Path, mesh):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(1, _state(1.0, mesh), _iterator(1))
    ckpt.close()
    data = tmp_path / "ckpt" / "1" / "data"
    state = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for i in range(2):  # as two processes write it
        (data / f"process_{i}-of-2.json").write_text(state)
    with pytest.raises(CheckpointError, match=r"process_0-of-2.json: .* written by 2 processes, this run has 1"):
        Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(_abstract(_state(0.0, mesh)), _iterator())
    assert (data / "process_0-of-2.json").exists()  # an error, not a damaged checkpoint set aside


def test_old_single_file_data_state_is_a_clear_error(tmp_path: Path, mesh):
    """Checkpoints whose data item is one JSON document for all processes (ocp.args.JsonSave)."""
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(5.0, mesh)),
                                            data=ocp.args.JsonSave({"iterator": {"next_index": 5}})))
    manager.close()
    old = tmp_path / "ckpt" / "5" / "data" / "metadata"
    assert json.loads(old.read_text()) == {"iterator": {"next_index": 5}}
    with pytest.raises(CheckpointError, match=rf"{old}: .*older single-file format.*new workdir"):
        Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(_abstract(_state(0.0, mesh)), _iterator())
