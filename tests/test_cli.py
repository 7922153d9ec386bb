"""The `openchat-jax` entry point: every command is wired in, --version is the package's, every
--help shows the defaults, and config files and overrides fail with one line that says what to type."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from openchat_jax.cli import COMMANDS, build_parser, main
from openchat_jax.config import apply_overrides, load_config, split_config_args
from openchat_jax.errors import ConfigError


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"openchat-jax {version('openchat-jax')}"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "openchat-jax demo" in out
    for name in COMMANDS:
        assert f"    {name} " in out, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: openchat-jax {name}")


def _every_subparser(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_subparser(sub, prefix + (name,))


def test_every_help_shows_the_defaults(capsys):
    checked = 0
    for path, parser in _every_subparser(build_parser()):
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                    or isinstance(default, list)):
                continue
            option = " ".join(action.option_strings)
            entry = parser._get_formatter()._expand_help(action) if action.help else ""  # as --help prints it
            assert option in parser.format_help() and "default" in entry.lower(), f"{' '.join(path)} {option}: {entry}"
            if "(default: " in entry:
                assert f"(default: {default})" in entry, f"{' '.join(path)} {option}: {entry}"
            checked += 1
    assert checked >= 15  # e.g. generate --max-new-tokens 512, plan --chip v5p, demo --out runs/demo


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text("from openchat_jax.train.config import base_config\n"
                    "def get_config():\n    return base_config('tiny')\n")
    return path


@pytest.mark.parametrize("name, text, message", [
    ("data.cfg", "x = 1\n", "data.cfg: a config file is a Python file (.py) with get_config()"),
    ("missing.py", None, "config file not found: "),
    ("noget.py", "x = 1\n", "noget.py: defines no get_config()"),
    ("broken.py", "import math\n\ndef get_config():\n    return math.nope\n",
     "broken.py:4: the config file failed: AttributeError: module 'math' has no attribute 'nope'"),
    ("syntax.py", "def get_config(:\n", "syntax.py:1: the config file failed: SyntaxError"),
])
def test_config_file_mistakes_are_one_line_errors(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("openchat-jax train: error: ") and message in err[0], err


def test_overrides_take_the_space_form_and_bare_list_items():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py", [])
    rest, overrides = split_config_args(["--config", "c.py", "--config.train.lr", "1e-4", "--config.train.epochs=2",
                                         "--config.train.warmup_ratio", "-0.5", "--config.data.files", "a.jsonl"])
    assert rest == ["--config", "c.py"]
    assert overrides == ["--config.train.lr=1e-4", "--config.train.epochs=2", "--config.train.warmup_ratio=-0.5",
                         "--config.data.files=a.jsonl"]
    apply_overrides(config, overrides)
    assert config.train.lr == "1e-4" and config.train.epochs == 2 and config.train.warmup_ratio == -0.5
    assert config.data.files == ["a.jsonl"]  # a bare word for a list of paths: a one-element list
    apply_overrides(config, ["--config.data.files=['a.jsonl', 'b.jsonl']"])
    assert config.data.files == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="--config.train.lr needs a value"):
        split_config_args(["--config.train.lr", "--config.train.epochs=2"])


@pytest.mark.parametrize("override, message", [
    ("--config.data.files=[a.jsonl,b.jsonl]",
     "data.files is a list; write it as a quoted Python literal, e.g. --config.data.files=\"['a.jsonl', 'b.jsonl']\""),
    ("--config.data.classes=gpt4", "data.classes is a list; write it as a quoted Python literal, e.g. --config.data.classes=\""),
    ("--config.data.label_map=gpt4",
     "data.label_map is a dict; write it as a quoted Python literal, e.g. --config.data.label_map=\"{'Model: GPT-4': 'gpt4'}\""),
    ("--config.train.lrr=1e-4", "no config field 'train.lrr'; did you mean train.lr?"),
    ("--config.lr=1e-4", "no config field 'lr'; did you mean train.lr?"),
    ("--config.trian.lr=1e-4", "no config field 'trian'; did you mean train?"),
    ("--config.model.num_layer=2", "no config field 'model.num_layer'; did you mean model.num_layers"),
    ("--config.train.global_batch_size=abc", "train.global_batch_size takes a value of type int (now 8), got 'abc'"),
])
def test_bad_overrides_show_the_form_expected_and_the_nearest_field(tmp_path, capsys, override, message):
    assert main(["train", "--config", str(_config_file(tmp_path)), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bench_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(["bench", "train-step", "--config", str(_config_file(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[test]"' in err[0] and "--no-torch" in err[0], err
