"""Every `openchat-jax` command of README.md and docs/*.md runs as written, on tiny inputs.

Each page runs in a sandbox folder of its own (the current directory of every command), which holds
tiny stand-ins at the relative paths the page names (conversation files, a small Hugging Face Llama
with a tokenizer, prompts files) and a copy of the repository's `configs/`. The configs are copied,
not linked: some name paths next to themselves (`Path(__file__).resolve().parents[1] / "runs"`), so
a copy keeps their outputs inside the sandbox. The page's commands run in the order it gives them,
through the environment's `openchat-jax` console script in a subprocess, so later commands read
what earlier ones wrote, as a user's would.

A command runs as written plus the shrink arguments of SHRINK appended (tiny inputs, CI time); the
documented arguments are never changed. Placeholders are filled from PLACEHOLDERS. Commands that
need a TPU, a GPU or the hub are in SKIPPED with the reason; a command the test does not know how to
run (a new page, command or config) fails `test_every_documented_command_is_run_or_skipped`.

The pages' full runs are slow (`-m slow`); the default run checks the classification and runs the
first plan line of each config analytically (`--no-compile`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from openchat_jax.cli.plan import force_cpu_devices
from tests.test_docs_commands import ROOT, _code_lines, doc_commands
from tests.tokenizer_fixture import tiny_tokenizer_dir, write_sharegpt_conversations  # noqa: F401  (pytest fixture)

CONSOLE_SCRIPT = Path(sys.executable).with_name("openchat-jax")

# Commands that cannot run on a CPU-only machine without network access.
SKIPPED = {
    "openchat-jax prepare --config configs/llama2_13b_openchat.py --config.data.files=\"['./sharegpt_gpt4.jsonl']\" "
    "--config.data.dataset_dir=./data/sharegpt-llama2":
        "the hub: the config's tokenizer is meta-llama/Llama-2-13b-hf",
}

# Placeholders a page writes in capitals for a path or config of the reader's choice, and the value
# used here (relative to the page's sandbox).
PLACEHOLDERS = {
    "scaling.md": {"CFG": "configs/llama2_13b_openchat.py"},
    "demo.md": {"DIR": "runs/scaling_check"},
    "real_model_crlft.md": {"DIR": "runs/real/prepared/conditioned", "RUN": "runs/real/step_check"},
}

# A line written in two pages runs once, in the page whose earlier commands it needs: the README's
# eval/analyze lines need the held-out split that docs/evaluation.md's prepare line makes (the
# README's prose says to prepare with data.eval_fraction first, and links that page).
RUN_IN_PAGE = {"README.md": "evaluation.md"}

# Appended to a command, keyed by (command, config or None). Tiny inputs and CI time: short rows,
# small batches, 2 steps, a 1-layer demo model, few generated tokens. Every documented command kind
# and config has an entry (an empty one when nothing needs shrinking), so a new one fails the
# classification test until someone decides here how to run it.
_QUIET = ["--config.train.progress=False"]
_DEMO = ["--config.demo.num_train=120", "--config.demo.num_test=4", "--config.demo.generate_batch_size=4",
         "--config.train.num_steps=2", "--config.model.num_layers=1", *_QUIET]
_BENCH_MODEL = ["--config.model.vocab_size=256", "--config.model.embed=32", "--config.model.mlp=64",
                "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
                "--config.model.head_dim=16", "--config.data.max_length=32", "--config.train.loss_chunk_length=8"]
SHRINK: dict[tuple[str, str | None], list[str]] = {
    ("convert", None): [],
    ("prepare", "configs/llama2_13b_openchat.py"): ["--config.data.max_length=128"],
    ("train", "configs/llama2_13b_openchat.py"): ["--config.train.num_steps=2", "--config.train.global_batch_size=4",
                                                  *_QUIET],
    ("chat", None): ["--max-new-tokens", "8"],
    ("generate", None): ["--max-new-tokens", "8"],
    ("eval", None): ["--max-new-tokens", "8"],
    ("analyze", None): [],
    ("bench", "configs/bench_50m.py"): ["--rounds", "1", "--matmul-size", "128", *_BENCH_MODEL],
    ("prepare", "configs/tiny_sharegpt.py"): ["--config.data.max_length=128"],
    ("train", "configs/tiny_sharegpt.py"): ["--config.train.num_steps=2", *_QUIET],
    ("demo", None): _DEMO,
    ("prepare", "configs/demo.py"): [],
    ("prepare", "configs/smollm2_crlft.py"): [],
    ("train", "configs/smollm2_crlft.py"): ["--config.train.num_steps=2", *_QUIET],
    ("plan", "configs/llama2_13b_openchat.py"): [],
    ("plan", "configs/llama2_70b.py"): [],
    ("plan", "configs/mistral_7b.py"): [],
    ("plan", "configs/llama3_8b.py"): [],
}
# `chat` reads the user's turns from stdin; one turn, then end of input.
CHAT_INPUT = "the cat sat on the mat\n"
# docs/demo.md's line that is not an `openchat-jax` command but writes an input of the next ones
# (the fresh conversations); it runs as written before the first command that reads them.
DEMO_FRESH_LINE = "python -c \"from openchat_jax.demo import run, tasks"
DEMO_FRESH_DIR = "runs/demo_rep/fresh"


def _argv(line: str) -> list[str]:
    return shlex.split(line, comments=True)[1:]


def _command(argv: list[str]) -> str:
    return next(a for a in argv if not a.startswith("-"))


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _shrink_key(argv: list[str]) -> tuple[str, str | None]:
    command = _command(argv)
    return command, _option(argv, "--config") if command in ("prepare", "train", "bench", "plan") else None


def _fill(doc: str, line: str) -> str:
    for name, value in PLACEHOLDERS.get(doc, {}).items():
        line = re.sub(rf"\b{name}\b", value, line)
    return line


def page_runs() -> dict[str, list[str]]:
    """Each page's distinct runnable lines, placeholders filled, in the page's order."""
    pages: dict[str, list[str]] = {}
    all_lines = doc_commands()
    for doc, line in all_lines:
        if line in SKIPPED:
            continue
        target = RUN_IN_PAGE.get(doc)
        if target and (target, line) in all_lines:
            continue
        lines = pages.setdefault(doc, [])
        if _fill(doc, line) not in lines:
            lines.append(_fill(doc, line))
    return pages


# ---- stand-ins ------------------------------------------------------------------------------------


def _hf_llama(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A tiny random HF Llama with the tiny tokenizer; the vocabulary is the tokenizer's without
    <|end_of_turn|> (which `convert hf-to-jax --add-eot` appends), as in Llama-2."""
    from openchat_jax.data.tokenizer import load_tokenizer
    from tests.hf_fixtures import make_hf_checkpoint

    tokenizer, _ = load_tokenizer(tokenizer_dir)
    make_hf_checkpoint(out, vocab_size=len(tokenizer) - 1, max_position_embeddings=512, **config)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _questions(count: int, *, reference: bool = False) -> list[dict]:
    questions = ["the cat sat", "a dog ran home", "where is the mat", "the sun is warm"]
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": questions[i % len(questions)]}],
             **({"reference": "the cat"} if reference else {})} for i in range(count)]


def _recipe_inputs(work: Path, tokenizer_dir: Path) -> None:
    """README.md and docs/evaluation.md: the base model folder, the conversations, question sets."""
    _hf_llama(work / "Llama-2-13b-hf", tokenizer_dir)
    write_sharegpt_conversations(work / "sharegpt_gpt4.jsonl", 600)  # eval_fraction=0.02 holds out 12
    _write_jsonl(work / "mt_bench.jsonl", [
        {"question_id": 81 + i, "category": "writing", "turns": ["the cat sat", "where is the mat"]} for i in range(2)])
    _write_jsonl(work / "questions_with_refs.jsonl", _questions(3, reference=True))


def _evaluation_inputs(work: Path, tokenizer_dir: Path) -> None:
    """docs/evaluation.md starts from the README's step 1: the converted base weights."""
    _recipe_inputs(work, tokenizer_dir)
    _run(work, "openchat-jax convert hf-to-jax --hf-dir Llama-2-13b-hf --out ckpt/llama2-13b --add-eot")


def _tiny_sharegpt_inputs(work: Path, tokenizer_dir: Path) -> None:
    """configs/tiny_sharegpt.py reads runs/data/sharegpt_labelled_3000.jsonl (written by `python
    configs/tiny_sharegpt.py` from the ShareGPT package) and the Llama-2 tokenizer next to the checkout."""
    (work / "runs" / "data").mkdir(parents=True)
    write_sharegpt_conversations(work / "runs" / "data" / "sharegpt_labelled_3000.jsonl", 40)
    shutil.copytree(tokenizer_dir, work.parent / "shared" / "data" / "llama2-tokenizer")


def _smollm2_inputs(work: Path, tokenizer_dir: Path) -> None:
    """docs/real_model.md and docs/real_model_crlft.md: a tied-embedding Llama as SmolLM2, and the
    OpenChat records and held-out prompts of benchmarks/real_model_data.py."""
    for folder in ("smollm2-hf", "runs/real/smollm2_hf"):
        _hf_llama(work / folder, tokenizer_dir, tie_word_embeddings=True)
    texts = ["the cat sat on the mat", "a dog ran home", "where is the mat", "the sun is warm today"]
    _write_jsonl(work / "runs" / "real" / "data" / "train.jsonl", [
        {"items": [{"role": "user", "content": texts[i % 4]}, {"role": "assistant", "content": texts[(i + 1) % 4]}],
         "condition": "GPT4" if i % 4 == 0 else "GPT3", "system": ""} for i in range(24)])
    _write_jsonl(work / "runs" / "real" / "data" / "heldout_prompts.jsonl", _questions(3))
    _write_jsonl(work / "runs" / "real" / "data" / "heldout_prompts_20.jsonl", _questions(2))
    _write_jsonl(work / "runs" / "real" / "data" / "heldout.jsonl", [
        {"items": [{"role": "user", "content": texts[i % 4]}, {"role": "assistant", "content": texts[(i + 2) % 4]}],
         "condition": condition, "system": ""} for i in range(20) for condition in ("GPT4", "GPT3")])


def _no_inputs(work: Path, tokenizer_dir: Path) -> None:
    pass


# The pages the test knows how to run, with the stand-ins each needs before its first command.
PAGES: dict[str, Callable[[Path, Path], None]] = {
    "README.md": _recipe_inputs,
    "benchmarks.md": _tiny_sharegpt_inputs,
    "demo.md": _no_inputs,
    "evaluation.md": _evaluation_inputs,
    "real_model.md": _smollm2_inputs,
    "real_model_crlft.md": _smollm2_inputs,
    "scaling.md": _no_inputs,
}


# ---- running --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The user's environment: this checkout's package, one CPU device (as on a laptop; `plan` sets
    its own fake device count)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    force_cpu_devices(1, env)
    return env


def _run(work: Path, line: str, extra: Sequence[str] = (), stdin: str | None = None) -> str:
    argv = _argv(line)
    result = subprocess.run([str(CONSOLE_SCRIPT), *argv, *extra], cwd=work, env=_env(), input=stdin or "",
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (
        f"exit {result.returncode}: {line} {' '.join(extra)}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}")
    return result.stdout


def _config_paths(work: Path, argv: list[str], extra: list[str]) -> tuple[Path, Path]:
    """The dataset_dir and workdir the command resolves (its config, its overrides and ours)."""
    from openchat_jax.config import apply_overrides, load_config_file

    config = load_config_file(work / _option(argv, "--config"))
    rest = [a for a in [*argv, *extra] if a.startswith("--config.")]
    apply_overrides(config, rest)
    return work / config.data.dataset_dir, work / config.workdir


def _check_outputs(work: Path, argv: list[str], extra: list[str], stdout: str) -> None:
    """The file or folder each command promises exists (or, for commands that only print, what
    they print)."""
    command = _command(argv)
    out = _option(argv, "--out")
    if command == "prepare":
        dataset_dir, _ = _config_paths(work, argv, extra)
        assert json.loads((dataset_dir / "dataset_info.json").read_text())["num_examples"] > 0
        assert (dataset_dir / "report.json").is_file()
    elif command == "train":
        _, workdir = _config_paths(work, argv, extra)
        assert (workdir / "final" / "model_config.json").is_file() and (workdir / "metrics.jsonl").is_file()
    elif command == "convert":
        name = "model_config.json" if argv[1] == "hf-to-jax" else "config.json"
        assert (work / out / name).is_file()
    elif command == "generate":
        answers = (work / out).read_text().splitlines()
        assert len(answers) == len((work / _option(argv, "--prompts")).read_text().splitlines())
    elif command == "eval":
        folder = work / (out or "runs/eval")
        scores = json.loads((folder / "eval.json").read_text())
        assert scores and (folder / "eval.png").is_file()
        if _option(argv, "--prompts"):
            assert list(folder.glob("answers_*.jsonl"))
    elif command == "analyze":
        assert "probe_test_accuracy" in json.loads((work / out / "representations.json").read_text())
    elif command == "demo":
        folder = work / (out or "runs/demo")
        assert (folder / "results.json").is_file() and (folder / "table.md").is_file()
    elif command == "chat":
        assert stdout.strip(), "chat printed no reply"
    elif command == "bench":
        assert "jax / torch speed" in stdout
    elif command == "plan":
        assert "params" in stdout
    else:
        pytest.fail(f"no output check for `{command}`: add it to _check_outputs in tests/test_docs_run.py")


def run_page(doc: str, work: Path, tokenizer_dir: Path) -> None:
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "configs", work / "configs")
    PAGES[doc](work, tokenizer_dir)
    page_text = (ROOT / "docs" / doc if doc != "README.md" else ROOT / doc).read_text()
    for line in page_runs()[doc]:
        argv = _argv(line)
        if DEMO_FRESH_DIR in line and not (work / DEMO_FRESH_DIR).exists():
            _run_python_line(work, page_text)
        extra = SHRINK[_shrink_key(argv)]
        stdout = _run(work, line, extra, stdin=CHAT_INPUT if _command(argv) == "chat" else None)
        _check_outputs(work, argv, extra, stdout)


def _run_python_line(work: Path, page_text: str) -> None:
    """docs/demo.md's `python -c ...` line that writes the fresh conversations, as written."""
    [line] = [line for line in _code_lines(page_text) if line.startswith(DEMO_FRESH_LINE)]
    python, *args = shlex.split(line)
    assert python == "python", line
    result = subprocess.run([sys.executable, *args], cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{line}\n{result.stderr[-4000:]}"
    assert (work / DEMO_FRESH_DIR / "train.jsonl").is_file()


# ---- tests ----------------------------------------------------------------------------------------


def unclassified(lines: list[tuple[str, str]]) -> list[str]:
    """What is missing to run each (page, line) not in SKIPPED: stand-ins, a placeholder's value, or
    the SHRINK entry of its command and config."""
    missing = []
    for doc, line in lines:
        if line in SKIPPED:
            continue
        if doc not in PAGES:
            missing.append(f"{doc}: page without stand-ins (add it to PAGES): {line}")
            continue
        filled = _fill(doc, line)
        left = [w for w in re.findall(r"\b[A-Z][A-Z_]{1,}\b", filled) if w not in ("GPT4", "GPT3")]
        if left:
            missing.append(f"{doc}: placeholder {left} without a value (add it to PLACEHOLDERS): {line}")
        if _shrink_key(_argv(filled)) not in SHRINK:
            missing.append(f"{doc}: {_shrink_key(_argv(filled))} has no SHRINK entry (add one): {line}")
    return missing


def test_every_documented_command_is_run_or_skipped():
    all_lines = doc_commands()
    missing = unclassified(all_lines)
    assert not missing, "documented commands this test does not know how to run:\n" + "\n".join(missing)
    assert set(SKIPPED) <= {line for _, line in all_lines}, "SKIPPED lists a line no page has"
    runs = page_runs()
    for doc, line in all_lines:
        if line not in SKIPPED and _fill(doc, line) not in runs.get(doc, []):
            assert line in runs[RUN_IN_PAGE[doc]], f"{doc}: neither run nor skipped: {line}"
    assert sum(len(lines) for lines in runs.values()) >= 35


def test_a_command_nobody_classified_fails_with_what_to_add():
    missing = unclassified([
        ("README.md", "openchat-jax train --config configs/new_model.py"),
        ("new_page.md", "openchat-jax plan --config configs/llama2_13b_openchat.py"),
        ("scaling.md", "openchat-jax plan --config configs/llama3_8b.py --mesh fsdp=NUM_CHIPS"),
    ])
    assert len(missing) == 3
    assert "('train', 'configs/new_model.py') has no SHRINK entry (add one)" in missing[0]
    assert "new_page.md: page without stand-ins (add it to PAGES)" in missing[1]
    assert "placeholder ['NUM_CHIPS'] without a value (add it to PLACEHOLDERS)" in missing[2]


@pytest.mark.parametrize("line, reason", sorted(SKIPPED.items()))
def test_commands_that_need_a_tpu_gpu_or_the_hub(line, reason):
    pytest.skip(f"needs {reason}: {line}")


def _first_plan_line_per_config() -> list[str]:
    lines: dict[str | None, str] = {}
    for line in page_runs()["scaling.md"]:
        lines.setdefault(_option(_argv(line), "--config"), line)
    return list(lines.values())


@pytest.mark.parametrize("line", _first_plan_line_per_config())
def test_plan_lines_run_without_compiling(line, tmp_path):
    """The default run's share (the full pages are slow): scaling.md's first plan line of each config,
    analytic only (`--no-compile`; compiling a 13B step for 32 fake devices takes ~30-40 s)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    argv = _argv(line)
    stdout = _run(work, line, [*SHRINK[_shrink_key(argv)], "--no-compile"])
    _check_outputs(work, argv, [], stdout)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted(PAGES))
def test_page_runs_as_written(doc, tiny_tokenizer_dir, tmp_path, compilation_cache, monkeypatch):  # noqa: F811
    # The demo pages train the same tiny shapes dozens of times (variants x seeds, one process per
    # command): JAX's persistent cache compiles each step once. It changes no result.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    run_page(doc, tmp_path / "work", tiny_tokenizer_dir)
