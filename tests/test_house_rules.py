"""House rules of the package that a reader cannot see from one file: no module uses another
module's private names (`from x import _name`, `x._name`), and nothing reaches into JAX's
internals (`jax._src`), which change between JAX releases without notice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "openchat_jax"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str | None, level: int, here: str, is_package: bool) -> str:
    """The absolute module of a `from ... import`, relative ones resolved against `here`."""
    if level == 0:
        return module or ""
    base = here.split(".")[: len(here.split(".")) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def _is_project_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return name.split(".")[0] == "openchat_jax" and (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def _is_jax_internal(name: str) -> bool:
    return name == "jax._src" or name.startswith("jax._src.")


def violations(path: Path) -> list[str]:
    """`file:line: what` for each private name of another project module and each use of
    jax._src in one source file."""
    here, tree = _module_name(path), ast.parse(path.read_text(), filename=str(path))
    where = lambda node: f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"  # noqa: E731
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> the module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_jax_internal(alias.name):
                    found.append(f"{where(node)}: import {alias.name}")
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module, node.level, here, path.name == "__init__.py")
            if _is_jax_internal(source):
                found.append(f"{where(node)}: from {source} import ...")
            for alias in node.names:
                if _private(alias.name) and source != here:
                    found.append(f"{where(node)}: from {source} import {alias.name}")
                if _is_project_module(f"{source}.{alias.name}") or _is_jax_internal(f"{source}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in modules:
            continue
        dotted = ".".join([modules[value.id], *reversed(chain)])
        owner = dotted.rsplit(".", 1)[0]
        if dotted == "jax._src":  # the innermost access names it once
            found.append(f"{where(node)}: {dotted}")
        elif _private(node.attr) and owner != here and _is_project_module(owner):
            found.append(f"{where(node)}: {dotted}")
    return sorted(set(found))


def test_no_private_names_across_modules_and_no_jax_internals():
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from openchat_jax.model.checkpoint_io import _flatten\n", ["from openchat_jax.model.checkpoint_io import _flatten"]),
        ("from .checkpoint_io import _flatten\n", ["from openchat_jax.model.checkpoint_io import _flatten"]),
        ("from openchat_jax.model import partitioning\nx = partitioning._ACTIVE\n", ["openchat_jax.model.partitioning._ACTIVE"]),
        ("import openchat_jax.model.partitioning as p\nx = p._ACTIVE\n", ["openchat_jax.model.partitioning._ACTIVE"]),
        ("from jax._src import clusters\n", ["from jax._src import ..."]),
        ("import jax\nx = jax._src.clusters.ClusterEnv\n", ["jax._src"]),
        ("import jax._src.clusters\n", ["import jax._src.clusters"]),
        # Allowed: a module's own private names, public names, private attributes of objects.
        ("def _h():\n    pass\n_h()\n", []),
        ("from openchat_jax.model import partitioning\nx = partitioning.constrain\n", []),
        ("class A:\n    def f(self):\n        return self._x\n", []),
    ],
)
def test_the_scan_catches_what_it_should(tmp_path, monkeypatch, source, expected):
    """The scan itself, on small sources placed as openchat_jax/model/probe.py."""
    root = tmp_path / "openchat_jax"
    for module in ("model/checkpoint_io.py", "model/partitioning.py", "model/__init__.py", "__init__.py"):
        (root / module).parent.mkdir(parents=True, exist_ok=True)
        (root / module).touch()
    probe = root / "model" / "probe.py"
    probe.write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", root)
    assert [v.split(": ", 1)[1] for v in violations(probe)] == expected
