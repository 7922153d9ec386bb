"""The `data` section of a config, and its validation into classes (before any work starts)."""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from openchat_jax.data.template import PLAIN_CONDITION, ConvClass
from openchat_jax.errors import ConfigError

# ShareGPT / OpenAI / OpenChat role names -> "user" | "assistant" | "system". A role not listed
# here makes the record a counted skip ("unknown role").
DEFAULT_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def paper_classes() -> list[dict[str, Any]]:
    """C-RLFT paper preset: GPT-4 conversations are expert (1.0), the rest sub-optimal (0.1)."""
    return [
        {"name": "gpt4", "condition": "GPT4", "weight": 1.0},
        {"name": "gpt3", "condition": "GPT3", "weight": 0.1},
    ]


def data_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Input: paths or globs of .json (array of records) / .jsonl (one record per line) files.
        "files": [],
        # Record field whose value selects the class (ShareGPT exports: "model").
        "label_field": "source",
        # Each class: name, condition (template prefix), and either "weight" (> 0) or "reward"
        # (weight = exp(reward / beta), normalised so that the best class has weight 1.0).
        "classes": paper_classes(),
        "beta": 1.0,
        # label value -> class name. A label equal to a class name also selects that class.
        "label_map": {"Model: GPT-4": "gpt4"},
        # Class for labels nobody claims and for records without the label field ("" = skip them).
        "default_class": "gpt3",
        # False: every class uses the plain template ("User:"/"Assistant:"), weights unchanged
        # (the paper's no-condition ablation).
        "conditioned": True,
        "role_map": dict(DEFAULT_ROLE_MAP),
        # Drop an assistant message that opens a conversation (ShareGPT splits long chats into
        # parts that start mid-dialogue); counted in report.json. False: such records are skipped.
        "drop_leading_assistant": True,
        "tokenizer": "",  # local folder or hub name
        "max_length": 4096,  # truncation length (keeps the start); also the packing row length
        "dataset_dir": "",  # where `prepare` writes the TFDS/ArrayRecord dataset and report.json
        "num_workers": 0,  # tokenization processes; 0 = one per CPU core
        # Held-out split (see data/eval_split.py): a fraction of the conversations, drawn by
        # eval_seed, or the conversations of eval_files (not both). 0.0 and [] = none.
        "eval_fraction": 0.0,
        "eval_files": [],
        "eval_seed": 0,
    })


@dataclass(frozen=True)
class DataSpec:
    """The validated `data` config."""

    files: tuple[Path, ...]
    label_field: str
    classes: tuple[ConvClass, ...]  # with the effective condition (plain when unconditioned)
    configured_conditions: tuple[str, ...]
    label_to_class: Mapping[str, int]
    default_class: int | None
    conditioned: bool
    role_map: Mapping[str, str]
    drop_leading_assistant: bool
    tokenizer: str
    max_length: int
    dataset_dir: Path
    num_workers: int
    eval_fraction: float = 0.0
    eval_files: tuple[Path, ...] = ()
    eval_seed: int = 0

    def class_for_label(self, label: str | None) -> int | None:
        if label is not None and label in self.label_to_class:
            return self.label_to_class[label]
        return self.default_class


def _as_plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def resolve_classes(classes: Any, beta: float) -> tuple[list[ConvClass], list[str]]:
    classes = _as_plain(classes)
    if not isinstance(classes, (list, tuple)) or not classes:
        raise ConfigError("data.classes must be a non-empty list of {name, condition, weight|reward}")
    names: list[str] = []
    conditions: list[str] = []
    weights: list[float | None] = []
    rewards: list[float | None] = []
    for i, c in enumerate(classes):
        c = _as_plain(c)
        where = f"data.classes[{i}]"
        if not isinstance(c, Mapping):
            raise ConfigError(f"{where} must be a dict with name, condition and weight or reward")
        unknown = set(c) - {"name", "condition", "weight", "reward"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = c.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise ConfigError(f"{where}: duplicate class name {name!r}")
        condition = c.get("condition", "")
        if not isinstance(condition, str):
            raise ConfigError(f"{where} ({name}): 'condition' must be a string")
        has_w, has_r = c.get("weight") is not None, c.get("reward") is not None
        if has_w == has_r:
            raise ConfigError(f"{where} ({name}): give exactly one of 'weight' or 'reward'")
        if has_w:
            w = c["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"{where} ({name}): weight must be a finite number > 0, got {w!r}")
            weights.append(float(w))
            rewards.append(None)
        else:
            r = c["reward"]
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise ConfigError(f"{where} ({name}): reward must be a finite number, got {r!r}")
            weights.append(None)
            rewards.append(float(r))
        names.append(name)
        conditions.append(condition)
    if any(r is not None for r in rewards):
        if any(w is not None for w in weights):
            raise ConfigError("data.classes: use either weights for all classes or rewards for all classes")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
            raise ConfigError(f"data.beta must be a finite number > 0, got {beta!r}")
        best = max(rewards)  # type: ignore[type-var]
        # exp((r - best) / beta): the best class gets 1.0 and nothing overflows.
        weights = [math.exp((r - best) / beta) for r in rewards]  # type: ignore[operator]
        for name, w in zip(names, weights):
            if not w > 0:
                raise ConfigError(f"data.classes ({name}): reward gives weight {w!r} (underflow); raise beta")
    return [ConvClass(n, cond, float(w)) for n, cond, w in zip(names, conditions, weights)], conditions


def expand_files(patterns: Any) -> tuple[Path, ...]:
    patterns = _as_plain(patterns)
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ConfigError("data.files must be a non-empty list of paths or globs")
    out: list[Path] = []
    for p in patterns:
        p = str(p)
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else ([p] if Path(p).exists() else [])
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ConfigError(f"data.files: {p!r} matches no file")
        out.extend(Path(m) for m in matches)
    return tuple(dict.fromkeys(out))


def validate(data: ml_collections.ConfigDict, *, need_files: bool = True) -> DataSpec:
    """Checks everything that can be checked without reading data; raises ConfigError."""
    classes, conditions = resolve_classes(data.get("classes"), data.get("beta", 1.0))
    names = [c.name for c in classes]
    label_map = _as_plain(data.get("label_map")) or {}
    if not isinstance(label_map, Mapping):
        raise ConfigError("data.label_map must be a dict {label: class name}")
    label_to_class: dict[str, int] = {n: i for i, n in enumerate(names)}
    for label, cname in label_map.items():
        if cname not in names:
            raise ConfigError(f"data.label_map[{label!r}] = {cname!r}: no such class (classes: {names})")
        label_to_class[str(label)] = names.index(cname)
    default = data.get("default_class") or None
    if default is not None and default not in names:
        raise ConfigError(f"data.default_class = {default!r}: no such class (classes: {names})")
    conditioned = bool(data.get("conditioned", True))
    if not conditioned:
        classes = [ConvClass(c.name, PLAIN_CONDITION, c.weight) for c in classes]
    role_map = _as_plain(data.get("role_map")) or dict(DEFAULT_ROLE_MAP)
    bad_roles = {k: v for k, v in role_map.items() if v not in ("user", "assistant", "system")}
    if bad_roles:
        raise ConfigError(f"data.role_map: values must be user/assistant/system, got {bad_roles}")
    max_length = data.get("max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"data.max_length must be an integer >= 2, got {max_length!r}")
    label_field = data.get("label_field")
    if not isinstance(label_field, str) or not label_field:
        raise ConfigError("data.label_field must be a non-empty string")
    num_workers = data.get("num_workers", 0)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
    eval_fraction = data.get("eval_fraction", 0.0)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    eval_files = _as_plain(data.get("eval_files")) or []
    if eval_fraction and eval_files:
        raise ConfigError("give either data.eval_fraction or data.eval_files for the held-out split, not both")
    eval_seed = data.get("eval_seed", 0)
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, int):
        raise ConfigError(f"data.eval_seed must be an integer, got {eval_seed!r}")
    if need_files:
        if not data.get("tokenizer"):
            raise ConfigError("data.tokenizer is empty: give a tokenizer folder or hub name")
        if not data.get("dataset_dir"):
            raise ConfigError("data.dataset_dir is empty: give the output folder")
    return DataSpec(
        files=expand_files(data.get("files")) if need_files else (),
        label_field=label_field,
        classes=tuple(classes),
        configured_conditions=tuple(conditions),
        label_to_class=label_to_class,
        default_class=None if default is None else names.index(default),
        conditioned=conditioned,
        role_map=dict(role_map),
        drop_leading_assistant=bool(data.get("drop_leading_assistant", True)),
        tokenizer=str(data.get("tokenizer") or ""),
        max_length=max_length,
        dataset_dir=Path(str(data.get("dataset_dir") or ".")),
        num_workers=num_workers,
        eval_fraction=float(eval_fraction),
        eval_files=_expand_eval_files(eval_files) if need_files and eval_files else (),
        eval_seed=eval_seed,
    )


def _expand_eval_files(patterns: Any) -> tuple[Path, ...]:
    try:
        return expand_files(patterns)
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.files", "data.eval_files", 1)) from None
