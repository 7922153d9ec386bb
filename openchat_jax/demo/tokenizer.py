"""A tiny Llama-style tokenizer for the demo: characters, plus whole-word tokens for a fixed list.

Layout as Llama-2's `tokenizer.json` (so the data pipeline treats it exactly like the real one):
ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`; 3..258 the byte-fallback tokens `<0x00>`..`<0xFF>` (any
other character is spelled as its UTF-8 bytes, never dropped: transformers' LlamaTokenizer always
turns byte fallback on); a SentencePiece-style "▁" before the text and in place of every space.
Then come "▁" and the printable ASCII characters, one token each, then the whole-word tokens: each word `w` of `words` gets the merges ▁+w[0], ▁w[0]+w[1], ... so "▁User:" is
one token. Every merge extends a "▁"-headed piece by one character, so merges never cross a word
boundary and never start inside a word: digits are always single tokens, wherever they stand.
No training, no randomness: the same word list gives the same files.

`<|end_of_turn|>` is not in the vocabulary; `openchat_jax.data.load_tokenizer` adds it (the next id),
as it does for Llama-2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from openchat_jax.errors import ConfigError

SPECIALS = ("<unk>", "<s>", "</s>")
SPACE = "\u2581"  # "▁"
CHARACTERS = (SPACE,) + tuple(chr(c) for c in range(33, 127))


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        if not word or any(ch not in CHARACTERS for ch in word):
            raise ConfigError(f"demo tokenizer: word {word!r} must be non-empty printable ASCII without spaces")
        piece = SPACE
        for ch in word:
            pair = (piece, ch)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            piece += ch
    return merges


def llama_style_tokenizer_json(merges: list[tuple[str, str]]) -> dict:
    """A Llama-2-layout `tokenizer.json` (see the module docstring) whose vocabulary is the
    specials, the byte fallbacks, "▁" and printable ASCII, then one token per merge."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 4096,
    "tokenizer_class": "LlamaTokenizerFast",
}


def build_demo_tokenizer(out_dir: str | Path, words: Iterable[str]) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`
    (a folder for `openchat_jax.data.load_tokenizer` / `AutoTokenizer.from_pretrained`)."""
    return write_tokenizer_dir(out_dir, llama_style_tokenizer_json(_word_merges(dict.fromkeys(words))))


def write_tokenizer_dir(out_dir: str | Path, tokenizer: dict) -> Path:
    """`tokenizer` (a `llama_style_tokenizer_json`) and its Llama-2 config files, into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))
    return out_dir
