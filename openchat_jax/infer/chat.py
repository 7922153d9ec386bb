"""A multi-turn chat session over a ChatModel, and the terminal loop `openchat-jax chat` runs."""

from __future__ import annotations

from typing import Callable

import jax

from openchat_jax.data.template import ConvClass
from openchat_jax.errors import OpenChatError
from openchat_jax.infer.engine import Answer, ChatModel, answer
from openchat_jax.infer.sampling import SamplingConfig

HELP = "commands: /reset (new conversation), /system TEXT (set the system message and reset), /exit"


class ChatSession:
    def __init__(
        self,
        model: ChatModel,
        conv_class: ConvClass,
        *,
        system: str | None = None,
        max_new_tokens: int = 512,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        context: int | None = None,
    ):
        self.model, self.conv_class, self.system = model, conv_class, system
        self.max_new_tokens, self.sampling, self.context = max_new_tokens, sampling, context
        self.key = jax.random.key(seed)
        self.turn = 0
        self.history: list[dict[str, str]] = []

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system or None

    def say(self, text: str) -> Answer:
        """Answer `text` given the conversation so far; the answer joins the history. When the
        conversation outgrows the context, its oldest tokens (after <s>) are dropped."""
        messages = self.history + [{"role": "user", "content": text}]
        (result,) = answer(
            self.model, [(messages, self.system)], self.conv_class.condition, max_new_tokens=self.max_new_tokens,
            sampling=self.sampling, key=jax.random.fold_in(self.key, self.turn), context=self.context,
            truncate=True, batch_size=1,
        )
        self.turn += 1
        self.history = messages + [{"role": "assistant", "content": result.text}]
        return result


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> int:
    """Read a line, answer it, repeat, until /exit or end of input. Returns the number of answers."""
    write(f"chatting as class {session.conv_class.name!r} (prefix {session.conv_class.condition!r}); {HELP}")
    answered = 0
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return answered
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return answered
        if text == "/reset":
            session.reset()
            write("(new conversation)")
            continue
        if text.startswith("/system"):
            session.reset(system=text[len("/system"):].strip())
            write(f"(system message {'set' if session.system else 'cleared'}; new conversation)")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]!r}; {HELP}")
            continue
        try:
            result = session.say(line)
        except OpenChatError as e:
            write(f"error: {e}")
            continue
        write(f"assistant> {result.text}")
        notes = []
        if result.finish_reason == "length":
            notes.append(f"stopped at the {len(result.tokens)}-token limit")
        if result.truncated:
            notes.append(f"the {result.truncated} oldest tokens of the conversation no longer fit the context")
        if notes:
            write(f"({'; '.join(notes)})")
        answered += 1
