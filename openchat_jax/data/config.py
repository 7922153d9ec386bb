"""The `data` section of a config, and its validation into classes (before any work starts)."""

from __future__ import annotations

import difflib
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import ml_collections

from openchat_jax.config import at_least, build_section, in_range, one_of
from openchat_jax.data.template import DEFAULT_FAMILY, FAMILIES, PLAIN_CONDITION, ConvClass
from openchat_jax.errors import ConfigError

# ShareGPT / OpenAI / OpenChat role names -> "user" | "assistant" | "system", matched
# case-insensitively ("Human", "GPT"). A role not listed here makes the record a counted skip
# ("unknown_role").
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
        # label value -> class name. A label equal to a class's name or to its condition (OpenChat
        # records' "condition": "GPT4") also selects that class; a label that would select two
        # different classes is a config error.
        "label_map": {"Model: GPT-4": "gpt4"},
        # Class for labels nobody claims and for records without the label field ("" = skip them).
        "default_class": "gpt3",
        # False: a configured class that receives no conversation stops `prepare` with an error
        # (a label field or label map that matches nothing); True: only a loud warning.
        "allow_empty_classes": False,
        # False: every class uses the plain template ("User:"/"Assistant:"), weights unchanged
        # (the paper's no-condition ablation).
        "conditioned": True,
        "role_map": dict(DEFAULT_ROLE_MAP),
        # Drop an assistant message that opens a conversation (ShareGPT splits long chats into
        # parts that start mid-dialogue); counted in report.json. False: such records are skipped.
        "drop_leading_assistant": True,
        # A UTF-8 text file, one phrase per line (blank lines ignored): an assistant reply that
        # contains any phrase (case-insensitive) gets weight 0, counted in report.json; a
        # conversation left with no supervised token is a counted skip. "" = no masking.
        "mask_phrases_file": "",
        "tokenizer": "",  # local folder or hub name
        "max_length": 4096,  # truncation length (keeps the start); also the packing row length
        "dataset_dir": "",  # where `prepare` writes the TFDS/ArrayRecord dataset and report.json
        "num_workers": 0,  # tokenization processes; 0 = one per CPU core
        # Template family: openchat_v3.2 (Llama-2), openchat_3.5 (Mistral), openchat_3.6 (Llama-3).
        "template": DEFAULT_FAMILY,
        # Held-out split (see data/eval_split.py): a fraction of the conversations, drawn by
        # eval_seed, or the conversations of eval_files (not both). 0.0 and [] = none.
        "eval_fraction": 0.0,
        "eval_files": [],
        "eval_seed": 0,
    })


@dataclass(frozen=True)
class DataConfig:
    """The `data` section, typed and checked (`data_defaults` documents each field)."""

    files: tuple[str, ...]
    label_field: str = field(metadata={"rule": (bool, "a non-empty string")})
    classes: tuple[Mapping[str, Any], ...]  # checked by resolve_classes
    beta: float
    label_map: Mapping[str, str]
    default_class: str
    allow_empty_classes: bool
    conditioned: bool
    role_map: Mapping[str, str]
    drop_leading_assistant: bool
    mask_phrases_file: str
    tokenizer: str
    max_length: int = field(metadata=at_least(2))
    dataset_dir: str
    num_workers: int = field(metadata=at_least(0))
    template: str = field(metadata=one_of(FAMILIES))
    eval_fraction: float = field(metadata=in_range(0, 1, high_open=True))
    eval_files: tuple[str, ...]
    eval_seed: int


def data_config(data: Any) -> DataConfig:
    """The typed `data` section of a ConfigDict (or a DataConfig as it is)."""
    if isinstance(data, DataConfig):
        return data
    return build_section(DataConfig, _as_plain(data), "data")


@dataclass(frozen=True)
class DataSpec:
    """The validated `data` config."""

    files: tuple[Path, ...]
    label_field: str
    classes: tuple[ConvClass, ...]  # with the effective condition (plain when unconditioned)
    label_to_class: Mapping[str, int]
    default_class: int | None
    conditioned: bool
    role_map: Mapping[str, str]  # lower-case role -> user / assistant / system
    drop_leading_assistant: bool
    tokenizer: str
    max_length: int
    dataset_dir: Path
    num_workers: int
    # how each label of `label_to_class` selects its class: "name", "condition" or "label_map"
    label_match: Mapping[str, str] = field(default_factory=dict)
    allow_empty_classes: bool = False
    mask_phrases: tuple[str, ...] = ()  # case-folded
    template: str = DEFAULT_FAMILY
    eval_fraction: float = 0.0
    eval_files: tuple[Path, ...] = ()
    eval_seed: int = 0

    def class_for_label(self, label: str | None) -> int | None:
        return self.match_label(label)[0]

    def match_label(self, label: str | None) -> tuple[int | None, str]:
        """(class index or None, how: "name" | "condition" | "label_map" | "default_class" | "unclaimed")."""
        if label is not None and label in self.label_to_class:
            return self.label_to_class[label], self.label_match.get(label, "label_map")
        return self.default_class, "unclaimed" if self.default_class is None else "default_class"


def _as_plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


CLASS_FIELDS = ("name", "condition", "weight", "reward")


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
        for key in c:
            if key not in CLASS_FIELDS:
                near = difflib.get_close_matches(str(key), CLASS_FIELDS, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known: {list(CLASS_FIELDS)}"
                raise ConfigError(f"{where}: unknown field {key!r}{hint}")
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


def validate(data: Any, *, need_files: bool = True) -> DataSpec:
    """Checks everything that can be checked without reading data; raises ConfigError. The
    fields' types and ranges are checked by `data_config`; this adds what ties them together
    (classes, label map, default class) and, with `need_files`, the input files."""
    data = data_config(data)
    classes, conditions = resolve_classes(data.classes, data.beta)
    names = [c.name for c in classes]
    for label, cname in data.label_map.items():
        if cname not in names:
            raise ConfigError(f"data.label_map[{label!r}] = {cname!r}: no such class (classes: {names})")
    label_to_class, label_match = _label_table(names, conditions, data.label_map)
    default = data.default_class or None
    if default is not None and default not in names:
        raise ConfigError(f"data.default_class = {default!r}: no such class (classes: {names})")
    if not data.conditioned:
        classes = [ConvClass(c.name, PLAIN_CONDITION, c.weight) for c in classes]
    role_map = _role_map(data.role_map or dict(DEFAULT_ROLE_MAP))
    if data.eval_fraction and data.eval_files:
        raise ConfigError("give either data.eval_fraction or data.eval_files for the held-out split, not both")
    if need_files:
        if not data.tokenizer:
            raise ConfigError("data.tokenizer is empty: give a tokenizer folder or hub name")
        if not data.dataset_dir:
            raise ConfigError("data.dataset_dir is empty: give the output folder")
    return DataSpec(
        files=expand_files(data.files) if need_files else (),
        label_field=data.label_field,
        classes=tuple(classes),
        label_to_class=label_to_class,
        default_class=None if default is None else names.index(default),
        conditioned=data.conditioned,
        role_map=dict(role_map),
        drop_leading_assistant=data.drop_leading_assistant,
        tokenizer=data.tokenizer,
        max_length=data.max_length,
        dataset_dir=Path(data.dataset_dir or "."),
        num_workers=data.num_workers,
        label_match=label_match,
        allow_empty_classes=data.allow_empty_classes,
        mask_phrases=read_mask_phrases(data.mask_phrases_file) if need_files and data.mask_phrases_file else (),
        template=data.template,
        eval_fraction=data.eval_fraction,
        eval_files=_expand_eval_files(data.eval_files) if need_files and data.eval_files else (),
        eval_seed=data.eval_seed,
    )


def _label_table(names: list[str], conditions: list[str],
                 label_map: Mapping[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """label -> class index, and how the label selects it. A label that selects two different
    classes (say a class's condition mapped elsewhere by label_map) is a ConfigError."""
    to_class: dict[str, int] = {}
    how: dict[str, str] = {}

    def claim(label: str, index: int, kind: str) -> None:
        if label in to_class and to_class[label] != index:
            raise ConfigError(
                f"data: label {label!r} is ambiguous: it selects class {names[to_class[label]]!r} (by its "
                f"{how[label].replace('_', ' ')}) and class {names[index]!r} (by its {kind.replace('_', ' ')}); "
                "rename a class or condition, or drop the data.label_map entry")
        to_class[label] = index
        how.setdefault(label, kind)

    for i, name in enumerate(names):
        claim(name, i, "name")
    for i, condition in enumerate(conditions):
        if condition:
            claim(condition, i, "condition")
    for label, cname in label_map.items():
        claim(str(label), names.index(cname), "label_map")
    return to_class, how


def _role_map(role_map: Mapping[str, str]) -> dict[str, str]:
    bad_roles = {k: v for k, v in role_map.items() if v not in ("user", "assistant", "system")}
    if bad_roles:
        raise ConfigError(f"data.role_map: values must be user/assistant/system, got {bad_roles}")
    out: dict[str, str] = {}
    for role, mapped in role_map.items():
        key = str(role).lower()
        if out.get(key, mapped) != mapped:
            raise ConfigError(f"data.role_map: {role!r} -> {mapped!r} but another spelling of it maps to "
                              f"{out[key]!r} (roles are matched case-insensitively)")
        out[key] = mapped
    return out


def read_mask_phrases(path: str | Path) -> tuple[str, ...]:
    """The phrases of `data.mask_phrases_file`, case-folded, blank lines skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data.mask_phrases_file: {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.mask_phrases_file: cannot read {p} as UTF-8 text ({e})") from None
    phrases = tuple(dict.fromkeys(line.strip().casefold() for line in text.splitlines() if line.strip()))
    if not phrases:
        raise ConfigError(f"data.mask_phrases_file: {p} holds no phrase (one phrase per line)")
    return phrases


def _expand_eval_files(patterns: Any) -> tuple[Path, ...]:
    try:
        return expand_files(patterns)
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.files", "data.eval_files", 1)) from None
