"""The held-out split: conversations kept out of training, rendered once under every condition.

`prepare` with `data.eval_fraction > 0` moves that fraction of the parsed conversations (drawn by
`data.eval_seed`, whole conversations) out of the training set; with `data.eval_files` the held-out
conversations are those files' records instead. Either way they are tokenized once per distinct
class condition, so a class can be scored under its own condition and under any other:

  DATASET_DIR/eval/<class>.npz   every held-out conversation rendered with <class>'s condition:
      tokens  int32[T]    all conversations' tokens, concatenated
      weights float32[T]  their weights (the conversation's own class weight on supervised tokens)
      offsets int64[N+1]  conversation i is tokens[offsets[i]:offsets[i+1]]
      class_ids int32[N]  the conversation's own class (never the rendering condition's)
      origins   str[N]    "file:line" of the record

Only the condition prefixes differ between the files; every file holds the same N conversations
in the same order. A held-out conversation that has no supervised token left under some condition
(truncation to `data.max_length` counts tokens, and prefixes differ in length) is dropped from all
of them and counted in report.json. Classes sharing a condition (all of them, unconditioned) share
one file, named after the first of them. dataset_info.json's "eval" entry lists the files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from openchat_jax.data.config import DataSpec
from openchat_jax.data.prepare import count_kinds
from openchat_jax.data.readers import ReadResult, Skip, read_conversations
from openchat_jax.data.template import Conversation, Example, TemplateBuilder
from openchat_jax.errors import DataError

EVAL_DIR = "eval"


@dataclasses.dataclass
class HeldOut:
    conversations: list[Conversation]
    class_ids: list[int]
    source: str  # "eval_fraction" or "eval_files"
    input_records: int
    skips: list[Skip]


@dataclasses.dataclass(frozen=True)
class EvalVariant:
    """The held-out conversations rendered under one condition."""

    name: str  # the class whose condition renders them
    condition: str
    tokens: list[np.ndarray]
    weights: list[np.ndarray]
    class_ids: np.ndarray  # int32[N], each conversation's own class
    origins: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(t) for t in self.tokens], np.int64)


def hold_out(spec: DataSpec, read: ReadResult) -> HeldOut | None:
    """The held-out conversations; with `eval_fraction` they are removed from `read` (in place)."""
    if spec.eval_files:
        got = read_conversations(dataclasses.replace(spec, files=spec.eval_files))
        return HeldOut(got.conversations, got.class_ids, "eval_files", got.input_records, got.skips)
    if not spec.eval_fraction:
        return None
    n = len(read.conversations)
    k = min(max(1, round(spec.eval_fraction * n)), n - 1) if n > 1 else 0
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(spec.eval_seed).choice(n, k, replace=False)] = True
    held = HeldOut([c for c, h in zip(read.conversations, chosen) if h],
                   [c for c, h in zip(read.class_ids, chosen) if h], "eval_fraction", k, [])
    read.conversations = [c for c, h in zip(read.conversations, chosen) if not h]
    read.class_ids = [c for c, h in zip(read.class_ids, chosen) if not h]
    return held


def distinct_conditions(spec: DataSpec) -> list[tuple[str, str]]:
    """(class name, condition) for the first class of each distinct condition, in class order."""
    seen: dict[str, str] = {}
    for c in spec.classes:
        seen.setdefault(c.condition, c.name)
    return [(name, cond) for cond, name in seen.items()]


def write_eval_split(dataset_dir: Path, spec: DataSpec, tokenizer, eot_id: int,
                     held: HeldOut) -> tuple[dict[str, Any], dict[str, Any]]:
    """Writes DATASET_DIR/eval/*.npz; returns (dataset_info entry, report entry)."""
    builder = TemplateBuilder(tokenizer, eot_id)
    variants = distinct_conditions(spec)
    rendered: dict[str, list[Example | None]] = {
        name: builder.build_examples(held.conversations, spec.classes, held.class_ids, spec.max_length, condition=cond)
        for name, cond in variants
    }
    skips = list(held.skips)
    keep: list[int] = []
    for i, conv in enumerate(held.conversations):
        missing = [name for name, _ in variants if rendered[name][i] is None]
        if missing:
            file, _, line = conv.origin.rpartition(":")
            skips.append(Skip(file, int(line), "no_supervised_token",
                              f"held out: no supervised token within max_length={spec.max_length} tokens "
                              f"under the condition of {missing}"))
        else:
            keep.append(i)
    if not keep:
        raise DataError(f"the held-out split ({held.source}) has no conversation with a supervised token; "
                        f"{len(held.conversations)} held out, skipped: {count_kinds(skips)}")
    out_dir = Path(dataset_dir) / EVAL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in spec.classes]
    class_ids = np.asarray([held.class_ids[i] for i in keep], np.int32)
    origins = np.asarray([held.conversations[i].origin for i in keep])
    files = []
    for name, cond in variants:
        examples = [rendered[name][i] for i in keep]
        lengths = [len(e.tokens) for e in examples]  # type: ignore[union-attr]
        np.savez(out_dir / f"{name}.npz",
                 tokens=np.concatenate([e.tokens for e in examples]),  # type: ignore[union-attr]
                 weights=np.concatenate([e.weights for e in examples]),  # type: ignore[union-attr]
                 offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                 class_ids=class_ids, origins=origins)
        files.append({"name": name, "condition": cond, "file": f"{EVAL_DIR}/{name}.npz"})
    own = {c.name: rendered[_variant_of(variants, c.condition)] for c in spec.classes}
    stats = {n: {"conversations": 0, "tokens": 0, "supervised_tokens": 0} for n in names}
    for i in keep:
        name = names[held.class_ids[i]]
        ex = own[name][i]
        stats[name]["conversations"] += 1
        stats[name]["tokens"] += len(ex.tokens)  # type: ignore[union-attr]
        stats[name]["supervised_tokens"] += int(np.count_nonzero(ex.weights))  # type: ignore[union-attr]
    info = {"source": held.source, "conversations": len(keep), "variants": files, "classes": stats}
    if held.source == "eval_fraction":
        info.update(fraction=spec.eval_fraction, seed=spec.eval_seed)
    else:
        info["files"] = [str(f) for f in spec.eval_files]
    skips.sort(key=lambda s: (s.file, s.line))
    report = {**info, "input_records": held.input_records, "skipped": len(skips),
              "skipped_by_kind": count_kinds(skips), "skipped_records": [s.to_dict() for s in skips]}
    assert len(keep) + len(skips) == held.input_records, report  # every held-out record accounted
    return info, report


def _variant_of(variants: Sequence[tuple[str, str]], condition: str) -> str:
    return next(name for name, cond in variants if cond == condition)


def load_eval_split(dataset_dir: str | Path, info: dict[str, Any]) -> list[EvalVariant]:
    """Every variant of a prepared dataset's held-out split (dataset_info.json as `info`)."""
    entry = info.get("eval")
    if not entry:
        raise DataError(f"{dataset_dir}: the dataset has no held-out split; prepare it with "
                        "--config.data.eval_fraction=0.05 (or data.eval_files)")
    variants = []
    for v in entry["variants"]:
        path = Path(dataset_dir) / v["file"]
        try:
            with np.load(path) as z:
                tokens, weights, offsets = z["tokens"], z["weights"], z["offsets"]
                class_ids, origins = z["class_ids"].astype(np.int32), [str(o) for o in z["origins"]]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: cannot read the held-out split ({e}); prepare again") from None
        if len(offsets) != entry["conversations"] + 1 or offsets[-1] != len(tokens):
            raise DataError(f"{path}: {len(offsets) - 1} conversations, dataset_info.json says "
                            f"{entry['conversations']} (prepare again)")
        variants.append(EvalVariant(
            name=v["name"], condition=v["condition"],
            tokens=np.split(tokens, offsets[1:-1]), weights=np.split(weights, offsets[1:-1]),
            class_ids=class_ids, origins=origins))
    return variants


def variant_for_class(variants: Sequence[EvalVariant], classes: Sequence[dict[str, Any]], class_name: str) -> EvalVariant:
    """The variant rendering with `class_name`'s condition."""
    condition = next((c["condition"] for c in classes if c["name"] == class_name), None)
    if condition is None:
        raise DataError(f"no class named {class_name!r}; classes: {[c['name'] for c in classes]}")
    return next(v for v in variants if v.condition == condition)
