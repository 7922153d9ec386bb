"""`prepare`: conversation files -> tokenized, weighted examples in a TFDS/ArrayRecord dataset.

Output folder (`data.dataset_dir`):
  openchat_conversations/1.0.0/   TFDS dataset (ArrayRecord): tokens int32[n], weights float32[n], class_id
  index.npz                       lengths int32[N], class_ids int32[N] in record order (for packing plans)
  dataset_info.json               what the train side needs (classes, eot id, vocab size, ...)
  report.json                     per-class counts, the label table (label value -> class ->
                                  conversations), masked replies, every skipped record (file, line, reason)
  eval/                           the held-out split, when asked for (see eval_split.py)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from openchat_jax.data.config import DataSpec, validate
from openchat_jax.data.readers import Skip, read_conversations
from openchat_jax.data.template import (
    DEFAULT_FAMILY, ConvClass, Conversation, Example, TemplateBuilder, render_chat_template, template_family,
)
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import ConfigError, DataError

FORMAT = "openchat_jax.prepared/1"
INFO_FILE = "dataset_info.json"
REPORT_FILE = "report.json"
INDEX_FILE = "index.npz"
CHUNK = 256  # conversations per worker task

log = logging.getLogger(__name__)
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str | None, classes: Sequence[ConvClass], max_length: int,
                 template: str = DEFAULT_FAMILY) -> None:
    if tokenizer_path is not None:  # spawned worker: load its own tokenizer
        tokenizer, eot_id = load_tokenizer(tokenizer_path, template_family(template).eot_token)
        _worker["builder"] = TemplateBuilder(tokenizer, eot_id, template)
    _worker["classes"], _worker["max_length"] = list(classes), max_length


def _tokenize_chunk(chunk: list[tuple[Conversation, int]]) -> list[Example | None]:
    convs = [c for c, _ in chunk]
    ids = [i for _, i in chunk]
    return _worker["builder"].build_examples(convs, _worker["classes"], ids, _worker["max_length"])


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _tokenized(spec: DataSpec, tokenizer, eot_id: int, convs: list[Conversation],
               class_ids: list[int]) -> Iterator[Example | None]:
    """Examples in input order; `num_workers > 1` tokenizes in worker processes."""
    workers = spec.num_workers or os.cpu_count() or 1
    pairs = list(zip(convs, class_ids))
    builder = TemplateBuilder(tokenizer, eot_id, spec.template)
    if workers <= 1 or len(pairs) <= CHUNK:
        _worker["builder"] = builder
        _init_worker(None, spec.classes, spec.max_length)
        for chunk in _chunks(pairs, CHUNK * 8):  # one batched tokenizer call; Rust threads use all cores
            yield from _tokenize_chunk(chunk)
        return
    # fork shares the loaded tokenizer; after JAX is imported (threads) fork is unsafe: spawn.
    method = "spawn" if "jax" in sys.modules else "fork"
    if method == "fork":
        _worker["builder"] = builder
        init_args = (None, spec.classes, spec.max_length)
    else:
        init_args = (spec.tokenizer, spec.classes, spec.max_length, spec.template)
    ctx = multiprocessing.get_context(method)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process (inherited at start)
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        for result in pool.imap(_tokenize_chunk, _chunks(pairs, CHUNK)):
            yield from result


def _check_output_dir(dataset_dir: Path, overwrite: bool) -> None:
    """A new or empty folder is fine; a prepared dataset only with `overwrite`; anything else never."""
    if not dataset_dir.exists():
        return
    if not dataset_dir.is_dir():
        raise ConfigError(f"data.dataset_dir {dataset_dir} exists and is not a folder")
    if not any(dataset_dir.iterdir()):
        return
    info = dataset_dir / INFO_FILE
    if not (info.is_file() and _read_json(info).get("format") == FORMAT):
        raise ConfigError(f"data.dataset_dir {dataset_dir} is not empty and holds no prepared dataset; "
                          "refusing to overwrite it (choose a new or empty folder)")
    if not overwrite:
        raise ConfigError(f"data.dataset_dir {dataset_dir} already holds a prepared dataset; pass --overwrite "
                          "to replace it, or choose another --config.data.dataset_dir")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _sibling(dataset_dir: Path, tag: str) -> Path:
    return dataset_dir.parent / f".{dataset_dir.name}.{tag}-{os.getpid()}-{time.time_ns()}"


def _move_into_place(work: Path, dataset_dir: Path) -> None:
    """Renames the finished `work` folder to `dataset_dir`, replacing what `_check_output_dir` allowed."""
    if dataset_dir.exists():
        if not any(dataset_dir.iterdir()):
            dataset_dir.rmdir()
        else:
            old = _sibling(dataset_dir, "old")
            dataset_dir.rename(old)
            work.rename(dataset_dir)
            shutil.rmtree(old, ignore_errors=True)
            return
    work.rename(dataset_dir)


def prepare(data: ml_collections.ConfigDict, *, progress: bool = False, overwrite: bool = False,
            verbose: bool = False) -> dict[str, Any]:
    """Runs the whole preparation for `config.data`; returns the report (also in report.json).

    Raises ConfigError for a bad config (before reading any data), and DataError when no example
    has a supervised token or a class is left without conversations (unless
    `data.allow_empty_classes`). The dataset is written to a temporary sibling folder that
    replaces `data.dataset_dir` only at the end: a failure leaves no dataset folder behind.
    `overwrite`: replace a previously prepared dataset there. `verbose`: let TFDS print its
    messages (its "Downloading and preparing dataset ..." lines)."""
    t0 = time.perf_counter()
    spec = validate(data)
    dataset_dir = spec.dataset_dir
    tokenizer, eot_id = load_tokenizer(spec.tokenizer, template_family(spec.template).eot_token)
    _check_output_dir(dataset_dir, overwrite)
    created = [d for d in (dataset_dir, *dataset_dir.parents) if not d.exists()][1:]
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    work = _sibling(dataset_dir, "partial")
    work.mkdir()
    try:
        report = _prepare_into(work, spec, tokenizer, eot_id, progress=progress, verbose=verbose)
        report["wall_time_s"] = round(time.perf_counter() - t0, 2)
        (work / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        _move_into_place(work, dataset_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for d in created:  # parent folders this call made, innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return report


def _prepare_into(work: Path, spec: DataSpec, tokenizer, eot_id: int, *, progress: bool,
                  verbose: bool) -> dict[str, Any]:
    import tensorflow_datasets as tfds

    from openchat_jax.data.tfds_builder import BUILDER_NAME, make_builder, version_dir

    read = read_conversations(spec)
    from openchat_jax.data.eval_split import hold_out, write_eval_split

    held = hold_out(spec, read)  # removes an eval_fraction split from `read`
    skips: list[Skip] = list(read.skips)
    names = [c.name for c in spec.classes]
    _check_empty_classes(spec, read.class_ids, [c.label for c in read.conversations], "read")
    stats = {n: {"conversations": 0, "tokens": 0, "supervised_tokens": 0} for n in names}
    lengths: list[int] = []
    example_classes: list[int] = []
    kept_labels: list[str | None] = []
    truncated = 0
    exhausted = False

    def examples() -> Iterator[tuple[int, dict]]:
        nonlocal truncated, exhausted
        stream = _tokenized(spec, tokenizer, eot_id, read.conversations, read.class_ids)
        for conv, ex in zip(read.conversations, stream):
            file, _, line = conv.origin.rpartition(":")
            if ex is None:
                skips.append(Skip(file, int(line), "no_supervised_token",
                                  f"no supervised token within max_length={spec.max_length} tokens"))
                continue
            n = len(ex.tokens)
            truncated += n == spec.max_length
            s = stats[names[ex.class_id]]
            s["conversations"] += 1
            s["tokens"] += n
            s["supervised_tokens"] += int(np.count_nonzero(ex.weights))
            key = len(lengths)
            lengths.append(n)
            example_classes.append(ex.class_id)
            kept_labels.append(conv.label)
            yield key, {"tokens": ex.tokens, "weights": ex.weights, "class_id": np.int32(ex.class_id)}
        exhausted = True

    if not progress:
        tfds.disable_progress_bar()
    downloads = work / ".tfds_downloads"
    builder = make_builder(work, examples, description="openchat-jax prepared conversations")
    try:
        with contextlib.ExitStack() as quiet:
            if not verbose:  # TFDS prints its "Downloading and preparing dataset ..." lines to stdout
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            builder.download_and_prepare(download_dir=str(downloads))
    except Exception:
        if lengths or not exhausted:
            raise
        # TFDS refuses to write an empty split; the DataError below says why it is empty.
    finally:
        shutil.rmtree(downloads, ignore_errors=True)

    total_supervised = sum(s["supervised_tokens"] for s in stats.values())
    if not lengths or total_supervised == 0:
        raise DataError(f"no example with a supervised token in {len(spec.files)} file(s), "
                        f"{read.input_records} record(s); skipped: {_skip_summary(skips)}")
    empty = _check_empty_classes(spec, example_classes, kept_labels, "kept")
    labels = _label_rows(spec, kept_labels, example_classes)

    np.savez(work / INDEX_FILE, lengths=np.asarray(lengths, np.int32),
             class_ids=np.asarray(example_classes, np.int32))
    # The expert condition for inference: the highest-weight class that has data (first on ties).
    best = max((i for i, n in enumerate(names) if stats[n]["conversations"]), key=lambda i: spec.classes[i].weight)
    inference_condition = spec.classes[best].condition
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = {
        "format": FORMAT,
        "tfds": {"builder": BUILDER_NAME, "version_dir": str(version_dir(Path(".")))},
        "num_examples": len(lengths),
        "classes": [{"name": c.name, "condition": c.condition, "weight": c.weight, **stats[c.name]}
                    for c in spec.classes],
        "conditioned": spec.conditioned,
        "inference_class": names[best],
        "inference_condition": inference_condition,
        "template": spec.template,
        "chat_template": render_chat_template(inference_condition, spec.template),
        "eot_id": eot_id,
        "bos_id": tokenizer.bos_token_id,
        "pad_id": int(pad_id),
        "vocab_size": len(tokenizer),
        "max_length": spec.max_length,
        "tokenizer": spec.tokenizer,
        "total_tokens": int(sum(lengths)),
        "total_supervised_tokens": total_supervised,
    }
    eval_report = None
    if held is not None:
        info["eval"], eval_report = write_eval_split(work, spec, tokenizer, eot_id, held)
    (work / INFO_FILE).write_text(json.dumps(info, indent=1))

    skips.sort(key=lambda s: (s.file, s.line))
    report = {
        "input_records": read.input_records,
        "examples": len(lengths),
        "skipped": len(skips),
        "skipped_by_kind": count_kinds(skips),
        "trimmed_leading_assistant": read.trimmed_leading_assistant,
        "truncated_to_max_length": truncated,
        "classes": {c.name: {"condition": c.condition, "weight": c.weight, **stats[c.name]} for c in spec.classes},
        "empty_classes": empty,
        "inference_condition": inference_condition,
        "labels": labels,
        "default_class_conversations": sum(r["conversations"] for r in labels if r["matched_by"] == "default_class"),
        "messages_with_weight_field": read.explicit_weights,
        "masked_replies": read.masked_replies,
        "masked_by_phrase": dict(sorted(read.masked_by_phrase.items(), key=lambda kv: -kv[1])),
        "totals": {"conversations": len(lengths), "tokens": info["total_tokens"],
                   "supervised_tokens": total_supervised},
        "files": [str(f) for f in spec.files],
        "dataset_dir": str(spec.dataset_dir),
        "wall_time_s": 0.0,
        "skipped_records": [s.to_dict() for s in skips],
    }
    held_out = held.input_records if held is not None and held.source == "eval_fraction" else 0
    if eval_report is not None:
        report.update(held_out=held_out, eval=eval_report)
    # every record accounted
    assert report["examples"] + report["skipped"] + held_out == report["input_records"], report
    return report


def _label_rows(spec: DataSpec, labels: Sequence[str | None], class_ids: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (label value, class, how it was matched): conversations, most first."""
    counts: dict[tuple[str | None, int], int] = {}
    for label, cid in zip(labels, class_ids):
        counts[(label, cid)] = counts.get((label, cid), 0) + 1
    rows = [{"label": label, "class": spec.classes[cid].name, "matched_by": spec.match_label(label)[1],
             "conversations": n} for (label, cid), n in counts.items()]
    return sorted(rows, key=lambda r: (-r["conversations"], str(r["label"])))


def format_label_table(report: Mapping[str, Any], label_field: str = "", limit: int = 20) -> str:
    """The report's label table as text: label value -> class (matched by) -> conversations."""
    rows = report["labels"]
    shown = [(("(no label field" + (f" {label_field!r}" if label_field else "") + ")") if r["label"] is None
              else repr(r["label"]), r["class"], r["matched_by"], str(r["conversations"])) for r in rows[:limit]]
    head = ("label value", "class", "matched by", "conversations")
    widths = [max(len(x) for x in col) for col in zip(head, *shown)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *shown)]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more label values in report.json")
    lines.append(f"fell to default_class: {report['default_class_conversations']} conversations")
    return "\n".join(lines)


def _check_empty_classes(spec: DataSpec, class_ids: Sequence[int], labels: Sequence[str | None],
                         stage: str) -> list[str]:
    """Names of configured classes without a conversation; an error unless allowed."""
    present = set(class_ids)
    empty = [c for i, c in enumerate(spec.classes) if i not in present]
    if not empty or not class_ids:  # no conversation at all: the no-supervised-token error says more
        return [c.name for c in empty]
    rows = _label_rows(spec, labels, class_ids)
    seen = ", ".join(f"{'(none)' if r['label'] is None else repr(r['label'])} -> {r['class']} "
                     f"({r['matched_by']}, {r['conversations']})" for r in rows[:6])
    what = ", ".join(f"{c.name!r} (condition {c.condition!r})" for c in empty)
    state = "received no conversation" if stage == "read" else "has no conversation left after tokenization"
    message = (f"class {what} {state}. Labels read from field "
               f"{spec.label_field!r}: {seen}{' ...' if len(rows) > 6 else ''}. Check data.label_field and "
               "data.label_map; a label selects a class by its name, its condition or data.label_map")
    if not spec.allow_empty_classes:
        raise DataError(message + "; --config.data.allow_empty_classes=True prepares anyway")
    if stage == "kept":
        log.warning("%s (data.allow_empty_classes=True: preparing anyway)", message)
    return [c.name for c in empty]


def _skip_summary(skips: Sequence[Skip]) -> str:
    """Counts per kind, each with its first record's reason."""
    first: dict[str, Skip] = {}
    for s in skips:
        first.setdefault(s.kind, s)
    return "; ".join(f"{kind}: {n} (first: {first[kind].file}:{first[kind].line}: {first[kind].reason})"
                     for kind, n in count_kinds(skips).items()) or "nothing (no records)"


def count_kinds(skips: Sequence[Skip]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skips:
        out[s.kind] = out.get(s.kind, 0) + 1
    return dict(sorted(out.items()))


def load_dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / INFO_FILE
    info = _read_json(path)
    if info.get("format") != FORMAT:
        raise DataError(f"{path}: not a dataset prepared by `openchat-jax prepare` (missing or unreadable)")
    return info
