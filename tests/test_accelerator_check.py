"""benchmarks/accelerator_check.py --tiny on the CPU: the same code paths as on a GPU or TPU host,
at toy sizes. The cuDNN backend's call runs through JAX's XLA implementation and must match the
xla backend; the train step must give a finite loss; our greedy decode must give transformers'
tokens (both in float32 on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator_check.py"


def test_accelerator_check_tiny_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENCHAT_CUDNN_IMPLEMENTATION", "xla")  # what the script sets on CPU, undone after
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, check)  # dataclasses look their module up there
    spec.loader.exec_module(check)
    out = tmp_path / "check.json"

    assert check.main(["--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out

    attention = result["attention"]
    assert attention["backend"] == "cudnn" and attention["dtype"] == "bfloat16"
    assert attention["forward"]["max_rel"] < 1e-2  # bfloat16 outputs
    assert attention["backward"]["max_rel"] < 2e-2  # bfloat16 gradients of a float32 objective
    assert all(t > 0 for part in ("forward", "backward") for t in attention[part]["seconds"].values())

    step = result["train_step"]
    assert math.isfinite(step["loss"]) and 0 < step["loss"] < 2 * math.log(check.SMALL.vocab_size)
    assert step["peak_from"] == "measured matmul" and 0 < step["mfu"] < 1
    assert step["tokens_per_second"] == step["batch"][0] * step["batch"][1] / step["step_seconds"]

    decode = result["decode"]
    assert decode["hf_device"] == "cpu" and decode["same_tokens"] is True
    assert decode["jax_tokens_per_second"] > 0 and decode["hf_tokens_per_second"] > 0
    assert "same tokens: yes" in printed and "MFU" in printed
