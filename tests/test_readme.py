"""The README's two commands: self-contained lines, and CI runs the test line verbatim."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _two_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands on a fresh machine", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_two_self_contained_commands():
    demo, tests = _two_commands()
    for line in (demo, tests):
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e "), line
    assert demo.endswith("&& openchat-jax demo")
    assert tests.endswith("&& python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert _two_commands()[1] in ci_lines
