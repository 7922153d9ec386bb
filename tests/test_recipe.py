"""README.md's "The real recipe", run end to end through the CLI on a tiny HF Llama and the tiny
Llama-2-style tokenizer: every command of the README's block is run as written, in a folder laid out
with the names the README uses, with only what makes it tiny added (sequence length, batch, steps)
and the data files replaced by a ShareGPT file and an OpenChat-format file. Then transformers loads
the export and its `generate` stops at <|end_of_turn|>.

Which class an OpenChat-format record lands in is the data side's business; this test only needs
every answer in the data to be the same, so it holds whichever class the records go to."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch
import transformers

from openchat_jax.cli import main as cli_main
from openchat_jax.data.tokenizer import EOT_TOKEN, read_tokenizer
from tests import hf_fixtures
from tests.tokenizer_fixture import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "The capital of France is Paris."
QUESTIONS = ["What is the capital of France?", "Hello, how are you today?", "  What is two plus two?",
             "Please write a short poem about the sea.", "Thank you for the help.\n"]

# What makes the paper's run tiny, per command.
TINY = {
    "prepare": ["--config.data.max_length=128", "--config.data.num_workers=1"],
    "train": ["--config.data.max_length=128", "--config.train.global_batch_size=8", "--config.train.num_steps=24",
              "--config.train.lr=0.01", "--config.train.warmup_ratio=0.1", "--config.train.progress=False",
              "--config.train.tensorboard=False", "--config.checkpoint.save_every=12",
              "--config.checkpoint.async_save=False"],
    "chat": ["--max-new-tokens=12"],
    "generate": ["--max-new-tokens=12", "--no-progress"],
}


def recipe_commands() -> list[list[str]]:
    """The argv of every command in README.md's "The real recipe" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The real recipe", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("openchat-jax ")]


def _sharegpt(question: str, model: str) -> dict:
    return {"model": model, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": ANSWER}]}


def _openchat(question: str, condition: str) -> dict:
    return {"items": [{"role": "user", "content": question, "weight": 0.0},
                      {"role": "assistant", "content": ANSWER, "weight": 1.0}],
            "condition": condition, "system": "You are a helpful assistant."}


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path.name


def _lay_out(tmp: Path, hf_dir_name: str, data_files: list[str], prompts_name: str) -> None:
    """The README's inputs under its names: the HF folder, the conversations, the prompts."""
    tok = build_tiny_tokenizer(tmp / "tokenizer")
    hf = hf_fixtures.make_hf_checkpoint(tmp / hf_dir_name, vocab_size=len(read_tokenizer(tok)), num_hidden_layers=2)
    for f in tok.iterdir():
        shutil.copy2(f, hf / f.name)
    sharegpt = [_sharegpt(q, m) for q in QUESTIONS for m in ("Model: GPT-4", "Model: GPT-3.5")]
    openchat = [_openchat(q, c) for q in QUESTIONS for c in ("GPT4", "GPT3")]
    _write_jsonl(tmp / data_files[0], sharegpt)
    _write_jsonl(tmp / "openchat_format.jsonl", openchat)
    _write_jsonl(tmp / prompts_name, [{"question_id": i, "turns": [q]} for i, q in enumerate(QUESTIONS[:3])])
    (tmp / "configs").symlink_to(ROOT / "configs")


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_readme_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys):
    commands = recipe_commands()
    assert [a[0] for a in commands] == ["convert", "prepare", "train", "chat", "generate", "convert"]
    to_jax, prep, train, chat, generate, to_hf = commands
    files_arg = next(a for a in prep if a.startswith("--config.data.files="))
    readme_files = eval(files_arg.split("=", 1)[1])  # noqa: S307 - a Python list literal in our own README
    _lay_out(tmp_path, _option(to_jax, "--hf-dir"), readme_files, _option(generate, "--prompts"))
    monkeypatch.chdir(tmp_path)

    prep = [f"--config.data.files={readme_files + ['openchat_format.jsonl']!r}" if a == files_arg else a for a in prep]
    assert cli_main(to_jax) == 0
    assert cli_main(prep + TINY["prepare"]) == 0
    dataset_dir = Path(next(a for a in prep if a.startswith("--config.data.dataset_dir=")).split("=", 1)[1])
    report = json.loads((dataset_dir / "report.json").read_text())
    assert report["examples"] == 4 * len(QUESTIONS) and report["skipped"] == 0
    assert cli_main(train + TINY["train"]) == 0
    run = Path(next(a for a in train if a.startswith("--config.workdir=")).split("=", 1)[1])
    final = Path(_option(chat, "--ckpt"))
    assert final == run / "final"

    # The weights carry their classes: final/classes.json and every checkpoint's metadata.
    recorded = json.loads((final / "classes.json").read_text())
    assert recorded["inference_condition"] == "GPT4"
    assert [(c["name"], c["condition"], c["weight"]) for c in recorded["classes"]] == [("gpt4", "GPT4", 1.0), ("gpt3", "GPT3", 0.1)]
    from openchat_jax.train.checkpointing import Checkpointer

    checkpoints = Checkpointer(str((run / "checkpoints").absolute()), save_every=12)
    assert checkpoints.all_steps() == [12, 24]
    assert all(checkpoints.custom_metadata_of(s) == recorded for s in (12, 24))
    checkpoints.close()
    capsys.readouterr()

    # chat, no class flags: the expert condition; stdin answered, then end of input.
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert cli_main(chat + TINY["chat"]) == 0
    out = capsys.readouterr().out
    assert "chatting as class 'gpt4' (prefix 'GPT4')" in out and out.count("assistant> ") == 1

    assert cli_main(generate + TINY["generate"]) == 0
    lines = [json.loads(x) for x in Path(_option(generate, "--out")).read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [0, 1, 2] and {x["condition"] for x in lines} == {"gpt4"}
    assert all(x["finish_reasons"] == ["stop"] for x in lines), lines  # learnt to end its turn
    assert lines[0]["answers"] == [ANSWER]

    assert cli_main(to_hf) == 0
    export = Path(_option(to_hf, "--out"))
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    eot = tok.convert_tokens_to_ids(EOT_TOKEN)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [eot, tok.convert_tokens_to_ids("</s>")]
    assert tok.eos_token == EOT_TOKEN
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    assert new[-1] == eot and eot not in new[:-1] and len(new) < 24  # stopped at <|end_of_turn|>
    assert tok.decode(new, skip_special_tokens=True) == ANSWER
