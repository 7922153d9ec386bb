"""Config files are Python files with `get_config() -> ml_collections.ConfigDict` (big_vision
style), or the `config.json` a training run writes into its workdir. `--config.a.b=value` (or
`--config.a.b value`, as absl accepts) overrides any field, type-checked against the existing value.
Every mistake is one line naming the file or the override, the form expected, and the nearest field."""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import importlib.util
import json
import math
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from openchat_jax.errors import ConfigError, OpenChatError

CONFIG_PREFIX = "--config."


def _where_in(path: Path, error: BaseException) -> str:
    """`path:line` of the innermost frame of `error` inside the config file itself."""
    if isinstance(error, SyntaxError) and error.filename and error.lineno:
        return f"{path}:{error.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _load_python_config(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_openchat_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: defines no get_config() (a config file returns its ConfigDict from get_config())")
        config = module.get_config()
    except OpenChatError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: report where it failed, in one line
        message = e.msg if isinstance(e, SyntaxError) else str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{_where_in(path, e)}: the config file failed: {type(e).__name__}: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}")
    return config


def load_config_json(path: str | Path) -> ml_collections.ConfigDict:
    """A config saved as JSON (WORKDIR/config.json, written by `train`) back as a ConfigDict. A run
    config (with a `train` section) is rebuilt on the run-config defaults, so its typed fields and
    the `train.conditioned` / `data.conditioned` link are as in a config file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections, got {type(values).__name__}")
    if "train" in values:
        from openchat_jax.train.config import run_config_from_dict

        try:
            return run_config_from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return ml_collections.ConfigDict(values)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; --config takes a .py file with get_config() (e.g. configs/tiny.py)")
    if path.suffix == ".json":
        return load_config_json(path)
    if path.suffix != ".py":
        raise ConfigError(f"{path}: a config file is a Python file (.py) with get_config(), e.g. configs/tiny.py, "
                          "or the config.json a training run wrote into its workdir")
    return _load_python_config(path)


def parse_value(text: str):
    """'3' -> 3, '1e-4' -> 1e-4, 'True' -> True, '[1,2]' -> [1, 2], 'None' -> None, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _dotted_keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name in node.keys():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(node[name], ml_collections.ConfigDict):
            keys += _dotted_keys(node[name], key + ".")
    return keys


def nearest_fields(config: ml_collections.ConfigDict, key: str) -> list[str]:
    """Fields of `config` close to the dotted `key`: a close spelling in the same section, or the
    same name in another section (`lr` -> `train.lr`)."""
    *sections, leaf = key.split(".")
    node, prefix = config, ""
    for part in sections:
        if not isinstance(node.get(part), ml_collections.ConfigDict):
            break
        node, prefix = node[part], prefix + part + "."
    else:
        close = [prefix + k for k in difflib.get_close_matches(leaf, list(node.keys()), n=3, cutoff=0.6)]
        same_leaf = [k for k in _dotted_keys(config) if k.rsplit(".", 1)[-1] == leaf and k != key]
        return list(dict.fromkeys(close + same_leaf))[:3]
    return []


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _literal_example(current: Any, raw: str) -> str:
    """A Python literal of the field's kind, for the error message."""
    current = _plain(current)
    if isinstance(current, Mapping):
        text = repr(dict(current))
        return text if len(text) <= 80 else "{'key': 'value', ...}"
    words = [w.strip().strip("'\"") for w in raw.strip().strip("[]()").split(",") if w.strip()]
    if all(isinstance(x, str) for x in current) and words:
        return repr(words)
    text = repr(list(current))
    return text if len(text) <= 80 else "[...]"


def _coerce(key: str, item: str, current: Any, raw: str) -> Any:
    value = parse_value(raw)
    if isinstance(current, str) and not isinstance(value, str):
        return raw  # a string field keeps the literal text ("1e-4" stays a string there)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
        bare_word = isinstance(value, str) and not raw.lstrip().startswith(("[", "("))
        if bare_word and all(isinstance(x, str) for x in current):
            return [value]  # --config.data.files=a.jsonl: a one-element list
        raise ConfigError(f"override {item!r}: {key} is a list; write it as a quoted Python literal, "
                          f"e.g. --config.{key}=\"{_literal_example(current, raw)}\"")
    if isinstance(current, (Mapping, ml_collections.ConfigDict)) and not isinstance(value, Mapping):
        raise ConfigError(f"override {item!r}: {key} is a dict; write it as a quoted Python literal, "
                          f"e.g. --config.{key}=\"{_literal_example(current, raw)}\"")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply `key.sub=value` (a leading `--config.` or `config.` is accepted) in order."""
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
            if part not in node:
                near = nearest_fields(config, key if i == len(parts) - 1 else here)
                hint = f"; did you mean {' or '.join(near)}?" if near else ""
                raise ConfigError(f"override {item!r}: no config field {here!r}{hint}")
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        value = _coerce(key, item, current, raw)
        try:
            node[leaf] = value
        except (TypeError, ValueError):
            kind = type(_plain(current)).__name__
            raise ConfigError(f"override {item!r}: {key} takes a value of type {kind} (now {_plain(current)!r}), "
                              f"got {value!r}") from None
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(path), overrides)


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` and `--config.key value` items from the rest of a command line;
    the overrides come back in the `--config.key=value` form."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(CONFIG_PREFIX) and "=" not in arg:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE")
            overrides.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        (overrides if arg.startswith(CONFIG_PREFIX) else rest).append(arg)
        i += 1
    return rest, overrides


# -- the typed run config --------------------------------------------------------------------------
# Each section of a run config is a frozen dataclass (model: LlamaConfig, data: DataConfig, train:
# TrainConfig, ...). `resolve` builds them once from the loaded ConfigDict and checks every value
# there: types from the type hints, ranges and choices from each field's metadata (`at_least`,
# `in_range`, `one_of`), unknown keys with the nearest known name.

Rule = tuple[Callable[[Any], bool], str]


def at_least(low: float) -> dict[str, Rule]:
    return {"rule": (lambda v: v >= low, f">= {low}")}


def greater_than(low: float) -> dict[str, Rule]:
    return {"rule": (lambda v: v > low, f"> {low}")}


def in_range(low: float, high: float, *, high_open: bool = False) -> dict[str, Rule]:
    if high_open:
        return {"rule": (lambda v: low <= v < high, f"in [{low}, {high})")}
    return {"rule": (lambda v: low <= v <= high, f"in [{low}, {high}]")}


def one_of(choices: Iterable[str]) -> dict[str, Rule]:
    choices = sorted(choices)
    return {"rule": (lambda v: v in choices, f"one of {choices}"), "choices": choices}


_KIND = {int: "an int", float: "a number", bool: "True or False", str: "a string"}


def _typed_value(key: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names, or a ConfigError naming `key`. An int is a float; a list
    is a tuple; a bool is never an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _typed_value(key, value, arg)
            except ConfigError:
                continue
        kinds = " or ".join(_KIND.get(a, getattr(a, "__name__", str(a))) for a in args)
        raise ConfigError(f"{key}={value!r} must be {kinds}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} must be None")
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if hint in (int, bool, str):
        if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}={value!r} must be {_KIND[hint]}")
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return tuple(_typed_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin in (Mapping, dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a dict")
        k_hint, v_hint = args or (Any, Any)
        return {_typed_value(f"{key} key", k, k_hint): _typed_value(f"{key}[{k!r}]", v, v_hint) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key)
    raise TypeError(f"{key}: no rule for the type {hint!r}")


def _unknown_field_error(where: str, unknown: str, known: Iterable[str], elsewhere: Iterable[str] = ()) -> ConfigError:
    close = [f"{where}.{k}" if where else k for k in difflib.get_close_matches(unknown, list(known), n=3, cutoff=0.6)]
    same = [k for k in elsewhere if k.rsplit(".", 1)[-1] == unknown]
    near = list(dict.fromkeys(close + same))[:3]
    hint = f"; did you mean {' or '.join(near)}?" if near else f"; known: {sorted(known)}"
    return ConfigError(f"no config field {(where + '.' if where else '') + unknown!r}{hint}")


def build_section(cls: type, values: Any, where: str, *, elsewhere: Iterable[str] = ()) -> Any:
    """The dataclass `cls` from a section's plain values: every key known, every value of its
    field's type and within its rule. `where` is the section's dotted name, for the messages;
    `elsewhere` the dotted names of other sections' fields (an `lr` at the top is `train.lr`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a section (a dict of fields), got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise _unknown_field_error(where, str(key), fields, elsewhere)
    hints = typing.get_type_hints(cls)
    out = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"the config has no field {key!r}")
            continue
        value = _typed_value(key, values[name], hints[name])
        rule = f.metadata.get("rule")
        if rule is not None and value is not None and not rule[0](value):
            if "choices" in f.metadata:
                raise ConfigError(f"{key} = {value!r}: choose one of {f.metadata['choices']}")
            raise ConfigError(f"{key}={value!r} must be {rule[1]}")
        out[name] = value
    return cls(**out)


def resolve(config: Any, source: str | None = None) -> Any:
    """The typed run config (openchat_jax.train.config.RunConfig) of a loaded ConfigDict, every
    value checked; a RunConfig is returned as it is. `source` (the config file) prefixes the
    messages."""
    from openchat_jax.train.config import RunConfig, resolve_run_config

    if isinstance(config, RunConfig):
        return config
    try:
        return resolve_run_config(config)
    except ConfigError as e:
        if source:
            raise ConfigError(f"{source}: {e}") from None
        raise
