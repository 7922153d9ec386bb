"""docs/launch.md's local path runs as written: its table's four commands (prepare, import the base
model, train, export) run in order on tiny inputs, with the placeholders (CONFIG, CONVERSATIONS,
DATASET, HF_DIR, INIT, WORKDIR, HF_OUT) filled in with a tiny config, conversation file, Hugging
Face model and folders. Every other `openchat-jax` command in the page is listed in SKIPPED with
the reason it cannot run here (a TPU, GPUs or the hub); a command that is in neither list fails the
test, so new docs get classified. (The `launch/*.sh` lines drive gcloud, GPUs or SLURM; their argv
is checked against fake gcloud/sbatch in tests/test_launch.py.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from openchat_jax.cli import main as cli_main
from tests.test_docs_commands import _code_lines
from tests.tokenizer_fixture import tiny_tokenizer_dir, write_sharegpt_conversations  # noqa: F401  (pytest fixture)

LAUNCH = Path(__file__).resolve().parent.parent / "docs" / "launch.md"
PLACEHOLDERS = ("CONFIG", "CONVERSATIONS", "DATASET", "HF_DIR", "INIT", "WORKDIR", "HF_OUT")

SKIPPED = {
    "openchat-jax prepare --config configs/llama2_13b_openchat.py --config.data.files=\"['./sharegpt_gpt4.jsonl']\" "
    "--config.data.dataset_dir=./data/sharegpt-llama2":
        "the hub: the config's tokenizer is meta-llama/Llama-2-13b-hf (and the user's ShareGPT file)",
    "openchat-jax convert hf-to-jax --hf-dir ./Llama-2-13b-hf --out ./llama2-13b-jax --add-eot":
        "the hub: the gated 26 GB meta-llama/Llama-2-13b-hf download",
    "gcloud compute tpus tpu-vm ssh openchat-13b --worker=all --command='cd ~/openchat-jax && "
    "~/openchat-venv/bin/openchat-jax train --config ...'":
        "a TPU pod slice (every worker runs it)",
    "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 .venv/bin/openchat-jax train --config configs/llama2_13b_openchat.py "
    "--config.workdir=... --config.data.dataset_dir=... --config.init_from=...":
        "8 GPUs and the 13B model",
}


def launch_commands() -> list[str]:
    """Every `openchat-jax` command of the page: code-block lines and inline `code` spans with options
    (a bare `openchat-jax train` in prose names the command, it is not one to run)."""
    text = LAUNCH.read_text()
    found = [line for line in _code_lines(text) if line.startswith("openchat-jax ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose, re.S):
        span = " ".join(span.split())
        if re.search(r"openchat-jax (prepare|train|convert|generate|chat|plan|bench|demo) .*--", span):
            found.append(span)
    return list(dict.fromkeys(found))


def local_path() -> list[str]:
    """The table's commands, in its order: the ones written with placeholders."""
    return [c for c in launch_commands() if c.startswith("openchat-jax ") and any(
        re.search(rf"\b{p}\b", c) for p in PLACEHOLDERS)]


def test_every_command_of_the_page_is_run_or_skipped_with_a_reason():
    commands = launch_commands()
    assert [shlex.split(c)[1] for c in local_path()] == ["prepare", "convert", "train", "convert"]
    unclassified = [c for c in commands if c not in local_path() and c not in SKIPPED]
    assert not unclassified, f"docs/launch.md commands neither run by this test nor in SKIPPED: {unclassified}"
    assert not [c for c in SKIPPED if c not in commands], "SKIPPED lists commands the page no longer has"


TINY_CONFIG = """\
from openchat_jax.train.config import base_config


def get_config():
    config = base_config("tiny")
    config.data.tokenizer = {tokenizer!r}
    config.data.label_field = "model"
    config.data.max_length = 64
    config.data.num_workers = 1
    config.train.update(global_batch_size=8, num_steps=3, lr=1e-3, progress=False, tensorboard=False)
    config.checkpoint.save_every = 0
    return config
"""


def _conversations(path: Path) -> Path:
    return write_sharegpt_conversations(path, 24)


def test_the_local_path_runs_as_written(tiny_tokenizer_dir, tmp_path, capsys):  # noqa: F811
    from openchat_jax.data.tokenizer import load_tokenizer
    from tests.hf_fixtures import make_hf_checkpoint

    tokenizer, _ = load_tokenizer(tiny_tokenizer_dir)
    config = tmp_path / "tiny_config.py"
    config.write_text(TINY_CONFIG.format(tokenizer=str(tiny_tokenizer_dir)))
    # The base model's vocabulary is the tokenizer's without <|end_of_turn|>, which --add-eot appends.
    hf_dir = make_hf_checkpoint(tmp_path / "hf_base", vocab_size=len(tokenizer) - 1)
    values = {
        "CONFIG": str(config), "CONVERSATIONS": str(_conversations(tmp_path / "conversations.jsonl")),
        "DATASET": str(tmp_path / "dataset"), "HF_DIR": str(hf_dir), "INIT": str(tmp_path / "init"),
        "WORKDIR": str(tmp_path / "run"), "HF_OUT": str(tmp_path / "hf_out"),
    }
    for command in local_path():
        line = re.sub(rf"\b({'|'.join(PLACEHOLDERS)})\b", lambda m: values[m.group(1)], command)
        assert cli_main(shlex.split(line)[1:]) == 0, line
    out = capsys.readouterr().out

    info = json.loads((tmp_path / "dataset" / "dataset_info.json").read_text())
    assert info["num_examples"] == 24 and info["max_length"] == 64
    assert json.loads((tmp_path / "init" / "model_config.json").read_text())["vocab_size"] == len(tokenizer)
    assert "rows of 64 tokens (the dataset's max_length" in out and str(tmp_path / "run" / "final") in out
    assert (tmp_path / "run" / "final" / "model_config.json").is_file()
    assert (tmp_path / "run" / "config.json").is_file()
    hf_config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert hf_config["vocab_size"] == len(tokenizer) and hf_config["num_hidden_layers"] == 3
    assert list((tmp_path / "hf_out").glob("*.safetensors"))


@pytest.mark.parametrize("command, reason", sorted(SKIPPED.items()))
def test_commands_that_need_a_tpu_gpu_or_the_hub(command, reason):
    pytest.skip(f"needs {reason}: {command}")
