"""Which condition (template prefix) to generate with.

The classes a model was trained with are read from JSON next to the weights or the prepared data:
`classes.json` (in the checkpoint folder) or `dataset_info.json` (in a prepared dataset folder).
Accepted shapes: a list of {"name", "condition", "weight"}; or an object whose "classes" entry is
such a list or a {name: {"condition", "weight"}} map, optionally with "inference_condition" (as
training's `final/classes.json` and `dataset_info.json` record it). Without a choice the class of the
recorded inference condition is used, else the class with the highest weight (the expert one), as the
paper does at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from openchat_jax.data.template import ConvClass
from openchat_jax.errors import ConfigError

CLASS_FILES = ("classes.json", "dataset_info.json")


def _parse(obj: Any, where: str) -> list[ConvClass]:
    if isinstance(obj, dict) and "classes" in obj:
        obj = obj["classes"]
    if isinstance(obj, dict):
        obj = [{"name": name, **(spec if isinstance(spec, dict) else {})} for name, spec in obj.items()]
    if not isinstance(obj, list) or not obj:
        raise ConfigError(f"{where}: expected a non-empty list of classes (name, condition, weight)")
    classes = []
    for i, c in enumerate(obj):
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: classes[{i}] is not an object")
        missing = [k for k in ("name", "condition", "weight") if k not in c]
        if missing:
            raise ConfigError(f"{where}: classes[{i}] lacks {missing}")
        if not isinstance(c["condition"], str) or not isinstance(c["weight"], (int, float)):
            raise ConfigError(f"{where}: classes[{i}] needs a string condition and a numeric weight")
        classes.append(ConvClass(name=str(c["name"]), condition=c["condition"], weight=float(c["weight"])))
    return classes


def read_classes(path: str | Path) -> list[ConvClass]:
    """Classes from a JSON file, or from the first of CLASS_FILES found in a folder."""
    return _read(path)[0]


def _read(path: str | Path) -> tuple[list[ConvClass], str | None, str]:
    """(classes, the recorded inference condition or None, the recorded template family)."""
    from openchat_jax.data.template import DEFAULT_FAMILY, FAMILIES

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in CLASS_FILES if (path / name).is_file()]
        if not found:
            raise ConfigError(f"{path}: holds none of {list(CLASS_FILES)}, so its classes are unknown")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"class file not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    record = obj if isinstance(obj, dict) else {}
    condition = record.get("inference_condition")
    if condition is not None and not isinstance(condition, str):
        raise ConfigError(f"{path}: inference_condition must be a string, got {type(condition).__name__}")
    template = record.get("template", DEFAULT_FAMILY)
    if template not in FAMILIES:
        raise ConfigError(f"{path}: template {template!r} is not one of {sorted(FAMILIES)}")
    return _parse(obj, str(path)), condition, template


def _find(ckpt_dir: str | Path, classes_from: str | Path | None) -> tuple[list[ConvClass], str | None, str] | None:
    if classes_from is not None:
        return _read(classes_from)
    ckpt = Path(ckpt_dir)
    if any((ckpt / name).is_file() for name in CLASS_FILES):
        return _read(ckpt)
    return None


def find_classes(ckpt_dir: str | Path, classes_from: str | Path | None = None) -> list[ConvClass] | None:
    """`classes_from` if given, else the checkpoint folder's class file, else None."""
    found = _find(ckpt_dir, classes_from)
    return None if found is None else found[0]


def find_template(ckpt_dir: str | Path, classes_from: str | Path | None = None) -> str:
    """The template family the class file records (training's classes.json, dataset_info.json);
    the default family when there is no class file or it does not say."""
    from openchat_jax.data.template import DEFAULT_FAMILY

    found = _find(ckpt_dir, classes_from)
    return DEFAULT_FAMILY if found is None else found[2]


def choose_class(classes: Sequence[ConvClass], name: str | None = None,
                 inference_condition: str | None = None) -> ConvClass:
    """The named class; else the recorded inference condition's class; else the one with the
    highest weight (first on ties)."""
    if name is None:
        matching = [c for c in classes if c.condition == inference_condition]
        return max(matching or classes, key=lambda c: c.weight)
    for c in classes:
        if c.name == name:
            return c
    raise ConfigError(f"no class named {name!r} (--condition); known classes: {[c.name for c in classes]}")


def resolve_condition(
    ckpt_dir: str | Path,
    *,
    class_name: str | None = None,
    condition_text: str | None = None,
    classes_from: str | Path | None = None,
) -> ConvClass:
    """The class to generate with. `condition_text` (a literal template prefix, e.g. "GPT4") wins;
    otherwise the class is chosen from the recorded classes."""
    if condition_text is not None:
        if class_name is not None:
            raise ConfigError("give either a class name (--condition) or a literal prefix (--condition-text), not both")
        return ConvClass(name=condition_text or "plain", condition=condition_text, weight=1.0)
    found = _find(ckpt_dir, classes_from)
    if found is None:
        raise ConfigError(
            f"{ckpt_dir}: no {' or '.join(CLASS_FILES)} records the classes; pass --classes-from DATASET_DIR "
            "or a literal template prefix with --condition-text (e.g. GPT4)"
        )
    return choose_class(found[0], class_name, found[1])
