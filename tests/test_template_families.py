"""Template families (`data.template`): for each of openchat_v3.2, openchat_3.5 and openchat_3.6 the
training ids and weights, the inference prompt and the exported chat template equal a reference
assembled here piece by piece from the tokenizer file (`tokenizers.Tokenizer.from_file`), written
from the releases' own descriptions: OpenChat's `ConversationTemplate` (prefix "{condition} User:",
`<|end_of_turn|>`; 3.5 = the same with "GPT4 Correct"), and Llama-3's chat format for 3.6 (header
tokens around the role, "\\n\\n", the stripped message, `<|eot_id|>`). openchat_v3.2 and openchat_3.5 are
also run on a byte-level BPE (no dummy prefix), where each non-empty message is " " + message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer

from openchat_jax.data.config import validate
from openchat_jax.data.prepare import load_dataset_info, prepare
from openchat_jax.data.template import (ConvClass, Conversation, Message, TemplateBuilder, build_example,
                                        build_prompt)
from openchat_jax.data.tfds_builder import open_data_source
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import ConfigError
from openchat_jax.hf.chat_files import write_chat_files
from tests.test_data_prepare import data_config, sharegpt, write_jsonl
from tests.test_tokenizer_exact import conversations
from tests.tokenizer_fixture import build_llama3_style_tokenizer, build_tiny_tokenizer

WEIGHT = 0.7


class Reference:
    def __init__(self, folder: Path, family: str):
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.family = family
        self.llama3 = family == "openchat_3.6"
        self.byte_level = self.tok.token_to_id("<|begin_of_text|>") is not None  # the Llama-3-style fixture
        self.bos = self.tok.token_to_id("<|begin_of_text|>" if self.byte_level else "<s>")
        self.eot = self.tok.token_to_id("<|eot_id|>") if self.llama3 else self.tok.get_vocab_size(True)

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def prefix(self, role: str, condition: str) -> list[int]:
        if self.llama3:  # Meta's ChatFormat.encode_header
            name = "System" if role == "system" else f"{condition} Correct {role.title()}".strip()
            return [self.tok.token_to_id("<|start_header_id|>"), *self.enc(name),
                    self.tok.token_to_id("<|end_header_id|>"), *self.enc("\n\n")]
        if role == "system":
            return []
        correct = "Correct " if self.family == "openchat_3.5" else ""
        return self.enc(f"{condition} {correct}{'User:' if role == 'user' else 'Assistant:'}".strip())

    def text(self, content: str) -> list[int]:
        if self.llama3:
            return self.enc(content.strip())
        return self.enc(" " + content if self.byte_level and content else content)

    def ids(self, messages, system: str, condition: str, generation: bool) -> tuple[list[int], list[float]]:
        ids, weights = [self.bos], [0.0]
        if system:
            part = self.prefix("system", condition) + self.enc(system.strip() if self.llama3 else system) + [self.eot]
            ids += part
            weights += [0.0] * len(part)
        for m in messages:
            head, body = self.prefix(m["role"], condition), self.text(m["content"]) + [self.eot]
            w = WEIGHT if m["role"] == "assistant" else 0.0
            ids += head + body
            weights += [0.0] * len(head) + [w] * len(body)
        if generation:
            ids += self.prefix("assistant", condition)
        return ids, weights


@pytest.fixture(scope="module", params=["openchat_v3.2", "openchat_3.5", "openchat_3.6",
                                        "openchat_v3.2 bytelevel", "openchat_3.5 bytelevel"])
def family(request, tmp_path_factory):
    name, _, byte_level = request.param.partition(" ")
    root = tmp_path_factory.mktemp(name)
    if name == "openchat_3.6":
        folder = build_llama3_style_tokenizer(root / "tok")
        tok, eot = load_tokenizer(folder, "<|eot_id|>")
        assert len(tok) == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(True)  # nothing added
    elif byte_level:
        folder = build_llama3_style_tokenizer(root / "tok")
        tok, eot = load_tokenizer(folder)
    else:
        folder = build_tiny_tokenizer(root / "tok")
        tok, eot = load_tokenizer(folder)
    write_chat_files(root / "export", tok, eot, "GPT4", name)
    return name, folder, tok, eot, root


def test_training_ids_and_weights_equal_the_reference(family):
    name, folder, tok, eot, _ = family
    ref = Reference(folder, name)
    assert eot == ref.eot
    for messages, system in conversations():
        full = messages + [{"role": "assistant", "content": messages[0]["content"]}]
        conv = Conversation(tuple(Message(m["role"], m["content"]) for m in full), system)
        ex = build_example(tok, eot, conv, ConvClass("gpt4", "GPT4", WEIGHT), 0, 10_000, family=name)
        ids, weights = ref.ids(full, system, "GPT4", generation=False)
        assert ex.tokens.tolist() == ids
        np.testing.assert_allclose(ex.weights, weights, rtol=0, atol=1e-7)


@pytest.mark.parametrize("condition", ["GPT4", "GPT3", ""])
def test_prompt_and_exported_chat_template_equal_the_reference(family, condition, tmp_path):
    name, folder, tok, eot, root = family
    ref = Reference(folder, name)
    export = root / "export"
    if condition != "GPT4":
        export = tmp_path / "export"
        write_chat_files(export, tok, eot, condition, name)
    exported = transformers.AutoTokenizer.from_pretrained(str(export))
    assert exported.eos_token == ("<|eot_id|>" if name == "openchat_3.6" else "<|end_of_turn|>")
    for messages, system in conversations()[: 240 if condition == "GPT4" else 60]:
        expected, _ = ref.ids(messages, system, condition, generation=True)
        assert build_prompt(tok, eot, messages, system, condition, name) == expected
        full = ([{"role": "system", "content": system}] if system else []) + messages
        got = exported.apply_chat_template(full, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(got) == expected, (messages, system)


def test_a_byte_level_message_is_spaced_from_its_prefix(tmp_path):
    folder = build_llama3_style_tokenizer(tmp_path / "tok")
    tok, eot = load_tokenizer(folder)
    ref = Reference(folder, "openchat_v3.2")
    messages = [{"role": "user", "content": "What is  naïve 日本語?\n"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "\n x "}]
    ids = build_prompt(tok, eot, messages, "Be brief.", "GPT4", "openchat_v3.2")
    assert tok.decode(ids) == (
        "<|begin_of_text|>Be brief.<|end_of_turn|>GPT4 User: What is  naïve 日本語?\n<|end_of_turn|>"
        "GPT4 Assistant:<|end_of_turn|>GPT4 User: \n x <|end_of_turn|>GPT4 Assistant:")
    assert ids[ids.index(eot) + 1:][: len(ref.enc("GPT4 User: What"))] == ref.enc("GPT4 User: What")


@pytest.mark.parametrize("build", [build_tiny_tokenizer, build_llama3_style_tokenizer], ids=["dummy prefix", "byte level"])
@pytest.mark.parametrize("answer", ["Sure, it is.", " two  spaces\n", "\tcode()\n"])
def test_an_answer_put_back_renders_to_the_ids_generated(tmp_path, build, answer):
    """What generate returns for an answer's ids, put back into the conversation as the assistant's
    message, renders to those ids again (a byte-level template spaces each message from its prefix)."""
    tok, eot = load_tokenizer(build(tmp_path / "tok"))
    template = TemplateBuilder(tok, eot, "openchat_v3.2")
    question = [{"role": "user", "content": "What is it?"}]
    prompt = template.build_prompt(question, "", "GPT4")
    full = template.build_prompt(question + [{"role": "assistant", "content": answer},
                                             {"role": "user", "content": "ok"}], "", "GPT4")
    generated = full[len(prompt):full.index(eot, len(prompt))]
    text = template.message_text(tok.decode(generated, skip_special_tokens=True))
    assert text == answer
    again = template.build_prompt(question + [{"role": "assistant", "content": text},
                                              {"role": "user", "content": "ok"}], "", "GPT4")
    assert again == full


@pytest.mark.parametrize("pipeline, dummy_prefix", [
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                          {"type": "Replace"}]}}, True),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}, True),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}}, False),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}}, True),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}, False),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split"},
                                                              {"type": "ByteLevel", "add_prefix_space": True}]}}, True),
    ({"normalizer": None, "pre_tokenizer": None}, False),
])
def test_dummy_prefix_is_read_from_the_pipeline(pipeline, dummy_prefix):
    from openchat_jax.data.template import adds_dummy_prefix

    assert adds_dummy_prefix(pipeline) is dummy_prefix


def test_prepare_uses_the_configured_template(tmp_path):
    folder = build_llama3_style_tokenizer(tmp_path / "tok")
    ref = Reference(folder, "openchat_3.6")
    convs = [(m + [{"role": "assistant", "content": " answer \n"}], s) for m, s in conversations()[:40]
             if all(x["content"].strip() for x in m) and s.strip()]
    records = [dict(sharegpt(*[x["content"] for x in m], source="Model: GPT-4"), system=s) for m, s in convs]
    cfg = data_config(folder, [write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "out", max_length=4096,
                      template="openchat_3.6")
    assert prepare(cfg)["examples"] == len(convs)
    info = load_dataset_info(tmp_path / "out")
    assert info["template"] == "openchat_3.6" and info["eot_id"] == ref.eot
    assert "<|start_header_id|>" in info["chat_template"]
    src = open_data_source(tmp_path / "out")
    for i, (messages, system) in enumerate(convs):
        row = src[i]
        condition = info["classes"][int(row["class_id"])]["condition"]
        assert row["tokens"].tolist() == ref.ids(messages, system, condition, generation=False)[0]


def test_an_unknown_template_is_a_config_error(tmp_path):
    cfg = data_config(tmp_path, [], tmp_path / "out", template="openchat_4")
    with pytest.raises(ConfigError, match="data.template = 'openchat_4'"):
        validate(cfg, need_files=False)


def test_a_tokenizer_without_the_family_end_of_turn_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no <|eot_id|> token"):
        load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"), "<|eot_id|>")


@pytest.mark.parametrize("name", ["openchat_3.6", "openchat_v3.2"])
def test_inference_and_export_follow_the_recorded_template(tmp_path, name):
    import json
    import shutil

    from openchat_jax.infer.engine import load_chat_model
    from openchat_jax.hf.chat_files import export_chat_files
    from openchat_jax.hf import export_hf
    from tests.test_infer_fixtures import SMALL, random_params, save_weights

    folder = build_llama3_style_tokenizer(tmp_path / "tok")
    ref = Reference(folder, name)
    cfg = SMALL.replace(vocab_size=ref.tok.get_vocab_size(True) + (name != "openchat_3.6"))  # + <|end_of_turn|>
    ckpt = save_weights(tmp_path / "w", random_params(cfg), cfg)
    shutil.copytree(folder, ckpt / "tokenizer")
    classes = [{"name": "gpt4", "condition": "GPT4", "weight": 1.0}, {"name": "gpt3", "condition": "GPT3", "weight": 0.1}]
    (ckpt / "classes.json").write_text(json.dumps({"classes": classes, "inference_condition": "GPT4",
                                                   "template": name}))
    model = load_chat_model(ckpt)
    assert model.template.family.name == name and model.eot_id == ref.eot and ref.eot in model.stop_ids
    messages = [{"role": "user", "content": " What is the capital of France?\n"}]
    assert model.template.build_prompt(messages, "", "GPT4") == ref.ids(messages, "", "GPT4", generation=True)[0]

    export_hf(str(ckpt), str(tmp_path / "hf"))
    assert export_chat_files(ckpt, tmp_path / "hf") == "GPT4"
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.eos_token == ("<|eot_id|>" if name == "openchat_3.6" else "<|end_of_turn|>")
    got = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(got) == ref.ids(messages, "", "GPT4", generation=True)[0]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ref.eot, ref.tok.token_to_id("<|end_of_text|>")]
