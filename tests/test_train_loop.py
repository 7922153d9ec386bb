"""The train loop and `openchat-jax train`: end to end on a prepared dataset (fixture tokenizer),
logs and final weights, the conditioned ablation on the batches the step sees, error paths
(all-zero weights, non-finite steps) and the checkpoint/stop seams."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.data.loader import make_loader
from openchat_jax.data.prepare import prepare
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import ConfigError, DataError, OpenChatError
from openchat_jax.model.checkpoint_io import load_params
from openchat_jax.train.config import base_config
from openchat_jax.train.loop import build_run, train
from openchat_jax.train.metrics import read_metrics
from tests.synthetic import packed_batch
from tests.tokenizer_fixture import tiny_tokenizer_dir, write_sharegpt_conversations  # noqa: F401  (pytest fixture)

SEQ = 96


def small_config(tok_dir: Path, files, dataset_dir: Path, workdir: Path, **train):
    config = base_config("tiny")
    config.model.update(vocab_size=0, embed=64, mlp=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    config.data.files = [str(f) for f in files]
    config.data.tokenizer = str(tok_dir)
    config.data.dataset_dir = str(dataset_dir)
    config.data.max_length = SEQ
    config.data.num_workers = 1
    config.data.label_field = "model"
    config.workdir = str(workdir)
    config.train.update(global_batch_size=8, lr=3e-3, warmup_ratio=0.2, progress=False, **train)
    return config


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """60 two-turn conversations from the fixture corpus, labelled GPT-4 or GPT-3.5 by a hash."""
    path = tmp_path_factory.mktemp("conv") / "conv.jsonl"
    return write_sharegpt_conversations(path, 60)


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer_dir, conversations, tmp_path_factory):  # noqa: F811
    out = {}
    for conditioned in (True, False):
        root = tmp_path_factory.mktemp(f"prepared_{conditioned}")
        config = small_config(tiny_tokenizer_dir, [conversations], root / "dataset", root / "run")
        config.train.conditioned = conditioned  # the same field as data.conditioned
        assert config.data.conditioned is conditioned
        report = prepare(config.data)
        assert report["truncated_to_max_length"] == 0  # else the shorter plain prefix keeps more tokens
        out[conditioned] = root / "dataset"
    return out


def test_cli_train_end_to_end(tiny_tokenizer_dir, conversations, prepared, tmp_path, capsys):  # noqa: F811
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.test_train_loop import small_config\n"
        "from pathlib import Path\n"
        f"def get_config():\n    return small_config(Path({str(tiny_tokenizer_dir)!r}), [{str(conversations)!r}], "
        f"Path({str(prepared[True])!r}), Path({str(tmp_path / 'run')!r}))\n"
    )
    rc = cli_main(["train", "--config", str(config_file), "--config.train.num_steps=6", "--config.mesh.fsdp=-1"])
    assert rc == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "accuracy", "class/gpt4/loss", "class/gpt3/loss", "class/gpt4/tokens",
                "class/gpt3/accuracy", "nonfinite", "supervised_tokens"):
        assert all(key in r for r in rows), key
    assert all("tokens_per_second" in r and "mfu" in r for r in rows[1:])  # the first step holds the compile
    assert rows[-1]["loss"] < rows[0]["loss"]
    peak = 3e-3
    assert rows[0]["lr"] == pytest.approx(peak / 1, rel=1e-5)  # warmup = round(0.2 * 6) = 1 step
    assert rows[-1]["lr"] == pytest.approx(0.1 * peak, rel=1e-5)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    params, cfg = load_params(str(tmp_path / "run" / "final"))
    assert cfg.vocab_size == len(load_tokenizer(tiny_tokenizer_dir)[0]) and cfg.num_layers == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    special = json.loads((tmp_path / "run" / "final" / "special_tokens.json").read_text())
    assert special["eot_token_id"] == load_tokenizer(tiny_tokenizer_dir)[1]
    assert (tmp_path / "run" / "final" / "tokenizer" / "tokenizer.json").exists()

    # The startup and closing summaries name every output path; config.json loads back as the config.
    out = capsys.readouterr().out
    run = tmp_path / "run"
    startup, closing = out.split("finished: step 6 of 6")
    for path in (run / "metrics.jsonl", run / "tb", run / "checkpoints", run / "final", run / "config.json"):
        assert str(path) in startup and str(path) in closing, path
    assert f"{cfg.num_params() / 1e6:,.2f}M parameters" in startup
    assert "6 steps = " in startup and "epochs of" in startup and f"8 rows x {SEQ} = {8 * SEQ:,} token slots" in startup
    assert "lr: peak 0.003 (train.lr)" in startup and "mesh: data=1 fsdp=8 tensor=1 over 8 cpu device(s)" in startup
    from openchat_jax.config import load_config_file

    saved = load_config_file(run / "config.json")
    expected = small_config(tiny_tokenizer_dir, [conversations], prepared[True], run)
    expected.train.num_steps = 6
    assert saved.to_dict() == expected.to_dict()
    saved.data.conditioned = False  # still one field with train.conditioned, as in a config file
    assert saved.train.conditioned is False
    # metrics rows: epoch, wall time, real-token throughput next to padded slots
    per_epoch = make_loader(prepared[True], global_batch_size=8, seq_len=SEQ, seed=0).batches_per_epoch
    assert [r["epoch"] for r in rows] == pytest.approx([s / per_epoch for s in range(1, 7)])
    assert all(r["wall_time"] > 1.7e9 and r["elapsed_seconds"] >= 0 for r in rows)
    for r in rows[1:]:
        assert r["tokens"] < 8 * SEQ  # packed rows hold some padding
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["step_seconds"])
        assert r["slots_per_second"] == pytest.approx(8 * SEQ / r["step_seconds"])

    # The same run again, from its config.json: it says it is finished and leaves final/ alone.
    before = {p: p.stat().st_mtime_ns for p in (run / "final").rglob("*")}
    assert cli_main(["train", "--config", str(run / "config.json")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"already finished at step 6; final/ is at {run / 'final'} (left as it is)"
    assert {p: p.stat().st_mtime_ns for p in (run / "final").rglob("*")} == before


def test_cli_bad_override_is_one_line_error(tmp_path, capsys):
    config_file = tmp_path / "cfg.py"
    config_file.write_text("from openchat_jax.train.config import base_config\ndef get_config():\n    return base_config('tiny')\n")
    assert cli_main(["train", "--config", str(config_file), "--config.train.no_such_field=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_field" in err[0]
    assert cli_main(["train", "--config", str(config_file), "--config.workdir=" + str(tmp_path)]) == 2
    assert "dataset_dir" in capsys.readouterr().err


def _supervised_by_class(loader, steps: int) -> dict[int, list[tuple[int, float]]]:
    out: dict[int, list[tuple[int, float]]] = {}
    for _ in range(steps):
        b = next(loader)
        sel = b["weights"] > 0
        for t, w, c in zip(b["targets"][sel], b["weights"][sel], b["class_ids"][sel]):
            out.setdefault(int(c), []).append((int(t), round(float(w), 6)))
    return {c: sorted(v) for c, v in out.items()}


def test_conditioned_false_changes_only_the_template(tiny_tokenizer_dir, prepared):  # noqa: F811
    """data.conditioned=False: over one epoch of batches, the unconditioned dataset has no class
    prefix token, while the supervised (target, weight) pairs of every class are identical."""
    tok, _ = load_tokenizer(tiny_tokenizer_dir)
    prefix_ids = {tok.convert_tokens_to_ids(t) for t in ("▁GPT4", "▁GPT3")}
    assert tok.unk_token_id not in prefix_ids
    loaders = {c: make_loader(d, global_batch_size=8, seq_len=SEQ, seed=0, num_epochs=1) for c, d in prepared.items()}
    steps = loaders[True].batches_per_epoch
    tokens = {c: np.concatenate([loaders[c].batch(k)["tokens"] for k in range(loaders[c].batches_per_epoch)]) for c in loaders}
    assert prefix_ids <= set(np.unique(tokens[True]).tolist())
    assert not prefix_ids & set(np.unique(tokens[False]).tolist())
    sup = {c: _supervised_by_class(iter(loaders[c]), loaders[c].batches_per_epoch) for c in loaders}
    assert steps >= 2 and set(sup[True]) == {0, 1}
    assert sup[True] == sup[False]


def test_train_refuses_dataset_prepared_the_other_way(tiny_tokenizer_dir, conversations, prepared, tmp_path):  # noqa: F811
    config = small_config(tiny_tokenizer_dir, [conversations], prepared[True], tmp_path / "run")
    config.train.conditioned = False
    with pytest.raises(ConfigError, match="prepared with data.conditioned=True"):
        build_run(config)


def test_rows_follow_the_prepared_max_length_unless_overridden(tiny_tokenizer_dir, conversations, prepared, tmp_path):  # noqa: F811
    config = small_config(tiny_tokenizer_dir, [conversations], prepared[True], tmp_path / "run")
    config.data.max_length = 4096  # the default a config file leaves in place: prepare's setting, not train's
    run = build_run(config)
    assert run.seq_len == SEQ and run.loader.seq_len == SEQ and run.seq_len_source == "the dataset's max_length"
    assert run.tokens_per_step == 8 * SEQ

    config.train.seq_len = 2 * SEQ  # an explicit override, reported with the prepared length
    run = build_run(config)
    assert run.seq_len == 2 * SEQ and run.loader.seq_len == 2 * SEQ
    assert run.seq_len_source == f"train.seq_len; the dataset was prepared with max_length={SEQ}"


def test_rows_longer_than_the_models_positions_are_an_error_before_compiling(
        tiny_tokenizer_dir, conversations, prepared, tmp_path, monkeypatch):  # noqa: F811
    import openchat_jax.train.loop as loop

    monkeypatch.setattr(loop, "build_step", lambda *a, **k: pytest.fail("compiled a step"))
    config = small_config(tiny_tokenizer_dir, [conversations], prepared[True], tmp_path / "run")
    config.model.max_position_embeddings = SEQ - 1
    with pytest.raises(ConfigError, match=f"rows of {SEQ} tokens .* longer than the model's "
                                          f"max_position_embeddings={SEQ - 1}.*train.seq_len <= {SEQ - 1}"):
        build_run(config)


# -- loop behaviour on synthetic batches (one compiled run shared) --------------------------------


class FakeLoader(grain.DatasetIterator):
    """The PackedLoader interface over a list of batches."""

    def __init__(self, batches, vocab_size: int = 128):
        super().__init__()
        self.batches = batches
        self.info = {"classes": [{"name": "gpt4", "weight": 1.0}, {"name": "gpt3", "weight": 0.1}],
                     "vocab_size": vocab_size, "conditioned": True}
        self.batches_per_epoch = len(batches)
        self.k = 0
        self.set_states: list[dict] = []

    def __next__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        self.k += 1
        return self.batches[self.k - 1]

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.set_states.append(state)
        self.k = state["k"]


def fake_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [packed_batch(rng, 8, 32, 128) for _ in range(n)]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    config = base_config("tiny")
    config.model.update(vocab_size=0, embed=64, mlp=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    config.data.max_length = 32
    config.workdir = str(tmp_path_factory.mktemp("fake_run"))
    config.train.update(global_batch_size=8, num_steps=6, lr=1e-3, progress=False, max_nonfinite_in_a_row=3,
                        tensorboard=False)
    return build_run(config, loader=FakeLoader(fake_batches(6)))


def with_batches(run, batches, **train):
    config = dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, **train))
    return dataclasses.replace(run, config=config, loader=FakeLoader(batches))


def test_zero_weight_global_batch_is_an_error(fake_run):
    batches = fake_batches(6)
    batches[2] = dict(batches[2], weights=np.zeros_like(batches[2]["weights"]))
    with pytest.raises(DataError, match="step 3: the global batch has no supervised token"):
        train(fake_run.config, run=with_batches(fake_run, batches))


def test_nonfinite_steps_are_skipped_then_stop_the_run(fake_run):
    def poisoned(b):  # a target outside the vocabulary: its log-probability is nan
        t = b["targets"].copy()
        t[b["weights"] > 0] = 10_000
        return dict(b, targets=t)

    batches = fake_batches(6)
    batches[1] = poisoned(batches[1])
    result = train(fake_run.config, run=with_batches(fake_run, batches), save_final=False)
    rows = result.history
    assert [r["nonfinite"] for r in rows] == [0, 1, 0, 0, 0, 0]
    assert rows[-1]["nonfinite_total"] == 1 and result.steps_done == 6
    assert np.isfinite([r["loss"] for r in rows if not r["nonfinite"]]).all()

    batches = fake_batches(6)
    for i in (1, 2, 3):
        batches[i] = poisoned(batches[i])
    with pytest.raises(OpenChatError, match="step 4: 3 non-finite steps in a row"):
        train(fake_run.config, run=with_batches(fake_run, batches))


class FakeCheckpointer:
    def __init__(self, every: int, restore=None):
        self.every, self.restore, self.saved, self.closed = every, restore, [], False

    def restore_latest(self, abstract_state, loader):
        assert jax.tree.structure(abstract_state) is not None
        if self.restore is not None:
            loader.set_state(self.restore.data_state)
        return self.restore

    def due(self, step):
        return step % self.every == 0

    def save(self, step, state, loader):
        self.saved.append((step, jax.device_get(state), loader.get_state()))

    def close(self):
        self.closed = True


class StopAfter:
    def __init__(self, loader, after: int):
        self.loader, self.after = loader, after

    def __bool__(self):
        return self.loader.k >= self.after


def test_checkpoint_and_stop_seams_resume_where_they_left(fake_run):
    batches = fake_batches(6, seed=1)
    straight = train(fake_run.config, run=with_batches(fake_run, batches), save_final=False)

    run = with_batches(fake_run, batches)
    ckpt = FakeCheckpointer(every=2)
    first = train(fake_run.config, run=run, checkpointer=ckpt, stop=StopAfter(run.loader, 3))
    assert first.stopped and first.steps_done == 3 and first.final_dir is None and ckpt.closed
    assert [(s, d) for s, _, d in ckpt.saved] == [(2, {"k": 2}), (3, {"k": 3})]

    @dataclasses.dataclass
    class Restored:
        step: int
        state: object
        data_state: dict

    step, state, data_state = ckpt.saved[-1]
    run = with_batches(fake_run, batches)
    second = train(fake_run.config, run=run, checkpointer=FakeCheckpointer(every=100, restore=Restored(step, state, data_state)))
    assert run.loader.set_states == [{"k": 3}] and second.steps_done == 6
    assert [r["step"] for r in second.history] == [4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in second.history], [r["loss"] for r in straight.history[3:]], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_progress_bar_refreshes_rarely_when_stderr_is_a_log(capsys):
    from openchat_jax.train.metrics import ProgressBar

    import time

    bar = ProgressBar(total=300)
    for step in range(300):  # ~1.5 s: a terminal bar would refresh ~15 times
        time.sleep(0.005)
        bar.update(1, {"loss": 1.0 / (step + 1)})
    bar.close()
    err = capsys.readouterr().err
    refreshes = err.count("\r") + err.count("\n")
    # pytest's captured stderr is not a terminal: the start, maybe one timed refresh, the close.
    assert "300/300" in err and refreshes <= 4, err


@dataclasses.dataclass
class RestoredAt:
    step: int
    state: object
    data_state: dict


def test_resume_refuses_changed_trajectory_settings_unless_allowed(fake_run, tmp_path, caplog):
    batches = fake_batches(6, seed=2)
    config = dataclasses.replace(fake_run.config, workdir=str(tmp_path / "run"))
    run = dataclasses.replace(with_batches(fake_run, batches), config=config)
    ckpt = FakeCheckpointer(every=2)
    train(config, run=run, checkpointer=ckpt, stop=StopAfter(run.loader, 3))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e-3
    step, state, data_state = ckpt.saved[-1]

    def resume(**train_changes):
        changed = dataclasses.replace(config, train=dataclasses.replace(config.train, **train_changes))
        resumed = dataclasses.replace(with_batches(fake_run, batches), config=changed)
        return train(changed, run=resumed, checkpointer=FakeCheckpointer(100, RestoredAt(step, state, data_state)),
                     save_final=False)

    with pytest.raises(ConfigError, match=r"at step 3 .*train\.lr: 0\.001 -> 0\.003.*allow_changed_resume=True"):
        resume(lr=3e-3)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 8 -> 16"):
        resume(global_batch_size=16)
    # Settings that leave the trajectory alone may change.
    assert resume(log_every=2, progress=False).steps_done == 6
    with caplog.at_level("WARNING", logger="openchat_jax.train.loop"):
        result = resume(lr=3e-3, allow_changed_resume=True)
    assert result.steps_done == 6
    assert any("changed settings" in r.message and "train.lr: 0.001 -> 0.003" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 3e-3  # the new baseline


def test_a_finished_run_says_so_and_leaves_final_alone(fake_run, tmp_path):
    config = dataclasses.replace(fake_run.config, workdir=str(tmp_path / "run"))
    ckpt = FakeCheckpointer(every=100)
    lines: list[str] = []
    first = train(config, run=dataclasses.replace(with_batches(fake_run, fake_batches(6)), config=config),
                  checkpointer=ckpt, say=lines.append)
    final = tmp_path / "run" / "final"
    assert first.final_dir == str(final) and not first.already_finished and first.start_step == 0
    assert any(line.startswith("finished: step 6 of 6 (6 steps") for line in lines)
    before = {p: p.stat().st_mtime_ns for p in final.rglob("*")}

    step, state, data_state = ckpt.saved[-1]
    lines.clear()
    again = train(config, run=dataclasses.replace(with_batches(fake_run, fake_batches(6)), config=config),
                  checkpointer=FakeCheckpointer(100, RestoredAt(step, state, data_state)), say=lines.append)
    assert again.already_finished and again.steps_done == 6 and again.final_dir == str(final)
    assert lines == [f"already finished at step 6; final/ is at {final} (left as it is)"]
    assert {p: p.stat().st_mtime_ns for p in final.rglob("*")} == before
