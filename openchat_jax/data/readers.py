"""Conversation files -> validated `Conversation`s, with every unusable record a counted skip.

Files: a JSON array of records (`[...]`, parsed record by record, so a truncated file keeps its
complete records), a single JSON object, or JSONL (one record per line; blank lines ignored).
Formats, detected per record by their list field:
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|..., "value": str}], ...}
  OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": str}], ...}
  OpenChat  {"items": [{"role", "content", "weight"}], "condition": str, "system": str}
Roles are matched case-insensitively through `data.role_map`. A system prompt is a top-level
"system" (or the paper-era "system_message") string, or a first message with role system. The
label is the record's `label_field` (for OpenChat records without it, their "condition").

A message's optional "weight" (OpenChat's format) is its loss weight as given, like the
reference (ochat/config/conversation_template.py gives each message's text and its
<|end_of_turn|> `msg.weight`): it replaces the class weight for that message and is not
multiplied by it (OpenChat's data already carries the class weight, e.g. 0.1 for GPT3 replies),
weight 0 leaves an assistant reply unsupervised, and a user message with weight > 0 is
supervised. Messages without it: the class weight on assistant replies, 0 on user messages.
An assistant reply containing a phrase of `data.mask_phrases_file` gets weight 0.
"""

from __future__ import annotations

import json
import math
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
    masked_replies: int = 0  # assistant replies given weight 0 by a mask phrase (kept or skipped records)
    masked_by_phrase: dict[str, int] = field(default_factory=dict)  # the first phrase each contained
    explicit_weights: int = 0  # messages of kept conversations that carry a "weight" field


@dataclass(frozen=True)
class ParsedRecord:
    messages: tuple[Message, ...]
    system: str
    label: str | None
    trimmed_leading_assistant: bool
    masked: tuple[str, ...] = ()  # for each masked reply, the phrase it contained
    explicit_weights: int = 0

    @property
    def supervised(self) -> bool:
        """Whether any message will carry weight (before truncation)."""
        return any(m.weight > 0 if m.weight is not None else m.role == "assistant" for m in self.messages)


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


def _system_text(obj: dict) -> str:
    texts = []
    for key in ("system", "system_message"):
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecordError("wrong_type", f"field {key!r} is not a string")
        if value:
            texts.append(value)
    if len(set(texts)) > 1:
        raise RecordError("misplaced_system", "system prompt given twice (fields 'system' and 'system_message')")
    return texts[0] if texts else ""


def _message_weight(m: dict, where: str) -> float | None:
    w = m.get("weight")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise RecordError("bad_weight", f"{where}: field 'weight' must be a finite number >= 0, got {w!r}")
    return float(w)


def _masking_phrase(text: str, phrases: tuple[str, ...]) -> str | None:
    folded = text.casefold()
    return next((p for p in phrases if p in folded), None)


def parse_record(obj: Any, spec: DataSpec) -> ParsedRecord:
    """Parses and validates one record, or raises RecordError."""
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
    system = _system_text(obj)
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
        if not isinstance(role, str) or role.lower() not in spec.role_map:
            raise RecordError("unknown_role", f"{where}: unknown role {role!r}; add it to data.role_map "
                                              f"(known, any case: {sorted(spec.role_map)})")
        mapped = spec.role_map[role.lower()]
        weight = _message_weight(m, where)
        if mapped == "system":
            if weight:
                raise RecordError("bad_weight", f"{where}: a system message has weight {weight}; system text is "
                                                "never supervised")
            if k != 0:
                raise RecordError("misplaced_system", f"{where}: a system message may only come first")
            if system and content:
                raise RecordError("misplaced_system", f"{where}: system prompt given twice (also field 'system')")
            system = system or content
            continue
        if not content.strip():
            raise RecordError("empty_message", f"{where}: empty message")
        messages.append(Message(mapped, content, weight))
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
    explicit = sum(m.weight is not None for m in messages)
    masked: list[str] = []
    if spec.mask_phrases:
        for k, m in enumerate(messages):
            phrase = _masking_phrase(m.content, spec.mask_phrases) if m.role == "assistant" else None
            if phrase is not None:
                messages[k] = Message(m.role, m.content, 0.0)
                masked.append(phrase)
    label = obj.get(spec.label_field)
    if label is None and list_key == "items" and obj.get("condition"):
        label = obj["condition"]
    if label is not None and not isinstance(label, (str, int, float)):
        raise RecordError("wrong_type", f"label field {spec.label_field!r} is not a string")
    return ParsedRecord(tuple(messages), system, None if label is None else str(label), trimmed, tuple(masked), explicit)


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
                rec = parse_record(obj, spec)
                label = rec.label
                result.masked_replies += len(rec.masked)
                for phrase in rec.masked:
                    result.masked_by_phrase[phrase] = result.masked_by_phrase.get(phrase, 0) + 1
                if not rec.supervised:
                    raise RecordError("no_supervised_token", "every message has weight 0 (a 'weight' field of 0"
                                      + (f" or a reply containing the data.mask_phrases_file phrase {rec.masked[0]!r}"
                                         if rec.masked else "") + ")")
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
            result.trimmed_leading_assistant += rec.trimmed_leading_assistant
            result.explicit_weights += rec.explicit_weights
            result.conversations.append(Conversation(rec.messages, rec.system, label, origin=f"{path}:{line}"))
            result.class_ids.append(class_id)
    return result
