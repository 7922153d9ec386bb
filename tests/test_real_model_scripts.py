"""The real-model experiment's scripts without the model: the ShareGPT first exchanges and the
prompt filter of benchmarks/real_model_data.py, and the method overrides of benchmarks/real_model.py
validated into the classes each method must train."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from openchat_jax.config import load_config
from openchat_jax.data.config import validate
from openchat_jax.demo.run import VARIANTS
from tests.test_docs_commands import check_command

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


data_script = _load("real_model_data")
run_script = _load("real_model")


def test_first_exchanges_reads_a_truncated_export_and_skips_other_shapes(tmp_path):
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": " Hi there "}, {"from": "gpt", "value": "Hello!"},
                                      {"from": "human", "value": "more"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "starts mid-chat"}, {"from": "human", "value": "x"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "alone"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Q"}, {"from": "chatgpt", "value": "A"}]},
    ]
    path = tmp_path / "export.json"
    text = "[" + ",\n".join(json.dumps(r) for r in records) + ',\n{"id": "e", "conversations": [{"from": "hu'
    path.write_text(text)  # truncated inside the last record, as the packaged export is
    assert list(data_script.first_exchanges(path)) == [("a", "Hi there", "Hello!"), ("d", "Q", "A")]


@pytest.mark.parametrize(("prompt_tokens", "reply_tokens", "prompt", "reply", "reason"), [
    (10, 50, "What is 2+2?", "It is 4.", ""),
    (3, 50, "Hi", "Hello.", "prompt_length"),
    (65, 50, "long", "x", "prompt_length"),
    (10, 15, "q", "short", "reply_length"),
    (10, 193, "q", "long", "reply_length"),
    (10, 50, "Что такое ИИ?", "ok", "not_english_like"),
    (10, 50, "q", "日本語の答え", "not_english_like"),
])
def test_keep_gives_the_reason_of_each_skip(prompt_tokens, reply_tokens, prompt, reply, reason):
    args = argparse.Namespace(min_prompt_tokens=4, max_prompt_tokens=64, min_reply_tokens=16, max_reply_tokens=192)
    assert data_script.keep(prompt_tokens, reply_tokens, prompt, reply, args) == reason


def test_method_overrides_give_the_classes_of_each_method(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [data_script.conversation("q", "a", c, str(i)) for i, c in enumerate(("GPT4", "GPT3"))]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_config(run_script.CONFIG)
    got = {}
    for method in run_script.METHODS:
        overrides = run_script.method_overrides(VARIANTS[method], tmp_path, list(base.data.classes))
        config = load_config(run_script.CONFIG, overrides + [f"--config.data.files={[str(train)]!r}"])
        spec = validate(config.data)
        got[method] = ([(c.name, c.condition, c.weight) for c in spec.classes],
                       spec.class_for_label("GPT4"), spec.class_for_label("GPT3"), config.train.weighted,
                       config.workdir == str(tmp_path / method))
    assert got == {
        "sft_all": ([("expert", "", 1.0), ("suboptimal", "", 0.1)], 0, 1, False, True),
        "sft_expert": ([("expert", "", 1.0)], 0, None, False, True),  # GPT3 records: counted skips
        "crlft": ([("expert", "GPT4", 1.0), ("suboptimal", "GPT3", 0.1)], 0, 1, True, True),
    }
    # The three datasets differ, so no method trains on another's prepared data.
    dirs = {m: load_config(run_script.CONFIG, run_script.method_overrides(VARIANTS[m], tmp_path, list(base.data.classes)))
            .data.dataset_dir for m in run_script.METHODS}
    assert len(set(dirs.values())) == 3


def _script_commands(path: Path) -> list[str]:
    """The `openchat-jax ...` commands of a shell script, continuations joined, with the script's
    variables set to one of the values it gives them."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    values = {"$R": "runs/real", "$M": "crlft", "$D": "conditioned"}
    commands = []
    for line in text.splitlines():
        if "openchat-jax " not in line:
            continue
        line = line[line.index("openchat-jax "):]
        for name, value in values.items():
            line = line.replace(name, value)
        assert "$" not in line, line
        commands.append(line)
    return commands


def test_the_timed_real_model_list_parses_and_is_valid_bash():
    script = ROOT / "benchmarks" / "real_model_all.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    commands = _script_commands(script)
    assert [shlex.split(line)[1] for line in commands] == (["convert", "prepare", "prepare"] + ["eval"] * 3
                                                           + ["analyze"] * 2 + ["generate", "convert"])
    for line in commands:
        check_command(script.name, line)
