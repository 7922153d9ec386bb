"""`--dtype` on generate/chat: a converted model (which records bfloat16 compute) run with
`--dtype float32` gives transformers' float32 greedy answers, token for token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from openchat_jax.cli import main as cli_main
from openchat_jax.data.template import build_prompt
from openchat_jax.data.tokenizer import load_tokenizer, save_tokenizer
from openchat_jax.infer.engine import answer, load_chat_model
from openchat_jax.infer.generate import generate_tokens
from tests import hf_fixtures
from tests.tokenizer_fixture import build_tiny_tokenizer

QUESTIONS = ["What is the capital of France?", "  Hello, how are you today?", "def add(a, b):\n\treturn a + b"]
NEW = 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An HF float32 Llama whose tokenizer already has <|end_of_turn|> (so the HF model is the
    reference as is), converted with `convert hf-to-jax`."""
    root = tmp_path_factory.mktemp("dtype")
    tok, eot = load_tokenizer(build_tiny_tokenizer(root / "tok"))
    hf = hf_fixtures.make_hf_checkpoint(root / "hf", vocab_size=len(tok), num_hidden_layers=2, seed=3)
    save_tokenizer(tok, root / "tok_eot")
    for f in (root / "tok_eot").iterdir():
        shutil.copy2(f, hf / f.name)
    assert cli_main(["convert", "hf-to-jax", "--hf-dir", str(hf), "--out", str(root / "jax")]) == 0
    return root, tok, eot


def _torch_greedy(hf_dir: Path, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, eos_token_id=stops,
                                 pad_token_id=0)[0, len(ids):].tolist()
            out.append(new[: new.index(next(t for t in new if t in stops))] if any(t in stops for t in new) else new)
    return out


def test_float32_greedy_equals_transformers(converted, tmp_path):
    root, tok, eot = converted
    default = load_chat_model(root / "jax")
    assert default.cfg.dtype == "bfloat16"  # what the conversion records
    model = load_chat_model(root / "jax", dtype="float32")
    assert model.cfg.dtype == "float32"
    prompts = [build_prompt(tok, eot, [{"role": "user", "content": q}], "", "GPT4") for q in QUESTIONS]
    expected = _torch_greedy(root / "hf", prompts, list(model.stop_ids))
    got = answer(model, [([{"role": "user", "content": q}], None) for q in QUESTIONS], "GPT4", max_new_tokens=NEW)
    assert [a.tokens for a in got] == expected
    assert sum(len(e) for e in expected) > 2 * len(QUESTIONS)

    # The flag changes the arithmetic: bfloat16 logits differ from float32 ones, float32 ones match torch.
    _, f32 = generate_tokens(model.params, model.cfg, prompts[:1], max_new_tokens=1, stop_ids=[eot], return_logits=True)
    _, bf16 = generate_tokens(default.params, default.cfg, prompts[:1], max_new_tokens=1, stop_ids=[eot],
                              return_logits=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(prompts[:1])).logits[0, -1].numpy()
    np.testing.assert_allclose(f32[0, 0], ref, atol=2e-5, rtol=1e-5)
    assert np.abs(bf16[0, 0] - ref).max() > 1e-3


def test_generate_cli_dtype_float32(converted, tmp_path):
    root, tok, eot = converted
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                               for i, q in enumerate(QUESTIONS)))
    out = tmp_path / "answers.jsonl"
    assert cli_main(["generate", "--ckpt", str(root / "jax"), "--prompts", str(prompts), "--out", str(out),
                     "--condition-text", "GPT4", "--dtype", "float32", f"--max-new-tokens={NEW}", "--no-progress"]) == 0
    ids = [build_prompt(tok, eot, [{"role": "user", "content": q}], "", "GPT4") for q in QUESTIONS]
    expected = _torch_greedy(root / "hf", ids, [eot, tok.eos_token_id])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["answers"][0] for x in lines] == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert [x["new_tokens"][0] for x in lines] == [len(e) for e in expected]
