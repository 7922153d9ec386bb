"""`openchat-jax bench train-step` runs end to end on a toy model and reports consistent figures."""

from __future__ import annotations

import json

from openchat_jax.cli import main as cli_main


def test_bench_train_step_smoke(tmp_path, capsys):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from openchat_jax.train.config import base_config\n"
        "def get_config():\n"
        "    c = base_config('tiny')\n"
        "    c.model.update(vocab_size=256, embed=32, mlp=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16)\n"
        "    c.data.max_length = 32\n"
        "    c.train.global_batch_size = 8\n"
        "    c.train.loss_chunk_length = 8\n"
        "    return c\n"
    )
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "train-step", "--config", str(config_file), "--rounds", "1", "--steps-per-round", "2",
                   "--matmul-size", "128", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "jax / torch speed" in printed and "matmul peak" in printed
    result = json.loads(out.read_text())
    # 2 timed steps per side; the settle step run before them in the round is not among them
    assert result["settle_steps"] == 1
    assert len(result["jax_step_times"]) == 2 and len(result["torch_step_times"]) == 2
    assert result["tokens_per_step"] == 8 * 32
    assert result["speedup_vs_torch"] == result["torch_step_seconds"] / result["jax_step_seconds"]
    assert result["jax_mfu"] == result["jax_tokens_per_second"] * result["flops_per_token"] / result["matmul_peak_flops"]
    assert result["matmul_peak_flops"] == max(result["matmul_peaks"]) > 0
    # ~60% of the bench batch's targets are supervised: the loss skips the chunks (8 rows x 8
    # positions) past them, and the executed share of the peak leaves out their LM-head FLOPs.
    head = result["jax_lm_head_tokens"]
    assert 0 < head < 8 * 32 and head % 64 == 0
    skipped_flops = (8 * 32 - head) / (8 * 32) * 6 * 32 * 256
    expected = result["jax_tokens_per_second"] * (result["flops_per_token"] - skipped_flops) / result["matmul_peak_flops"]
    assert abs(result["jax_executed_fraction_of_peak"] - expected) <= 1e-9 * expected
    assert f"logits for {head:.0f} of 256 positions" in printed


def test_bench_rejects_a_negative_settle_count():
    import pytest

    from openchat_jax.errors import ConfigError
    from benchmarks.train_step import bench_train_step
    from openchat_jax.train.config import base_config

    with pytest.raises(ConfigError, match="settle steps >= 0"):
        bench_train_step(base_config("tiny"), settle_steps=-1, report=lambda _: None)


def test_bench_outside_a_source_checkout_says_it_needs_one(tmp_path, monkeypatch, capsys):
    from openchat_jax.cli import bench as bench_cli

    monkeypatch.setattr(bench_cli, "SOURCE_ROOT", tmp_path)  # an installed package: no benchmarks/ beside it
    monkeypatch.delitem(__import__("sys").modules, "benchmarks.train_step", raising=False)
    rc = cli_main(["bench", "train-step", "--config", "configs/bench_50m.py", "--no-torch"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"openchat-jax bench: error: openchat-jax bench needs a source checkout: {tmp_path / 'benchmarks' / 'train_step.py'} " \
           "does not exist" in err
