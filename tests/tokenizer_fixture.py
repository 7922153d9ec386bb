"""A tiny, deterministic, offline Llama-2-style tokenizer for tests.

Same layout and pipeline as Llama-2's `tokenizer.json`: ids 0,1,2 are `<unk>`, `<s>`, `</s>`;
ids 3..258 are the byte-fallback tokens `<0x00>`..`<0xFF>`; then `▁` and printable ASCII;
then BPE merges learned (by a small, tie-broken, pure-Python trainer) from a fixed corpus.
Words start with `▁` (SentencePiece style), so no merge crosses a word boundary.
`tokenizer_config.json` names `LlamaTokenizerFast` with `legacy: true`, exactly like the real
Llama-2 folder, so `transformers.AutoTokenizer` builds it the same way (Metaspace pre-tokenizer,
byte fallback). Vocabulary: about 500 tokens, so tiny models stay cheap.

    from tests.tokenizer_fixture import build_tiny_tokenizer
    path = build_tiny_tokenizer(tmp_dir)   # folder for AutoTokenizer.from_pretrained
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

SPECIALS = ["<unk>", "<s>", "</s>"]
SPACE = "\u2581"  # "▁"
NUM_MERGES = 150

CORPUS = [
    "You are a helpful assistant.",
    "GPT4 User: Hello, how are you today?",
    "GPT4 Assistant: I am fine, thank you! How can I help you?",
    "GPT3 User: What is the capital of France?",
    "GPT3 Assistant: The capital of France is Paris.",
    "User: Please write a short poem about the sea.",
    "Assistant: The sea is blue, the sky is wide, the wind is calling from the other side.",
    "What is two plus two? Two plus two is four.",
    "Thank you for the help. You are welcome, have a nice day.",
    "Explain the theory of relativity in simple words, please.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b): return a + b",
    "Write a function that returns the sum of a list of numbers.",
    "system prompt: answer in one sentence and be concise.",
]


def _learn_merges(words: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, count in words.items():
            sym = splits[w]
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        for w, sym in splits.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            splits[w] = out
    return merges


def tiny_tokenizer_json() -> dict:
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in [SPACE] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    words = Counter(SPACE + w for line in CORPUS for w in line.split(" "))
    merges = _learn_merges(words, NUM_MERGES)
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


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json` to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json(), ensure_ascii=False, indent=1))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
