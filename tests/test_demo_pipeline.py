"""The demo end to end at toy size (data -> prepare -> train -> generate -> score -> table/PNG),
and the full demo / ablation as slow tests."""

from __future__ import annotations

import json

import pytest

from openchat_jax.demo import report
from openchat_jax.demo.config import get_config
from openchat_jax.demo.run import VARIANTS, run_demo, variant_config


def _tiny_config():
    config = get_config()
    config.demo.num_train = 200
    config.demo.num_test = 12
    config.train.num_steps = 6
    config.train.progress = False
    return config


def test_variant_configs_switch_exactly_the_ingredients(tmp_path):
    config = get_config()
    kw = dict(seed=1, train_file=tmp_path / "t.jsonl", tokenizer_dir=tmp_path, dataset_dir=tmp_path / "d",
              workdir=tmp_path / "w")
    seen = {}
    for key, v in VARIANTS.items():
        cfg = variant_config(config, v, **kw)
        seen[key] = (cfg.data.conditioned, cfg.train.conditioned, cfg.train.weighted,
                     [c["name"] for c in cfg.data.classes], cfg.data.default_class)
        assert cfg.seed == 1 and cfg.train.num_steps == config.train.num_steps  # same budget for every variant
    assert seen == {
        "sft_all": (False, False, False, ["expert", "suboptimal"], ""),
        "sft_expert": (False, False, False, ["expert"], ""),
        "no_weights": (True, True, False, ["expert", "suboptimal"], ""),
        "no_conditions": (False, False, True, ["expert", "suboptimal"], ""),
        "crlft": (True, True, True, ["expert", "suboptimal"], ""),
    }
    assert config.data.conditioned is True and config.train.weighted is True  # the base config is untouched


def test_tiny_demo_end_to_end(tmp_path):
    logs: list[str] = []
    results = run_demo(_tiny_config(), tmp_path, variants=("crlft", "no_conditions"), seeds=[0], log=logs.append)
    assert [r.variant for r in results] == ["crlft", "no_conditions"]
    crlft, plain = results
    assert set(crlft.accuracy) == {"expert", "suboptimal"} and set(plain.accuracy) == {"plain"}
    for r in results:
        assert r.steps == 6
        assert [h["step"] for h in r.history] == [6]  # log_every=10: the last step is always logged
        for acc in r.accuracy.values():
            assert 0.0 <= acc["exact_match"] <= 1.0
    assert "class/expert/loss" in crlft.history[-1] and "class/suboptimal/loss" in crlft.history[-1]
    # one answer per held-out question and condition, in the generate command's output format
    for name in ("expert", "suboptimal"):
        lines = (tmp_path / "seed0" / "crlft" / f"answers_{name}.jsonl").read_text().splitlines()
        assert len(lines) == 12 and all("answers" in json.loads(line) for line in lines)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["crlft", "no_conditions"]

    table = report.format_table(results)
    assert "| C-RLFT | ✓ | ✓ | all |" in table
    assert "| C-RLFT w/o class-conditioned policy | ✗ | ✓ | all |" in table and "| – |" in table
    png = report.plot(results, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert any("prepared conditioned" in line for line in logs)
    # Each variant's train call logs its startup and closing summaries with every output path.
    for variant in ("crlft", "no_conditions"):
        workdir = tmp_path / "seed0" / variant
        for name in ("metrics.jsonl", "config.json", "final"):
            assert sum(line.endswith(f": {workdir / name}") for line in logs) == 2, (variant, name)
    assert sum("M parameters" in line for line in logs) == 2
    assert sum(line.strip().startswith("finished: step 6 of 6") for line in logs) == 2


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The default demo (SFT on all data, C-RLFT; one seed): C-RLFT's expert condition beats its
    sub-optimal condition and SFT by 10 points."""
    results = {r.variant: r for r in run_demo(get_config(), tmp_path, seeds=[0])}
    assert set(results) == {"sft_all", "crlft"}
    crlft = results["crlft"].accuracy
    assert crlft["expert"]["exact_match"] > crlft["suboptimal"]["exact_match"]
    assert crlft["expert"]["exact_match"] >= results["sft_all"].accuracy["plain"]["exact_match"] + 0.10


@pytest.mark.slow
def test_full_ablation(tmp_path):
    from openchat_jax.demo.run import ABLATION_VARIANTS

    results = run_demo(get_config(), tmp_path, variants=ABLATION_VARIANTS, seeds=[0, 1, 2])
    checks = report.acceptance(results)
    assert len(checks) == 5
    assert all(ok for _, ok in checks), checks


def test_cli_first_seed_runs_the_seeds_asked_for(tmp_path, capsys):
    """`--first-seed 3 --seeds 2` trains on seeds 3 and 4 (data and initial weights), nothing else."""
    from openchat_jax.cli import main

    out = tmp_path / "out"
    tiny = ["--config.demo.num_train=120", "--config.demo.num_test=4", "--config.train.num_steps=2",
            "--config.train.progress=False", "--config.model.num_layers=1"]
    assert main(["demo", "--variants", "crlft", "--first-seed", "3", "--seeds", "2", "--out", str(out), *tiny]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in saved["results"]] == [3, 4]
    assert sorted(p.name for p in out.glob("seed*")) == ["seed3", "seed4"]
    assert "over 2 seeds" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(["demo", "--first-seed=-1", "--out", str(tmp_path / "bad"), *tiny]) == 2
    assert "--first-seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
