"""The conversation template, used for training examples, inference prompts and the exported chat
template. `data.template` picks a family (`FAMILIES`): openchat_v3.2 (below), openchat_3.5 (the same
layout, "GPT4 Correct User:") or openchat_3.6 (Llama-3 header tokens, see `TemplateFamily`).

Token sequence (OpenChat V3.2 / C-RLFT, `ochat/config/conversation_template.py`):

    <s>
    [system text] <|end_of_turn|>                     (only when there is a system text)
    for each message:
        role prefix  "{condition} User:"  or  "{condition} Assistant:"   (stripped, so the
                     plain condition "" gives "User:" / "Assistant:")
        message text
        <|end_of_turn|>

What exactly is tokenized: every piece (system text, each role prefix, each message text) is
encoded ON ITS OWN with `add_special_tokens=False` and with special-token parsing switched off
(so a literal "<|end_of_turn|>" or "<s>" typed in a message is plain text), and the ids are
concatenated with the ids of `<s>` and `<|end_of_turn|>`. With a tokenizer that puts a dummy
prefix before a text (SentencePiece-style "▁"; `PieceEncoder.dummy_prefix`), no space is added
before a message: like OpenChat (`add_space_before_msg=False`), that "▁" separates prefix and
message. With the Llama-2 tokenizer: "GPT4 User:" -> ▁G PT 4 ▁User :, "Hello" -> ▁Hello. A tokenizer
without one (byte-level BPE: GPT-2, SmolLM2, Llama-3) would glue the message to its prefix
("GPT4 User:What"), so a non-empty message is tokenized as " " + message ("ĠWhat"), the text the
exported chat template writes.

Weights: a message's weight on every token of its text and on the `<|end_of_turn|>` that ends
it; 0 on `<s>`, system text and role prefixes. A message's weight is its own `weight` when it
has one (OpenChat records; see readers.py), else the class weight for an assistant message and
0 for a user message. Every message is preceded by a role prefix of weight 0, so the weighted
tokens of two messages never touch. Truncation keeps the first `max_length` tokens; an example
left with no weighted token is dropped (`None`).

Inference: `build_prompt` gives the same ids as training up to (excluding) the assistant
answer, i.e. it ends with the assistant prefix (e.g. "GPT4 Assistant:").
"""

from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from openchat_jax.data.tokenizer import EOT_TOKEN
from openchat_jax.errors import DataError

# Condition used by every class when `conditioned=False` (the no-condition ablation).
PLAIN_CONDITION = ""
ROLE_NAMES = {"user": "User:", "assistant": "Assistant:"}


@dataclass(frozen=True)
class TemplateFamily:
    """How one release of OpenChat lays a conversation out (`data.template`).

    A role prefix is `"{condition} {role name}"` (stripped); with `header` it sits between the two
    header tokens and `separator` follows, as its own piece. `eot_token` ends every turn; it is a new
    token (`<|end_of_turn|>`, added by load_tokenizer) or one the tokenizer already has. With
    `strip_messages` message texts are stripped of surrounding whitespace first (a byte-level BPE has
    no SentencePiece "▁" to separate a message from its prefix; the header's separator does, and a
    stripped message tokenizes the same after it as on its own). `system_name`: a system text gets
    its own header with this role name (None: the text stands alone before its end of turn)."""

    name: str
    role_names: Mapping[str, str]
    eot_token: str = EOT_TOKEN
    header: tuple[str, str] | None = None
    separator: str = ""
    strip_messages: bool = False
    system_name: str | None = None

    def role_prefix(self, role: str, condition: str) -> str:
        if role == "system":
            return self.system_name or ""
        return f"{condition} {self.role_names[role]}".strip()


FAMILIES = {f.name: f for f in (
    # OpenChat V3.2 (Llama-2): "GPT4 User: ...<|end_of_turn|>GPT4 Assistant:".
    TemplateFamily("openchat_v3.2", ROLE_NAMES),
    # OpenChat 3.5 (Mistral): the V3.2 layout, every prefix "{condition} Correct ...": "GPT4 Correct User:".
    TemplateFamily("openchat_3.5", {"user": "Correct User:", "assistant": "Correct Assistant:"}),
    # OpenChat 3.6 (Llama-3): Llama-3 header tokens around "GPT4 Correct User", then "\n\n", the
    # stripped message and <|eot_id|> (the tokenizer's own end of turn; nothing added).
    TemplateFamily("openchat_3.6", {"user": "Correct User", "assistant": "Correct Assistant"}, eot_token="<|eot_id|>",
                   header=("<|start_header_id|>", "<|end_header_id|>"), separator="\n\n", strip_messages=True,
                   system_name="System"),
)}
DEFAULT_FAMILY = "openchat_v3.2"


def template_family(name: str) -> TemplateFamily:
    if name not in FAMILIES:
        raise DataError(f"unknown template {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


@dataclass(frozen=True)
class ConvClass:
    name: str
    condition: str
    weight: float


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str
    weight: float | None = None  # loss weight given by the data; None = the template's default


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    system: str = ""
    label: str | None = None
    # where it came from, for error reports ("file.jsonl:12")
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32[n]
    weights: np.ndarray  # float32[n]
    class_id: int


class PieceEncoder:
    """Tokenizes a batch of texts as plain text: no BOS/EOS, special-token strings not parsed."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._sentencepiece = getattr(tokenizer, "sp_model", None)  # a tokenizer.model-only folder
        if backend is not None:
            from tokenizers import Tokenizer

            # A private copy: the flag is global state on the Rust tokenizer.
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.encode_special_tokens = True
        else:
            self._backend = None
        self.dummy_prefix = self._backend is None or adds_dummy_prefix(json.loads(self._backend.to_str()))

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        if self._sentencepiece is not None:  # SentencePiece's own ids; it never parses special-token text
            return [list(ids) for ids in self._sentencepiece.encode(list(texts))]
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True,
                             return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]


def adds_dummy_prefix(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether a tokenizer.json pipeline puts a separator before every text: a Prepend normalizer
    (Llama-2's "▁"), a Metaspace pre-tokenizer that prepends, or a ByteLevel one with add_prefix_space."""
    def parts(node: Any) -> list[Mapping[str, Any]]:
        if not isinstance(node, Mapping):
            return []
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [p for n in inner for p in parts(n)] if inner is not None else [node]

    for step in parts(tokenizer_json.get("normalizer")) + parts(tokenizer_json.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "Metaspace":  # older files have add_prefix_space instead of prepend_scheme
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            if scheme != "never":
                return True
        elif kind == "Prepend" and step.get("prepend") or kind == "ByteLevel" and step.get("add_prefix_space"):
            return True
    return False


_ENCODERS: "weakref.WeakKeyDictionary[Any, PieceEncoder]" = weakref.WeakKeyDictionary()


def piece_encoder(tokenizer) -> PieceEncoder:
    if isinstance(tokenizer, PieceEncoder):
        return tokenizer
    enc = _ENCODERS.get(tokenizer)
    if enc is None:
        enc = _ENCODERS[tokenizer] = PieceEncoder(tokenizer)
    return enc


def _as_message(m: Message | Mapping[str, str]) -> Message:
    if isinstance(m, Message):
        return m
    return Message(role=m["role"], content=m["content"])


class TemplateBuilder:
    """Turns many conversations into examples with one batched tokenizer call.

    `build_example` / `build_prompt` are thin wrappers; `prepare` uses this class directly."""

    def __init__(self, tokenizer, eot_id: int, family: str = DEFAULT_FAMILY):
        self.encode = piece_encoder(tokenizer)
        self.family = template_family(family)
        bos = self.encode.tokenizer.bos_token_id
        self.bos_ids = [] if bos is None else [int(bos)]
        self.eot_id = int(eot_id)
        self._header_ids: tuple[int, int] | None = None
        if self.family.header is not None:
            ids = [self.encode.tokenizer.convert_tokens_to_ids(t) for t in self.family.header]
            if any(not isinstance(i, int) or i == self.encode.tokenizer.unk_token_id for i in ids):
                raise DataError(f"template {self.family.name}: the tokenizer lacks {list(self.family.header)}")
            self._header_ids = (int(ids[0]), int(ids[1]))
        self._prefix_cache: dict[tuple[str, str], list[int]] = {}
        # A non-empty message is tokenized as " " + message when no dummy prefix separates it from its role prefix.
        self.spaces_messages = not self.family.strip_messages and self.family.header is None and not self.encode.dummy_prefix

    def prefix_ids(self, role: str, condition: str) -> list[int]:
        key = (role, condition)
        if key not in self._prefix_cache:
            text = self.family.role_prefix(role, condition)
            if self._header_ids is None:
                ids = self.encode([text])[0] if text else []
            else:
                name, separator = self.encode([text, self.family.separator])
                ids = [self._header_ids[0], *name, self._header_ids[1], *separator]
            self._prefix_cache[key] = ids
        return self._prefix_cache[key]

    def message_text(self, decoded: str) -> str:
        """The message that a generated answer's decoded text stands for: the space `texts` puts
        before a message is taken off again, so that the answer, put back into the conversation,
        renders to the ids the model generated."""
        return decoded[1:] if self.spaces_messages and decoded.startswith(" ") else decoded

    def texts(self, system: str, messages: Sequence[Message]) -> list[str]:
        """The texts a conversation tokenizes, in order: the system text (if any), then each message."""
        contents = [m.content for m in messages]
        if self.spaces_messages:
            contents = [" " + t if t else t for t in contents]  # the exported template's space
        texts = ([system] if system else []) + contents
        return [t.strip() for t in texts] if self.family.strip_messages else texts

    def _pieces(self, system: str, messages: Sequence[Message], condition: str, texts: list[list[int]],
                generation_prompt: bool, class_weight: float = 0.0) -> tuple[list[list[int]], list[float]]:
        """Token pieces and the weight of each piece's tokens."""
        pieces: list[list[int]] = [self.bos_ids]
        weights: list[float] = [0.0]
        it = iter(texts)
        if system:
            pieces += [self.prefix_ids("system", condition), next(it), [self.eot_id]]
            weights += [0.0, 0.0, 0.0]
        for m in messages:
            w = m.weight if m.weight is not None else class_weight if m.role == "assistant" else 0.0
            pieces += [self.prefix_ids(m.role, condition), next(it), [self.eot_id]]
            weights += [0.0, w, w]
        if generation_prompt:
            pieces.append(self.prefix_ids("assistant", condition))
            weights.append(0.0)
        return pieces, weights

    def build_examples(self, conversations: Sequence[Conversation], classes: Sequence[ConvClass] | Mapping[int, ConvClass],
                       class_ids: Sequence[int], max_length: int,
                       condition: str | None = None) -> list[Example | None]:
        """`condition` overrides every class's condition (PLAIN_CONDITION for the ablation)."""
        texts: list[str] = []
        for conv in conversations:
            texts.extend(self.texts(conv.system, conv.messages))
        encoded = iter(self.encode(texts))
        out: list[Example | None] = []
        for conv, cid in zip(conversations, class_ids):
            cls = classes[cid]
            n_texts = len(conv.messages) + (1 if conv.system else 0)
            own = list(itertools.islice(encoded, n_texts))
            cond = cls.condition if condition is None else condition
            pieces, piece_weights = self._pieces(conv.system, conv.messages, cond, own, generation_prompt=False,
                                                 class_weight=cls.weight)
            lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
            tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
            weights = np.repeat(np.asarray(piece_weights, np.float32), lengths)
            tokens, weights = tokens[:max_length], weights[:max_length].astype(np.float32)
            if not np.any(weights > 0):
                out.append(None)
            else:
                out.append(Example(tokens=tokens, weights=weights, class_id=int(cid)))
        return out

    def build_prompt(self, messages: Sequence[Message | Mapping[str, str]], system: str,
                     condition: str) -> list[int]:
        msgs = [_as_message(m) for m in messages]
        for i, m in enumerate(msgs):
            if m.role not in ROLE_NAMES:
                raise DataError(f"prompt message {i}: role {m.role!r} is not one of {sorted(ROLE_NAMES)}")
        pieces, _ = self._pieces(system, msgs, condition, self.encode(self.texts(system, msgs)), generation_prompt=True)
        return list(itertools.chain.from_iterable(pieces))


def build_example(tokenizer, eot_id: int, conversation: Conversation, conv_class: ConvClass, class_id: int,
                  max_length: int, condition: str | None = None, family: str = DEFAULT_FAMILY) -> Example | None:
    """One training example, or None when truncation leaves no supervised token.

    `condition=None` uses `conv_class.condition`; pass PLAIN_CONDITION for the unconditioned ablation."""
    classes = {class_id: conv_class}
    return TemplateBuilder(tokenizer, eot_id, family).build_examples(
        [conversation], classes, [class_id], max_length, condition)[0]  # type: ignore[arg-type]


def build_prompt(tokenizer, eot_id: int, messages: Sequence[Message | Mapping[str, str]], system: str = "",
                 condition: str = "GPT4", family: str = DEFAULT_FAMILY) -> list[int]:
    """Inference prompt ids: the training ids of `messages` followed by the assistant prefix."""
    return TemplateBuilder(tokenizer, eot_id, family).build_prompt(messages, system, condition)


def render_chat_template(condition: str, family: str = DEFAULT_FAMILY) -> str:
    """A Jinja `chat_template` (for tokenizer_config.json) rendering `family`'s template for `condition`.

    Without header tokens (openchat_v3.2, openchat_3.5) the text is
    `<s>{system}<|end_of_turn|>{prefix} {message}<|end_of_turn|>...{assistant prefix}`. Tokenized by the
    tokenizer file's own pipeline (Llama-2's tokenizer.json, or SentencePiece) it gives `build_prompt`'s
    ids: the tokenizer splits the text at the special tokens and puts its "▁" before each part, as it
    does before each separately tokenized piece; the one space between a role prefix and a non-empty
    message stands for the "▁" that the message's own tokenization starts with (whatever the message
    starts with: spaces, tabs, newlines), and no token of such a vocabulary joins the prefix's last
    character with a following "▁". An empty message adds nothing. With a byte-level BPE tokenizer
    (no dummy prefix) the space is the one `TemplateBuilder.texts` puts before every non-empty
    message; the pre-tokenizer splits it from the prefix's final ":" and joins it to the message's
    first word ("ĠWhat"), as when " " + message is tokenized on its own.
    With header tokens (openchat_3.6) each turn is `{start}{role}{end}{separator}{message | trim}{eot}`:
    the special tokens cut the text where the pieces are cut, and the separator ("\n\n") is split off
    a stripped message by the byte-level pre-tokenizer exactly as when tokenized on its own.
    One difference cannot be expressed in a text template: special-token strings typed inside a
    message are parsed as special tokens by `apply_chat_template`, whereas the training template
    keeps them as text. A `system` message is accepted only as the first message.
    """
    fam = template_family(family)
    eot = _jinja_str(fam.eot_token)
    user, assistant = fam.role_prefix("user", condition), fam.role_prefix("assistant", condition)
    if fam.header is None:
        def turn(prefix: str) -> str:
            return "{{ '" + _jinja_str(prefix) + "' }}"
        system = "{{ message['content'] + '" + eot + "' }}"
        body = "{% if message['content'] %}{{ ' ' + message['content'] }}{% endif %}{{ '" + eot + "' }}"
    else:
        start, end = (_jinja_str(t) for t in fam.header)
        sep = _jinja_str(fam.separator)

        def turn(prefix: str) -> str:
            return "{{ '" + start + _jinja_str(prefix) + end + sep + "' }}"
        system = turn(fam.role_prefix("system", condition)) + "{{ message['content'] | trim + '" + eot + "' }}"
        body = "{{ message['content'] | trim + '" + eot + "' }}"
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if loop.index0 != 0 %}{{ raise_exception('a system message must come first') }}{% endif %}"
        "{% if message['content'] %}" + system + "{% endif %}"
        "{% else %}"
        "{% if message['role'] == 'user' %}" + turn(user) + ""
        "{% elif message['role'] == 'assistant' %}" + turn(assistant) + ""
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        + body +
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + turn(assistant) + "{% endif %}"
    )


def _jinja_str(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
