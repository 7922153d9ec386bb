"""Packing and the grain loader: every record once per epoch, reproducible batches, resumable state.

Batches are checked against the prepared records themselves (read back from the data source),
not against the packing plan: every segment must be one whole record, every record must appear
exactly once per epoch across all processes, and targets/weights/positions follow from the record."""

from __future__ import annotations

import json
from collections import Counter

import jax
import numpy as np
import pytest

from openchat_jax.data.config import data_defaults
from openchat_jax.data.loader import BATCH_KEYS, make_loader
from openchat_jax.data.packing import first_fit_decreasing, plan_epoch
from openchat_jax.data.prepare import prepare
from openchat_jax.data.tfds_builder import open_data_source
from openchat_jax.errors import ConfigError
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

SEQ_LEN = 128
GLOBAL_BATCH = 8
WORDS = "the sea is blue what two plus four thank you for help write a short poem about sky wind".split()


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("loader_data")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(150):
        turns = [" ".join(rng.choice(WORDS, int(rng.integers(1, 25)))) for _ in range(2 * int(rng.integers(1, 3)))]
        roles = ["human", "gpt"]
        lines.append(json.dumps({"conversations": [{"from": roles[k % 2], "value": t} for k, t in enumerate(turns)],
                                 "source": "Model: GPT-4" if i % 3 == 0 else "other"}))
    path = tmp / "convs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    d = data_defaults()
    d.files, d.tokenizer, d.dataset_dir = [str(path)], str(tiny_tokenizer_dir), str(tmp / "prepared")
    d.max_length, d.num_workers = 100, 1
    report = prepare(d)
    assert report["examples"] == 150
    src = open_data_source(tmp / "prepared")
    records = [src[i] for i in range(len(src))]
    return tmp / "prepared", records


def loader(path, **kw):
    args = dict(global_batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, seed=7, num_epochs=2, num_threads=2, prefetch=2)
    args.update(kw)
    return make_loader(path, **args)


def segments(batch, records_by_tokens):
    """Checks one batch row by row against the records; returns the record index of each segment."""
    out = []
    B, L = batch["tokens"].shape
    assert (B, L)[1] == SEQ_LEN
    for key in BATCH_KEYS:
        assert batch[key].shape == (B, L)
    assert batch["weights"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in BATCH_KEYS if k != "weights")
    for r in range(B):
        seg = batch["segment_ids"][r]
        used = int(np.count_nonzero(seg))
        assert (seg[used:] == 0).all(), "padding only at the end of a row"
        pad = slice(used, L)
        assert (batch["tokens"][r, pad] == 0).all() and (batch["targets"][r, pad] == 0).all()
        assert (batch["weights"][r, pad] == 0).all() and (batch["class_ids"][r, pad] == -1).all()
        assert (batch["positions"][r, pad] == 0).all()
        ids = seg[:used]
        n_seg = int(ids.max()) if used else 0
        assert np.array_equal(np.unique(ids), np.arange(1, n_seg + 1))
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all(), "each segment is contiguous"
        for s in range(1, n_seg + 1):
            (where,) = np.nonzero(seg == s)
            toks = batch["tokens"][r, where]
            matches = records_by_tokens.get(tuple(toks.tolist()))
            assert matches, "a segment is exactly one whole record (never split across rows)"
            rec_i = matches[0]
            rec = records_by_tokens["__records__"][rec_i]
            n = len(where)
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(n))
            np.testing.assert_array_equal(batch["targets"][r, where[:-1]], rec["tokens"][1:])
            np.testing.assert_array_equal(batch["weights"][r, where[:-1]], rec["weights"][1:])
            assert batch["targets"][r, where[-1]] == 0 and batch["weights"][r, where[-1]] == 0
            assert (batch["class_ids"][r, where] == rec["class_id"]).all()
            out.append(tuple(toks.tolist()))
    return out


def index_records(records):
    by_tokens: dict = {"__records__": records}
    for i, rec in enumerate(records):
        by_tokens.setdefault(tuple(rec["tokens"].tolist()), []).append(i)
    return by_tokens


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_each_example_once_per_epoch_across_processes(dataset, process_count):
    path, records = dataset
    by_tokens = index_records(records)
    want = Counter(tuple(r["tokens"].tolist()) for r in records)
    per_process = []
    for p in range(process_count):
        ld = loader(path, process_index=p, process_count=process_count)
        assert ld.local_batch_size == GLOBAL_BATCH // process_count
        batches = list(ld)
        assert len(batches) == ld.num_batches == 2 * ld.batches_per_epoch
        per_process.append(batches)
    bpe = ld.batches_per_epoch
    assert bpe == -(-ld.rows_per_epoch // GLOBAL_BATCH)
    orders = []
    for epoch in range(2):
        got: Counter = Counter()
        order = []
        for b in range(epoch * bpe, (epoch + 1) * bpe):
            for p in range(process_count):
                segs = segments(per_process[p][b], by_tokens)
                got.update(segs)
                order.extend(segs)
            # the global batch (all processes together) always holds a weighted token
            assert sum(per_process[p][b]["weights"].sum() for p in range(process_count)) > 0
        assert got == want, "every example exactly once per epoch"
        orders.append(order)
    assert orders[0] != orders[1], "epochs differ in order"


def test_same_batches_for_every_process_count_of_threads_and_reruns(dataset):
    path, _ = dataset
    a = list(loader(path, num_epochs=1, num_threads=1))
    b = list(loader(path, num_epochs=1, num_threads=4))
    c = list(loader(path, num_epochs=1, seed=8))
    assert len(a) == len(b)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS), "reproducible"
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c)), "the seed matters"


@pytest.mark.parametrize("k", [0, 3, "epoch_end"])
def test_state_restore_continues_identically(dataset, k):
    path, _ = dataset
    full = loader(path)
    if k == "epoch_end":
        k = full.batches_per_epoch - 1  # the restored run crosses into epoch 2
    reference = list(full)
    first = loader(path)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # JSON round trip
    resumed = loader(path)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - k
    for x, y in zip(rest, reference[k:]):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ConfigError, match="seed"):
        loader(path, seed=99).set_state(state)


def test_checkpointer_saves_the_loader_and_resumes_at_the_next_batch(dataset, tmp_path):
    import jax.numpy as jnp

    from openchat_jax.train.checkpointing import Checkpointer

    path, _ = dataset
    reference = list(loader(path))
    first = loader(path)
    for _ in range(3):
        next(first)
    state = {"step": jnp.asarray(3, jnp.int32)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1)
    ckpt.save(3, state, first)
    ckpt.close()
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
    resumed = loader(path)
    assert Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(abstract, resumed).step == 3
    batch = next(resumed)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(batch[key], reference[3][key])
    # A loader with other settings refuses the state: a ConfigError, not a damaged checkpoint.
    with pytest.raises(ConfigError, match="seed"):
        Checkpointer(str(tmp_path / "ckpt"), save_every=1).restore_latest(abstract, loader(path, seed=99))


def test_loader_config_errors(dataset):
    path, _ = dataset
    with pytest.raises(ConfigError, match="multiple of process_count"):
        loader(path, global_batch_size=6, process_count=4)
    with pytest.raises(ConfigError, match="longest prepared example"):
        loader(path, seq_len=32)
    with pytest.raises(ConfigError, match="process_index"):
        loader(path, process_index=2, process_count=2)


def _naive_ffd(sizes, capacity):
    room, rows = [], []
    for s in sizes:
        for r, x in enumerate(room):
            if x >= s:
                room[r] -= s
                rows.append(r)
                break
        else:
            room.append(capacity - s)
            rows.append(len(room) - 1)
    return rows


def test_first_fit_decreasing_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacity = int(rng.integers(4, 64))
        sizes = np.sort(rng.integers(1, capacity + 1, int(rng.integers(1, 80))))[::-1]
        assert first_fit_decreasing(sizes, capacity).tolist() == _naive_ffd(sizes.tolist(), capacity)


def test_plan_rows_fixed_across_epochs_and_within_capacity():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, 2000)
    plans = [plan_epoch(lengths, 512, seed=1, epoch=e) for e in range(3)]
    assert len({p.num_rows for p in plans}) == 1
    for p in plans:
        assert sorted(p.items.tolist()) == list(range(2000))
        fill = np.add.reduceat(lengths[p.items], p.splits[:-1])
        assert fill.max() <= 512
    assert not np.array_equal(plans[0].items, plans[1].items)
    # FFD is near-optimal here: within 1% of the lower bound ceil(total / capacity)
    assert plans[0].num_rows <= 1.01 * -(-lengths.sum() // 512)
