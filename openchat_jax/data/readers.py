"""Conversation files -> validated `Conversation`s, with every unusable record a counted skip.

Files: a JSON array of records (`[...]`, parsed record by record, so a truncated file keeps its
complete records), a single JSON object, or JSONL (one record per line; blank lines ignored).
Formats, detected per record by their list field:
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|..., "value": str}], ...}
  OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": str}], ...}
  OpenChat  {"items": [{"role", "content"}], "condition": str, "system": str}
A system prompt is a top-level "system" string or a first message with role system. The label is
the record's `label_field` (for OpenChat records without it, their "condition").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from openchat_jax.data.config import DataSpec
from openchat_jax.data.template import Conversation, Message

_WS = re.compile(r"\s*")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
_FORMATS = (  # list field, role key, content key
    ("conversations", "from", "value"),
    ("messages", "role", "content"),
    ("items", "role", "content"),
)


@dataclass(frozen=True)
class Skip:
    file: str
    line: int
    kind: str  # short category, counted in report.json
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "kind": self.kind, "reason": self.reason}


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    input_records: int = 0
    trimmed_leading_assistant: int = 0


class RecordError(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields `(line, record)`; a record that cannot be read is yielded as a `RecordError`."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    start = _WS.match(text).end()
    if start < len(text) and text[start] == "[":
        yield from _iter_array(text, start + 1)
        return
    if start < len(text) and text[start] == "{" and path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            pass  # not one object: read it as JSONL
        else:
            line = 1 + text.count("\n", 0, start)
            yield line, (RecordError("not_utf8", "text is not valid UTF-8") if _SURROGATE.search(text) else obj)
            return
    for i, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if _SURROGATE.search(raw):
            yield i, RecordError("not_utf8", "text is not valid UTF-8")
            continue
        try:
            yield i, json.loads(raw)
        except json.JSONDecodeError as e:
            yield i, RecordError("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_array(text: str, pos: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    has_bad_bytes = _SURROGATE.search(text) is not None
    line, line_pos = 1, 0
    while True:
        pos = _WS.match(text, pos).end()
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        if pos >= len(text):
            yield line, RecordError("malformed_json", "malformed JSON: the array is not closed (truncated file?)")
            return
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line, RecordError(
                "malformed_json", f"malformed JSON: {e.msg}; the rest of the file cannot be read")
            return
        if has_bad_bytes and _SURROGATE.search(text, pos, end):
            yield line, RecordError("not_utf8", "text is not valid UTF-8")
        else:
            yield line, obj
        pos = _WS.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            line += text.count("\n", line_pos, pos)
            yield line, RecordError("malformed_json", "malformed JSON: expected ',' or ']' after a record; "
                                    "the rest of the file cannot be read")
            return


def parse_record(obj: Any, spec: DataSpec) -> tuple[tuple[Message, ...], str, str | None, bool]:
    """Returns `(messages, system, label, trimmed_leading_assistant)` or raises RecordError."""
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"record is a JSON {type(obj).__name__}, not an object")
    for list_key, role_key, content_key in _FORMATS:
        if list_key in obj:
            break
    else:
        raise RecordError("missing_field", "missing field: none of 'conversations', 'messages', 'items'")
    items = obj[list_key]
    if not isinstance(items, list):
        raise RecordError("wrong_type", f"field {list_key!r} is not a list")
    system = obj.get("system", "")
    if system is None:
        system = ""
    if not isinstance(system, str):
        raise RecordError("wrong_type", "field 'system' is not a string")
    messages: list[Message] = []
    for k, m in enumerate(items):
        where = f"{list_key}[{k}]"
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"{where} is not an object")
        role = m.get(role_key, m.get("role" if role_key == "from" else "from"))
        content = m.get(content_key, m.get("content" if content_key == "value" else "value"))
        if role is None:
            raise RecordError("missing_field", f"{where}: missing field {role_key!r}")
        if content is None:
            raise RecordError("missing_field", f"{where}: missing field {content_key!r}")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"{where}: field {content_key!r} is not a string")
        if not isinstance(role, str) or role not in spec.role_map:
            raise RecordError("unknown_role", f"{where}: unknown role {role!r} (known: {sorted(spec.role_map)})")
        mapped = spec.role_map[role]
        if mapped == "system":
            if k != 0:
                raise RecordError("misplaced_system", f"{where}: a system message may only come first")
            if system and content:
                raise RecordError("misplaced_system", f"{where}: system prompt given twice (also field 'system')")
            system = system or content
            continue
        if not content.strip():
            raise RecordError("empty_message", f"{where}: empty message")
        messages.append(Message(mapped, content))
    trimmed = False
    if messages and messages[0].role == "assistant" and spec.drop_leading_assistant:
        messages, trimmed = messages[1:], True
    if not messages:
        raise RecordError("no_assistant_turn", "no user/assistant messages" + (
            " after dropping the leading assistant message" if trimmed else ""))
    offset = len(items) - len(messages)
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m.role != expected:
            raise RecordError("roles_not_alternating",
                              f"{list_key}[{k + offset}]: roles don't alternate ({m.role!r} where {expected!r} "
                              "was expected; conversations go user, assistant, user, ...)")
    if len(messages) < 2:
        raise RecordError("no_assistant_turn", "no assistant turn")
    label = obj.get(spec.label_field)
    if label is None and list_key == "items" and obj.get("condition"):
        label = obj["condition"]
    if label is not None and not isinstance(label, (str, int, float)):
        raise RecordError("wrong_type", f"label field {spec.label_field!r} is not a string")
    return tuple(messages), system, None if label is None else str(label), trimmed


def read_conversations(spec: DataSpec) -> ReadResult:
    """Parses every file of `spec`; assigns classes; collects skips. Totals: input_records =
    len(conversations) + len(skips)."""
    result = ReadResult()
    for path in spec.files:
        for line, obj in iter_records(path):
            result.input_records += 1
            try:
                if isinstance(obj, RecordError):
                    raise obj
                messages, system, label, trimmed = parse_record(obj, spec)
                class_id = spec.class_for_label(label)
                if class_id is None:
                    if label is None:
                        raise RecordError("unclaimed_label",
                                          f"no label field {spec.label_field!r} and no default_class")
                    raise RecordError("unclaimed_label",
                                      f"label {label!r} is claimed by no class and there is no default_class")
            except RecordError as e:
                result.skips.append(Skip(str(path), line, e.kind, e.reason))
                continue
            result.trimmed_leading_assistant += trimmed
            result.conversations.append(Conversation(messages, system, label, origin=f"{path}:{line}"))
            result.class_ids.append(class_id)
    return result
