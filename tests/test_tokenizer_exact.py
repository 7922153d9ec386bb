"""Tokenization is the tokenizer file's, at every boundary: prepare, build_prompt, the weights
folder's tokenizer/ (as we load it and as AutoTokenizer loads it) and the HF export (AutoTokenizer and
its chat template) all give the ids of encoding each piece on its own with the file itself:
`tokenizers.Tokenizer.from_file(tokenizer.json)`, or SentencePiece for a folder with only
`tokenizer.model`. The corpus has leading, trailing and repeated spaces, tabs, newlines, unicode,
emoji and code."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
import transformers

from openchat_jax.data.prepare import load_dataset_info, prepare
from openchat_jax.data.template import build_prompt, piece_encoder
from openchat_jax.data.tfds_builder import open_data_source
from openchat_jax.data.tokenizer import load_tokenizer, read_tokenizer, tokenizer_folder
from openchat_jax.errors import ConfigError
from openchat_jax.hf.chat_files import export_chat_files
from openchat_jax.hf import export_hf, import_hf
from tests import hf_fixtures
from tests.test_data_prepare import data_config, sharegpt, write_jsonl
from tests.tokenizer_fixture import build_sentencepiece_tokenizer, build_tiny_tokenizer

WORDS = ["Hello", "Paris.", "def", "f(x):", "return", "x", "über", "naïve", "日本語", "текст", "😀", "🚀", "GPT4",
         "User:", "Assistant:", "{", "}", "==", "'q'", '"dq"', "\\n", "0.5", "1234", "#include", "<tag>", "a_b"]
SEPARATORS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\t\t", "\r\n", "", "    "]
FIXED = [" ", "  ", "\n", "\t", "x", " x", "x ", "  Now", " Paris.", "    def f():\n        return 1\n",
         "```python\nprint('hi')\n```", "\u00a0nbsp", "e\u0301", "tab\tinside", "end with newline\n"]


def corpus(n: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < n:
        lead = rng.choice(["", "", " ", "  ", "\n", "\t", "   "])
        body = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 8)))
        out.append(lead + body)
    return out


MESSAGES = corpus()


def conversations() -> list[tuple[list[dict[str, str]], str]]:
    """Multi-turn conversations over the corpus (ending with a user turn), every other with a system text."""
    out = []
    for i in range(len(MESSAGES)):
        turns = 1 + 2 * (i % 3)
        msgs = [{"role": ("user", "assistant")[t % 2], "content": MESSAGES[(i + t) % len(MESSAGES)]} for t in range(turns)]
        out.append((msgs, MESSAGES[(i + 5) % len(MESSAGES)] if i % 2 else ""))
    return out


class Reference:
    """Encoding straight from the tokenizer file, and the template assembled from it piece by piece."""

    def __init__(self, folder: Path):
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.encode: Callable[[str], list[int]] = lambda s: tok.encode(s, add_special_tokens=False).ids
            self.bos, self.size = tok.token_to_id("<s>"), tok.get_vocab_size(with_added_tokens=True)
        else:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self.encode = lambda s: list(sp.encode(s))
            self.bos, self.size = sp.bos_id(), sp.get_piece_size()
        self.eot = self.size  # <|end_of_turn|> is appended

    def prompt(self, messages, system: str, condition: str = "GPT4", generation: bool = True) -> list[int]:
        ids = [self.bos] + ((self.encode(system) + [self.eot]) if system else [])
        for m in messages:
            role = "User:" if m["role"] == "user" else "Assistant:"
            ids += self.encode(f"{condition} {role}".strip()) + self.encode(m["content"]) + [self.eot]
        return ids + (self.encode(f"{condition} Assistant:".strip()) if generation else [])


KINDS = ["tokenizer.json", "tokenizer.model"]


@pytest.fixture(scope="module", params=KINDS)
def folders(request, tmp_path_factory):
    """source tokenizer folder -> HF Llama with it -> weights folder (hf-to-jax --add-eot) -> HF export."""
    root = tmp_path_factory.mktemp("exact")
    src = build_tiny_tokenizer(root / "tok") if request.param == "tokenizer.json" else \
        build_sentencepiece_tokenizer(root / "tok")
    hf = hf_fixtures.make_hf_checkpoint(root / "hf", vocab_size=len(read_tokenizer(src)), num_hidden_layers=1)
    for f in src.iterdir():
        shutil.copy2(f, hf / f.name)
    import_hf(str(hf), str(root / "jax"), add_eot=True)
    export_hf(str(root / "jax"), str(root / "export"))
    assert export_chat_files(root / "jax", root / "export", condition_text="GPT4") == "GPT4"
    return {"src": src, "saved": root / "jax" / "tokenizer", "export": root / "export", "root": root}


def test_every_tokenizer_encodes_as_the_file(folders):
    ref = Reference(folders["src"])
    expected = [ref.encode(m) for m in MESSAGES]
    assert sum(m[:1].isspace() for m in MESSAGES) >= 30 and sum(m[-1:].isspace() for m in MESSAGES) >= 100
    for name in ("src", "saved"):
        tok, eot = load_tokenizer(folders[name])
        assert eot == ref.eot
        assert piece_encoder(tok)(MESSAGES) == expected, name
    for name in ("saved", "export"):
        auto = transformers.AutoTokenizer.from_pretrained(str(folders[name]))
        got = auto(MESSAGES, add_special_tokens=False)["input_ids"]
        assert [list(g) for g in got] == expected, name
        assert auto.convert_tokens_to_ids("<|end_of_turn|>") == ref.eot


def test_autotokenizer_on_the_source_folder_rebuilds_llama(folders):
    # What the file-pipeline loading guards against: the fixture names LlamaTokenizerFast, as the
    # real Llama-2 folder does, and transformers rebuilds that pipeline with other ids.
    if not (folders["src"] / "tokenizer.json").is_file():
        pytest.skip("a SentencePiece folder has no tokenizer.json pipeline to rebuild")
    ref = Reference(folders["src"])
    rebuilt = transformers.AutoTokenizer.from_pretrained(str(folders["src"]))
    differ = [m for m in MESSAGES if rebuilt(m, add_special_tokens=False)["input_ids"] != ref.encode(m)]
    assert len(differ) > 20 and " Paris." in differ


def test_build_prompt_and_the_exported_chat_template_equal_the_reference(folders):
    ref = Reference(folders["src"])
    tok, eot = load_tokenizer(folders["saved"])
    exported = transformers.AutoTokenizer.from_pretrained(str(folders["export"]))
    assert exported.eos_token == "<|end_of_turn|>"
    convs = conversations()
    assert sum(len(m) for m, _ in convs) >= 200 and any(s for _, s in convs) and max(len(m) for m, _ in convs) == 5
    for messages, system in convs:
        expected = ref.prompt(messages, system)
        assert build_prompt(tok, eot, messages, system, "GPT4") == expected
        full = ([{"role": "system", "content": system}] if system else []) + messages
        got = exported.apply_chat_template(full, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(got) == expected, (messages, system)


def test_prepare_equals_the_reference(folders, tmp_path):
    ref = Reference(folders["src"])
    convs = [(m + [{"role": "assistant", "content": "  answer\n"}], s) for m, s in conversations()
             if all(x["content"].strip() for x in m) and s.strip()]
    records = [dict(sharegpt(*[x["content"] for x in m], source="Model: GPT-4"), system=s) for m, s in convs]
    cfg = data_config(folders["src"], [write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "out", max_length=4096)
    report = prepare(cfg)
    assert report["examples"] == len(convs) >= 100
    classes = load_dataset_info(tmp_path / "out")["classes"]
    src = open_data_source(tmp_path / "out")
    for i, (messages, system) in enumerate(convs):
        row = src[i]
        condition = classes[int(row["class_id"])]["condition"]
        assert row["tokens"].tolist() == ref.prompt(messages, system, condition, generation=False), i


def test_sentencepiece_folder_decodes_with_sentencepiece(tmp_path):
    import sentencepiece as spm

    folder = build_sentencepiece_tokenizer(tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok, eot = load_tokenizer(folder)
    for text in MESSAGES[:40]:
        ids = sp.encode(text)
        assert tok.decode(ids + [eot], skip_special_tokens=True) == sp.decode(ids)


# -- tokenizer paths: our own one-line errors, no hub for a path, fast failure offline ------------

def _no_hub(*args, **kwargs):
    raise AssertionError("a local path went to the hub")


@pytest.mark.parametrize("name", ["./missing-tokenizer", "~/missing-tokenizer", "/no/such/tokenizer", "a/b/c"])
def test_a_missing_path_never_goes_to_the_hub(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_tokenizer(name)
    assert "\n" not in str(e.value)


def test_an_empty_folder_says_what_it_lacks(tmp_path):
    with pytest.raises(ConfigError, match="holds neither tokenizer.json nor tokenizer.model") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_a_hub_name_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not a local folder and not on the hub: the hub is unreachable") as e:
        tokenizer_folder("no-such-tokenizer-name")
    assert time.perf_counter() - start < 10 and "\n" not in str(e.value)


def test_a_hub_name_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    # An endpoint nobody listens on: the reachability check fails at once, no retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable"):
        tokenizer_folder("no-such-tokenizer-name")
    assert time.perf_counter() - start < 10


def test_saved_tokenizer_config_names_a_class_that_keeps_the_file(folders):
    config = json.loads((folders["saved"] / "tokenizer_config.json").read_text())
    sentencepiece = not (folders["src"] / "tokenizer.json").is_file()
    assert config["tokenizer_class"] == ("SentencePieceBackend" if sentencepiece else "PreTrainedTokenizerFast")
