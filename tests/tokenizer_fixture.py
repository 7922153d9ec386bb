"""A tiny, deterministic, offline Llama-2-style tokenizer for tests.

Same layout and pipeline as Llama-2's `tokenizer.json`: ids 0,1,2 are `<unk>`, `<s>`, `</s>`;
ids 3..258 are the byte-fallback tokens `<0x00>`..`<0xFF>`; then `▁` and printable ASCII;
then BPE merges learned (by a small, tie-broken, pure-Python trainer) from a fixed corpus.
The JSON layout is `openchat_jax.demo.tokenizer`'s; only the merges differ from the demo's.
Words start with `▁` (SentencePiece style), so no merge crosses a word boundary; runs of `▁` merge
into `▁▁` and `▁▁▁▁` (as in Llama-2), so leading and repeated spaces tokenize as they do there.
`tokenizer_config.json` names `LlamaTokenizerFast` with `legacy: true`, exactly like the real
Llama-2 folder, so `transformers.AutoTokenizer` builds it the same way (Metaspace pre-tokenizer,
byte fallback). Vocabulary: about 500 tokens, so tiny models stay cheap.

    from tests.tokenizer_fixture import build_tiny_tokenizer
    path = build_tiny_tokenizer(tmp_dir)   # folder for AutoTokenizer.from_pretrained
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from openchat_jax.demo.tokenizer import SPACE, llama_style_tokenizer_json, write_tokenizer_dir

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


# Runs of "▁" as single tokens, as Llama-2 has them ("▁▁" is id 259 there), merged last.
WHITESPACE_MERGES = [(SPACE, SPACE), (SPACE * 2, SPACE * 2)]


def tiny_tokenizer_json() -> dict:
    words = Counter(SPACE + w for line in CORPUS for w in line.split(" "))
    return llama_style_tokenizer_json(_learn_merges(words, NUM_MERGES) + WHITESPACE_MERGES)


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json` to out_dir."""
    return write_tokenizer_dir(out_dir, tiny_tokenizer_json())


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def build_sentencepiece_tokenizer(out_dir: Path) -> Path:
    """A folder holding only `tokenizer.model`: a tiny SentencePiece BPE model trained here, with
    Llama-2's settings (byte fallback, digits split, no text normalisation, spaces kept as written)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for _ in range(4) for line in CORPUS] + ["Ünïcödé 日本語 текст 😀 ✓", "    indented\tcode()"]
    text_file = out_dir.parent / f"{out_dir.name}_corpus.txt"
    text_file.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out_dir / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    text_file.unlink()
    return out_dir


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory) -> Path:
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp_tokenizer") / "tok")


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_llama3_style_tokenizer(out_dir: Path) -> Path:
    """A tiny byte-level BPE with Llama-3's pipeline (regex split + ByteLevel, no dummy prefix) and
    its special tokens (header tokens, `<|eot_id|>`), trained here on the fixed corpus."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(LLAMA3_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = CORPUS + ["\n\n".join(CORPUS), "GPT4 Correct User: GPT4 Correct Assistant: System\n\n"]
    tok.train_from_iterator([line for _ in range(3) for line in text], trainer)
    bos = tok.token_to_id(LLAMA3_SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{LLAMA3_SPECIALS[0]} $A",
                                                       special_tokens=[(LLAMA3_SPECIALS[0], bos)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": LLAMA3_SPECIALS[0], "eos_token": LLAMA3_SPECIALS[1], "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False, "model_max_length": 8192}, indent=1))
    return out_dir


def write_sharegpt_conversations(path: Path, count: int) -> Path:
    """`count` two-turn ShareGPT records from CORPUS (no template-like text in messages), labelled
    "Model: GPT-4" or "Model: GPT-3.5" by a hash of their index."""
    rng = np.random.default_rng(0)
    texts = [t for t in CORPUS if "GPT" not in t and ":" not in t]
    lines = []
    for i in range(count):
        q, a = (texts[j] for j in rng.choice(len(texts), 2, replace=False))
        label = "Model: GPT-4" if zlib.crc32(str(i).encode()) % 2 else "Model: GPT-3.5"
        lines.append(json.dumps({"id": str(i), "model": label, "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": a}]}))
    path.write_text("\n".join(lines) + "\n")
    return path
