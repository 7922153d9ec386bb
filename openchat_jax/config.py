"""Config files are Python files with `get_config() -> ml_collections.ConfigDict` (big_vision
style); `--config.a.b=value` overrides any field, type-checked against the existing value."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterable

import ml_collections

from openchat_jax.errors import ConfigError


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_openchat_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return config


def parse_value(text: str):
    """'3' -> 3, '1e-4' -> 1e-4, 'True' -> True, '[1,2]' -> [1, 2], 'None' -> None, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply `key.sub=value` (a leading `--config.` or `config.` is accepted) in order."""
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise ConfigError(f"override {item!r}: no config field {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: no config field {key!r}")
        value = parse_value(raw)
        current = node[leaf]
        if isinstance(current, str) and not isinstance(value, str):
            value = raw  # a string field keeps the literal text ("1e-4" stays a string there)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(path), overrides)


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` items from the rest of a command line."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides
