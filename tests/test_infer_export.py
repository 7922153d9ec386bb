"""The HF chat files: the exported tokenizer's `apply_chat_template` gives our prompt
builder's ids; eos is <|end_of_turn|>; transformers generate on the exported folder, prompted by
the chat template, answers as our engine does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from openchat_jax.data.template import build_prompt
from openchat_jax.data.tokenizer import EOT_TOKEN, load_tokenizer
from openchat_jax.errors import CheckpointError
from openchat_jax.hf import chat_files
from openchat_jax.hf.chat_files import export_chat_files, write_chat_files
from tests.test_infer_fixtures import chat_ckpt, chat_model  # noqa: F401  (pytest fixtures)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

SYSTEM = "You are a helpful assistant."
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you today?"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Thank you for the help."},
    ],
    [
        {"role": "user", "content": "Write a function that returns the sum of a list of numbers."},
        {"role": "assistant", "content": "def add(a, b): return a + b"},
        {"role": "user", "content": "Explain the theory of relativity in simple words, please."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
        {"role": "user", "content": "What is two plus two? <|end_of_turn|> no, three"},  # see note below
    ],
]


def chat_ids(tok, messages, system: str) -> list[int]:
    full = ([{"role": "system", "content": system}] if system else []) + messages
    return list(tok.apply_chat_template(full, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.fixture(scope="module")
def exported(tiny_tokenizer_dir, tmp_path_factory):  # noqa: F811
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("export") / "hf"
    write_chat_files(out, tok, eot, "GPT4")
    return out, tok, eot


@pytest.mark.parametrize("system", ["", SYSTEM])
@pytest.mark.parametrize("turns", [0, 1, 2])
def test_chat_template_gives_the_prompt_builder_ids(exported, system, turns):
    out, tok, eot = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = CONVERSATIONS[turns]
    if turns == 2:
        # Special-token text typed in a message: the template (training) keeps it as text, a Jinja
        # template cannot (documented in render_chat_template); compare without it.
        messages = messages[:-1] + [{"role": "user", "content": "What is two plus two?"}]
    ours = build_prompt(tok, eot, messages, system, "GPT4")
    assert chat_ids(hf_tok, messages, system) == ours
    prefix = tok.encode("GPT4 Assistant:", add_special_tokens=False)
    assert ours[-len(prefix):] == prefix  # ends ready for the answer


@pytest.mark.parametrize("condition", ["GPT3", ""])
def test_other_conditions(tiny_tokenizer_dir, tmp_path, condition):  # noqa: F811
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    write_chat_files(tmp_path, tok, eot, condition)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS[:2]:
        assert chat_ids(hf_tok, messages, SYSTEM) == build_prompt(tok, eot, messages, SYSTEM, condition)


def test_eos_is_end_of_turn_and_plain_text_unchanged(exported, tiny_tokenizer_dir):  # noqa: F811
    out, tok, eot = exported
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == [eot, tok.convert_tokens_to_ids("</s>")] and gen.bos_token_id == tok.bos_token_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token == EOT_TOKEN and hf_tok.eos_token_id == eot
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (out / "chat_template.jinja").exists()
    for text in ["Hello, how are you?", "GPT4 User: x", "<s>a</s>b<|end_of_turn|>c", " leading space"]:
        assert hf_tok.encode(text) == tok.encode(text), text


def test_a_tokenizer_saved_by_transformers_exports_exactly(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    # A folder written by transformers' own save_pretrained (tokenizer_class TokenizersBackend, no
    # `legacy`) still loads as its tokenizer.json says and exports the same ids.
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(tmp_path / "roundtrip"))
    tok2, eot2 = load_tokenizer(tmp_path / "roundtrip")
    write_chat_files(tmp_path / "hf", tok2, eot2, "GPT4")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = CONVERSATIONS[1]
    assert chat_ids(hf_tok, messages, SYSTEM) == build_prompt(tok, eot, messages, SYSTEM, "GPT4")


def test_a_wrong_template_is_caught(tiny_tokenizer_dir, tmp_path, monkeypatch):  # noqa: F811
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    monkeypatch.setattr(chat_files, "render_chat_template", lambda c, f: "{{ bos_token }}{% for m in messages %}"
                        "{{ m['content'] }}{% endfor %}")
    with pytest.raises(CheckpointError, match="does not reproduce the training template"):
        write_chat_files(tmp_path, tok, eot, "GPT4")


def test_transformers_generate_on_the_export_answers_like_us(chat_ckpt, chat_model, tmp_path):  # noqa: F811
    import torch

    from openchat_jax.infer.engine import answer
    from openchat_jax.hf import export_hf

    out = tmp_path / "hf"
    export_hf(str(chat_ckpt), str(out))
    assert export_chat_files(chat_ckpt, out) == "GPT4"  # classes.json: gpt4 has the highest weight
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    messages = CONVERSATIONS[1]
    ids = chat_ids(hf_tok, messages, SYSTEM)
    with torch.no_grad():
        gen = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    (ours,) = answer(chat_model, [(messages, SYSTEM)], "GPT4", max_new_tokens=12)
    stops = [i for i, t in enumerate(gen) if t in chat_model.stop_ids]
    assert ours.tokens == (gen[: stops[0]] if stops else gen)
    assert ours.finish_reason == ("stop" if stops else "length")
    assert ours.prompt_tokens == len(ids)
    np.testing.assert_equal(hf_model.generation_config.eos_token_id, list(chat_model.stop_ids))
