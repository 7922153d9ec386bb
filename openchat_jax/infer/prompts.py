"""Prompt files for `openchat-jax generate`: JSONL, one record per line, in either form

  {"id": ..., "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
      a conversation ending with a user message; one answer is generated.
  {"question_id": ..., "turns": [str, ...]}       (MT-bench questions)
      user turns; each answer is fed back into the history before the next turn.

Either form may carry "system": str. Blank lines are skipped; anything else that is not a valid
record is a DataError naming file:line and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TextIO

from openchat_jax.errors import DataError

if TYPE_CHECKING:
    import jax

    from openchat_jax.data.template import ConvClass
    from openchat_jax.infer.engine import ChatModel
    from openchat_jax.infer.sampling import SamplingConfig

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class PromptRecord:
    key: str  # "id" or "question_id": the field the output line uses
    id: Any
    system: str | None
    history: list[dict[str, str]]  # alternating user/assistant messages before the first pending turn
    turns: list[str]  # user messages still to answer, in order
    where: str  # "file:line", for error messages


def _fail(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}")


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, f"field {field!r} is empty")
    return value


def _listed(obj: dict[str, Any], field: str, id_field: str, where: str, what: str) -> list[Any]:
    """obj[field], which must be `what` (a non-empty list), in a record that also has `id_field`."""
    if id_field not in obj:
        article = "an" if id_field[0] in "aeiou" else "a"
        raise _fail(where, f"a record with {field!r} needs {article} {id_field!r}")
    value = obj[field]
    if not isinstance(value, list) or not value:
        raise _fail(where, f"field {field!r} must be {what}")
    return value


def parse_record(obj: Any, where: str) -> PromptRecord:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    system = obj.get("system")
    if system is not None:
        system = _string(system, where, "system")

    if "turns" in obj:
        turns = _listed(obj, "turns", "question_id", where, "a non-empty list of strings")
        turns = [_string(t, where, f"turns[{i}]") for i, t in enumerate(turns)]
        return PromptRecord("question_id", obj["question_id"], system, [], turns, where)

    if "messages" in obj:
        messages = _listed(obj, "messages", "id", where, "a non-empty list")
        history: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            field = f"messages[{i}]"
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise _fail(where, f"{field} must be an object with 'role' and 'content'")
            role = m["role"]
            if role not in ROLES:
                raise _fail(where, f"{field}.role={role!r}: expected one of {ROLES}")
            content = _string(m["content"], where, f"{field}.content")
            if role == "system":
                if i != 0:
                    raise _fail(where, f"{field}: a system message may only come first")
                if system is not None:
                    raise _fail(where, "both a 'system' field and a system message")
                system = content
                continue
            expected = "user" if len(history) % 2 == 0 else "assistant"
            if role != expected:
                raise _fail(where, f"{field}.role={role!r}: expected {expected!r} (user and assistant alternate, user first)")
            history.append({"role": role, "content": content})
        if not history or history[-1]["role"] != "user":
            raise _fail(where, "'messages' must end with a user message (the one to answer)")
        return PromptRecord("id", obj["id"], system, history[:-1], [history[-1]["content"]], where)

    raise _fail(where, "expected 'messages' (with 'id') or 'turns' (with 'question_id')")


def read_prompts(path: str | Path) -> list[PromptRecord]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _fail(where, f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (Windows editors) is not part of the JSON
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(where, f"malformed JSON: {e.msg} (column {e.colno})") from None
            record = parse_record(obj, where)
            ident = json.dumps(record.id)
            if ident in seen:
                raise _fail(where, f"{record.key}={record.id!r} repeats the record at {seen[ident]}")
            seen[ident] = where
            records.append(record)
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


@contextlib.contextmanager
def replaced_when_done(path: Path) -> Iterator[TextIO]:
    """A text file written as `.NAME.partial` next to `path` and renamed to `path` when the block
    ends without an error; on an error it is removed (no empty or half file named `path`)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            yield f
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def default_model_id(ckpt_dir: str | Path) -> str:
    """The name answers are filed under: the weights folder's name, or for a training run's
    `RUN/final` the run's name (every run's weights folder is called "final")."""
    path = Path(str(ckpt_dir).rstrip("/"))
    if path.name == "final" and path.parent.name:
        return path.parent.name
    return path.name or str(ckpt_dir)


def run_prompts(
    model: "ChatModel",
    records: Sequence[PromptRecord],
    conv_class: "ConvClass",
    out_path: str | Path,
    *,
    max_new_tokens: int = 512,
    sampling: "SamplingConfig | None" = None,
    key: "jax.Array | None" = None,
    context: int | None = None,
    truncate: bool = False,
    batch_size: int = 16,
    model_id: str = "openchat-jax",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every record (each turn of a multi-turn record after the previous answer is put back
    into the history) and write one JSON line per record to `out_path`, in input order. Records
    are processed `batch_size` at a time, all turns of a chunk before the next chunk; lines go to
    a temporary file next to `out_path` as chunks finish, renamed to `out_path` once all are
    written (a run that fails leaves no file). Returns a summary (counts of answers, new tokens,
    stops)."""
    import jax
    from tqdm import tqdm

    from openchat_jax.infer.engine import answer
    from openchat_jax.infer.sampling import SamplingConfig

    sampling = SamplingConfig() if sampling is None else sampling
    key = jax.random.key(0) if key is None else key
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"records": 0, "answers": 0, "new_tokens": 0, "stopped": 0, "truncated_prompts": 0}
    bar = tqdm(total=sum(len(r.turns) for r in records), unit="answer", disable=not progress)
    call = 0
    with replaced_when_done(out_path) as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            histories = [list(r.history) for r in chunk]
            results: list[list[Any]] = [[] for _ in chunk]
            for turn in range(max(len(r.turns) for r in chunk)):
                active = [i for i, r in enumerate(chunk) if turn < len(r.turns)]
                convs = [(histories[i] + [{"role": "user", "content": chunk[i].turns[turn]}], chunk[i].system)
                         for i in active]
                answers = answer(
                    model, convs, conv_class.condition, max_new_tokens=max_new_tokens, sampling=sampling,
                    key=jax.random.fold_in(key, call), context=context, truncate=truncate, batch_size=batch_size,
                    wheres=[f"{chunk[i].where} (turn {turn + 1})" for i in active], on_batch=bar.update,
                )
                call += 1
                for i, (msgs, _), a in zip(active, convs, answers):
                    histories[i] = msgs + [{"role": "assistant", "content": a.text}]
                    results[i].append(a)
            for r, res in zip(chunk, results):
                line = {
                    r.key: r.id,
                    "model_id": model_id,
                    "condition": conv_class.name,
                    "answers": [a.text for a in res],
                    "finish_reasons": [a.finish_reason for a in res],
                    "new_tokens": [len(a.tokens) for a in res],
                    "prompt_tokens": [a.prompt_tokens for a in res],
                }
                if any(a.truncated for a in res):
                    line["truncated_prompt_tokens"] = [a.truncated for a in res]
                if r.key == "question_id":  # FastChat's MT-bench answer layout
                    line["choices"] = [{"index": 0, "turns": line["answers"]}]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                summary["records"] += 1
                summary["answers"] += len(res)
                summary["new_tokens"] += sum(len(a.tokens) for a in res)
                summary["stopped"] += sum(a.finish_reason == "stop" for a in res)
                summary["truncated_prompts"] += sum(a.truncated > 0 for a in res)
            out.flush()
    bar.close()
    return summary
