"""Every `openchat-jax ...` command written in README.md and docs/*.md still parses: the command
and its options exist, the config files it names exist, and each `--config.key=value` names a
field of that config with a value of the right type. Docs that drift from the CLI fail here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from openchat_jax.cli import COMMANDS, build_parser
from openchat_jax.config import apply_overrides, load_config_file
from openchat_jax.demo.config import get_config as demo_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(text: str) -> list[str]:
    """Lines of fenced blocks and of 4-space-indented blocks, backslash continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    indented = re.findall(r"^    (.*\S.*)$", text, re.M)
    lines += re.sub(r"\\\n\s*", " ", "\n".join(indented)).splitlines()
    return [line.strip().removeprefix("$ ") for line in lines]


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for line in _code_lines(path.read_text()):
            line = re.sub(r"(?<=\s)\[[^\]]*\]", "", line)  # synopsis: [optional ...] parts
            if line.startswith("openchat-jax ") and "$" not in line:
                found.append((path.name, line))
    return found


def test_the_docs_have_commands_to_check():
    names = {name for name, _ in doc_commands()}
    assert {"README.md", "demo.md", "benchmarks.md", "scaling.md"} <= names


@pytest.mark.parametrize(("doc", "line"), doc_commands())
def test_doc_command_parses(doc, line):
    check_command(doc, line)


def check_command(doc: str, line: str) -> None:
    """`line` (`openchat-jax ...`, written in `doc`) parses, and its config and overrides load."""
    argv = shlex.split(line, comments=True)[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    assert command in COMMANDS, f"{doc}: {line}"
    try:
        args, extra = build_parser(command).parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}: argparse rejects: {line}")
    assert not extra, f"{doc}: unknown arguments {extra} in: {line}"
    config_path = getattr(args, "config", None)
    if config_path is not None and not (ROOT / config_path).is_file():
        assert not config_path.startswith("configs/"), f"{doc}: no such config {config_path}: {line}"
        return  # a user's own config file, named as an example
    config = load_config_file(ROOT / config_path) if config_path else demo_config() if command == "demo" else None
    if config is not None:
        apply_overrides(config, getattr(args, "overrides", []))  # raises ConfigError on an unknown field or a bad type
    else:
        assert not getattr(args, "overrides", []), f"{doc}: --config.* overrides on a command without a config: {line}"
