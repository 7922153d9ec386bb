"""The `openchat-jax` entry point: every command is wired in, and --version is the package's."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from openchat_jax.cli import COMMANDS, main


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
