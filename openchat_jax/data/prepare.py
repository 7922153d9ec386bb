"""`prepare`: conversation files -> tokenized, weighted examples in a TFDS/ArrayRecord dataset.

Output folder (`data.dataset_dir`):
  openchat_conversations/1.0.0/   TFDS dataset (ArrayRecord): tokens int32[n], weights float32[n], class_id
  index.npz                       lengths int32[N], class_ids int32[N] in record order (for packing plans)
  dataset_info.json               what the train side needs (classes, eot id, vocab size, ...)
  report.json                     per-class counts and every skipped record (file, line, reason)
  eval/                           the held-out split, when asked for (see eval_split.py)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from openchat_jax.data.config import DataSpec, validate
from openchat_jax.data.readers import Skip, read_conversations
from openchat_jax.data.template import ConvClass, Conversation, Example, TemplateBuilder, render_chat_template
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import ConfigError, DataError

FORMAT = "openchat_jax.prepared/1"
INFO_FILE = "dataset_info.json"
REPORT_FILE = "report.json"
INDEX_FILE = "index.npz"
CHUNK = 256  # conversations per worker task

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str | None, classes: Sequence[ConvClass], max_length: int) -> None:
    if tokenizer_path is not None:  # spawned worker: load its own tokenizer
        tokenizer, eot_id = load_tokenizer(tokenizer_path)
        _worker["builder"] = TemplateBuilder(tokenizer, eot_id)
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
    builder = TemplateBuilder(tokenizer, eot_id)
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
        init_args = (spec.tokenizer, spec.classes, spec.max_length)
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


def _check_output_dir(dataset_dir: Path) -> None:
    """Refuse to overwrite a folder that is not ours; clear our previous outputs."""
    from openchat_jax.data.tfds_builder import BUILDER_NAME

    if not dataset_dir.exists():
        return
    if not dataset_dir.is_dir():
        raise ConfigError(f"data.dataset_dir {dataset_dir} exists and is not a folder")
    entries = list(dataset_dir.iterdir())
    if not entries:
        return
    info = dataset_dir / INFO_FILE
    ours = info.is_file() and _read_json(info).get("format") == FORMAT
    if not ours:
        raise ConfigError(f"data.dataset_dir {dataset_dir} is not empty and holds no prepared dataset; "
                          "refusing to overwrite it")
    for name in (BUILDER_NAME, INDEX_FILE, INFO_FILE, REPORT_FILE, "eval"):
        p = dataset_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def prepare(data: ml_collections.ConfigDict, *, progress: bool = False) -> dict[str, Any]:
    """Runs the whole preparation for `config.data`; returns the report (also in report.json).

    Raises ConfigError for a bad config (before reading any data) and DataError when no example
    has a supervised token."""
    import tensorflow_datasets as tfds

    from openchat_jax.data.tfds_builder import BUILDER_NAME, make_builder, version_dir

    t0 = time.perf_counter()
    spec = validate(data)
    dataset_dir = spec.dataset_dir
    tokenizer, eot_id = load_tokenizer(spec.tokenizer)
    _check_output_dir(dataset_dir)

    read = read_conversations(spec)
    from openchat_jax.data.eval_split import hold_out, write_eval_split

    held = hold_out(spec, read)  # removes an eval_fraction split from `read`
    skips: list[Skip] = list(read.skips)
    names = [c.name for c in spec.classes]
    stats = {n: {"conversations": 0, "tokens": 0, "supervised_tokens": 0} for n in names}
    lengths: list[int] = []
    example_classes: list[int] = []
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
            yield key, {"tokens": ex.tokens, "weights": ex.weights, "class_id": np.int32(ex.class_id)}
        exhausted = True

    if not progress:
        tfds.disable_progress_bar()
    dataset_dir.mkdir(parents=True, exist_ok=True)
    downloads = dataset_dir / ".tfds_downloads"
    builder = make_builder(dataset_dir, examples, description="openchat-jax prepared conversations")
    try:
        builder.download_and_prepare(download_dir=str(downloads))
    except Exception:
        shutil.rmtree(dataset_dir / BUILDER_NAME, ignore_errors=True)
        if lengths or not exhausted:
            raise
        # TFDS refuses to write an empty split; the DataError below says why it is empty.
    finally:
        shutil.rmtree(downloads, ignore_errors=True)

    total_supervised = sum(s["supervised_tokens"] for s in stats.values())
    if not lengths or total_supervised == 0:
        shutil.rmtree(dataset_dir / BUILDER_NAME, ignore_errors=True)
        raise DataError(f"no example with a supervised token in {len(spec.files)} file(s), "
                        f"{read.input_records} record(s); skipped: {_count_kinds(skips)}")

    np.savez(dataset_dir / INDEX_FILE, lengths=np.asarray(lengths, np.int32),
             class_ids=np.asarray(example_classes, np.int32))
    best = max(range(len(spec.classes)), key=lambda i: spec.classes[i].weight)
    inference_condition = spec.classes[best].condition
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = {
        "format": FORMAT,
        "tfds": {"builder": BUILDER_NAME, "version_dir": str(version_dir(Path(".")))},
        "num_examples": len(lengths),
        "classes": [{"name": c.name, "condition": c.condition, "weight": c.weight, **stats[c.name]}
                    for c in spec.classes],
        "conditioned": spec.conditioned,
        "inference_condition": inference_condition,
        "chat_template": render_chat_template(inference_condition),
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
        info["eval"], eval_report = write_eval_split(dataset_dir, spec, tokenizer, eot_id, held)
    (dataset_dir / INFO_FILE).write_text(json.dumps(info, indent=1))

    skips.sort(key=lambda s: (s.file, s.line))
    report = {
        "input_records": read.input_records,
        "examples": len(lengths),
        "skipped": len(skips),
        "skipped_by_kind": _count_kinds(skips),
        "trimmed_leading_assistant": read.trimmed_leading_assistant,
        "truncated_to_max_length": truncated,
        "classes": {c.name: {"condition": c.condition, "weight": c.weight, **stats[c.name]} for c in spec.classes},
        "totals": {"conversations": len(lengths), "tokens": info["total_tokens"],
                   "supervised_tokens": total_supervised},
        "files": [str(f) for f in spec.files],
        "dataset_dir": str(dataset_dir),
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "skipped_records": [s.to_dict() for s in skips],
    }
    held_out = held.input_records if held is not None and held.source == "eval_fraction" else 0
    if eval_report is not None:
        report.update(held_out=held_out, eval=eval_report)
    # every record accounted
    assert report["examples"] + report["skipped"] + held_out == report["input_records"], report
    (dataset_dir / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def _count_kinds(skips: Sequence[Skip]) -> dict[str, int]:
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
