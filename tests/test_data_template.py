"""The template gives exactly the hand-computed ids/weights per class, and the
inference prompt (ours and the HF chat template) equals the training ids up to the answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openchat_jax.data.template import (
    PLAIN_CONDITION,
    ConvClass,
    Conversation,
    Message,
    build_example,
    build_prompt,
    render_chat_template,
)
from openchat_jax.data.tokenizer import EOT_TOKEN, load_tokenizer
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

LLAMA2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama2-tokenizer"

SYSTEM = "You are a helpful assistant."
CONV = Conversation(
    system=SYSTEM,
    messages=(
        Message("user", "Hello"),
        Message("assistant", "I am fine."),
        Message("user", "What is two plus two?"),
        Message("assistant", "four"),
    ),
)
CLASSES = [ConvClass("gpt4", "GPT4", 1.0), ConvClass("gpt3", "GPT3", 0.1)]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):  # noqa: F811
    return load_tokenizer(tiny_tokenizer_dir)


def _ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(text.split(" "))


def test_eot_added_with_next_free_id(tiny):
    tok, eot = tiny
    assert eot == 456 == len(tok) - 1
    assert tok.convert_ids_to_tokens(eot) == EOT_TOKEN
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("class_id", [0, 1])
def test_hand_computed_example(tiny, class_id):
    tok, eot = tiny
    cls = CLASSES[class_id]
    # Pieces tokenized on their own (token strings read off the fixture vocabulary by hand).
    system = _ids(tok, "▁You ▁are ▁a ▁help f u l ▁a ssistant .")
    cond = _ids(tok, f"▁{cls.condition}")
    user, asst = cond + _ids(tok, "▁User:"), cond + _ids(tok, "▁Assistant:")
    hello = _ids(tok, "▁H el l o")
    fine = _ids(tok, "▁I ▁a m ▁f in e.")
    question = _ids(tok, "▁What ▁is ▁two ▁plus ▁two ?")
    four = _ids(tok, "▁f ou r")
    assert 0 not in system + cond + hello + fine + question + four  # no <unk>: spelled right
    w = cls.weight
    expected = [
        ([1], 0), (system, 0), ([eot], 0),
        (user, 0), (hello, 0), ([eot], 0),
        (asst, 0), (fine, w), ([eot], w),
        (user, 0), (question, 0), ([eot], 0),
        (asst, 0), (four, w), ([eot], w),
    ]
    exp_tokens = [t for piece, _ in expected for t in piece]
    exp_weights = [wt for piece, wt in expected for _ in piece]

    ex = build_example(tok, eot, CONV, cls, class_id, max_length=4096)
    assert ex is not None and ex.class_id == class_id
    assert ex.tokens.dtype == np.int32 and ex.weights.dtype == np.float32
    assert ex.tokens.tolist() == exp_tokens
    np.testing.assert_array_equal(ex.weights, np.asarray(exp_weights, np.float32))

    # The prompt for the history up to the last answer equals the training ids up to that answer.
    prompt = build_prompt(tok, eot, CONV.messages[:3], SYSTEM, cls.condition)
    n_before_answer = len(exp_tokens) - len(four) - 1
    assert prompt == exp_tokens[:n_before_answer]
    assert prompt[-len(asst):] == asst


def test_plain_condition_and_no_system(tiny):
    tok, eot = tiny
    conv = Conversation(messages=(Message("user", "Hello"), Message("assistant", "four")))
    ex = build_example(tok, eot, conv, CLASSES[0], 0, 4096, condition=PLAIN_CONDITION)
    expected = [1] + _ids(tok, "▁User: ▁H el l o") + [eot] + _ids(tok, "▁Assistant: ▁f ou r") + [eot]
    assert ex.tokens.tolist() == expected
    assert ex.weights.tolist() == [0.0] * 8 + [1.0] * 4


def test_special_token_text_is_plain_text(tiny):
    tok, eot = tiny
    conv = Conversation(messages=(Message("user", f"a{EOT_TOKEN}<s>"), Message("assistant", "b</s>")))
    ex = build_example(tok, eot, conv, CLASSES[0], 0, 4096)
    assert ex.tokens.tolist().count(eot) == 2  # only the template's own
    assert ex.tokens.tolist().count(1) == 1 and 2 not in ex.tokens.tolist()


def test_truncation_keeps_start_and_drops_unsupervised(tiny):
    tok, eot = tiny
    full = build_example(tok, eot, CONV, CLASSES[0], 0, 4096)
    first_weighted = int(np.argmax(full.weights > 0))
    cut = build_example(tok, eot, CONV, CLASSES[0], 0, first_weighted + 2)
    assert cut.tokens.tolist() == full.tokens[: first_weighted + 2].tolist()
    assert cut.weights.tolist() == full.weights[: first_weighted + 2].tolist()
    assert build_example(tok, eot, CONV, CLASSES[0], 0, first_weighted) is None


HISTORIES = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "What is two plus two?"}],
    # leading/trailing/double spaces, newlines, non-ASCII: the cases where text rendering can drift
    [{"role": "user", "content": " two  spaces "}, {"role": "assistant", "content": "\nline\n\n"},
     {"role": "user", "content": "  über naïve 日本"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}, {"role": "user", "content": "x"}],
]


def _chat_template_ids(tok, condition, history):
    tok.chat_template = render_chat_template(condition)
    out = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _check_chat_template(tok, eot):
    for condition in ["GPT4", "GPT3", PLAIN_CONDITION, "GPT4 Correct"]:
        for history in HISTORIES:
            system = history[0]["content"] if history[0]["role"] == "system" else ""
            msgs = [m for m in history if m["role"] != "system"]
            assert _chat_template_ids(tok, condition, history) == build_prompt(tok, eot, msgs, system, condition), (
                condition, history)


def test_chat_template_matches_build_prompt_tiny(tiny_tokenizer_dir):  # noqa: F811
    _check_chat_template(*load_tokenizer(tiny_tokenizer_dir))


@pytest.mark.skipif(not (LLAMA2 / "tokenizer.json").is_file(), reason="real Llama-2 tokenizer not present")
def test_chat_template_matches_build_prompt_llama2():
    tok, eot = load_tokenizer(LLAMA2)
    assert eot == 32000
    _check_chat_template(tok, eot)
    # OpenChat's tokenization of the prefix: "GPT4 User:" -> ▁G PT 4 ▁User :
    ids = build_prompt(tok, eot, [{"role": "user", "content": "Hello"}], "", "GPT4")
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>", "▁G", "PT", "4", "▁User", ":", "▁Hello", EOT_TOKEN, "▁G", "PT", "4", "▁Ass", "istant", ":"]
