"""KV-cache generation: parity with transformers' greedy generate on the exported checkpoint,
cache logits == full forward at every position, stop tokens,
context limits, and the same tokens on a device mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.errors import DataError
from openchat_jax.infer.generate import generate_tokens
from openchat_jax.infer.sampling import SamplingConfig
from openchat_jax.model.llama import forward
from tests.test_infer_fixtures import SMALL, random_params, random_prompts, save_weights

LENGTHS = (3, 9, 1, 14)  # different lengths; one prompt is just <s>
N = 32


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, SMALL.vocab_size)


@pytest.fixture(scope="module")
def free_run(params, prompts):
    """Greedy, no stop token, with the logits of every step (one compiled program, shared)."""
    return generate_tokens(params, SMALL, prompts, max_new_tokens=N, stop_ids=[], length_bucket=8, return_logits=True)


@pytest.fixture(scope="module")
def hf_model(params, tmp_path_factory):
    """transformers' LlamaForCausalLM loaded from the folder `convert jax-to-hf` writes."""
    import transformers

    from openchat_jax.hf import export_hf

    root = tmp_path_factory.mktemp("hf_parity")
    save_weights(root / "jax", params, SMALL)
    export_hf(str(root / "jax"), str(root / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(root / "hf"), attn_implementation="eager").eval()
    return model


def hf_greedy(model, prompts, max_new_tokens, eos_token_id=None) -> np.ndarray:
    import torch

    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=0, min_new_tokens=0,
        )
    return out[:, P:].numpy()


def test_greedy_matches_transformers_generate(free_run, prompts, hf_model):
    ours, _ = free_run
    theirs = hf_greedy(hf_model, prompts, N)
    assert theirs.shape == (len(prompts), N)
    for b, g in enumerate(ours):
        assert g.finish_reason == "length"
        assert g.tokens == theirs[b].tolist(), f"prompt {b} (length {LENGTHS[b]})"
    assert len({tuple(g.tokens) for g in ours}) == len(prompts)  # rows really differ


def test_stop_token_matches_transformers_generate(params, prompts, hf_model, free_run):
    free, _ = free_run
    # A stop token that row 1 first produces at some step >= 4.
    step = next(i for i in range(4, N) if free[1].tokens[i] not in free[1].tokens[:i])
    stop = free[1].tokens[step]
    ours, _ = generate_tokens(params, SMALL, prompts, max_new_tokens=N, stop_ids=[stop], length_bucket=8,
                              return_logits=True)
    theirs = hf_greedy(hf_model, prompts, N, eos_token_id=stop)
    stopped = 0
    for b, g in enumerate(ours):
        row = theirs[b].tolist()
        if stop in row:
            cut = row.index(stop)
            assert g.finish_reason == "stop" and g.tokens == row[:cut], f"prompt {b}"
            stopped += 1
        else:
            assert g.finish_reason == "length" and g.tokens == row, f"prompt {b}"
        assert g.tokens == free[b].tokens[: len(g.tokens)]
    assert ours[1].tokens == free[1].tokens[:step] and stopped >= 1


def test_cache_logits_equal_full_forward(params, prompts, free_run):
    gens, logits = free_run
    assert logits.shape == (len(prompts), N, SMALL.vocab_size)
    # One full forward over every prompt + answer, right-padded (pads: segment 0, after the row).
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    L = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), L), np.int32)
    segments = np.zeros((len(seqs), L), np.int32)
    for b, seq in enumerate(seqs):
        tokens[b, : len(seq)], segments[b, : len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(L), (len(seqs), L))
    full_BxLxV = np.asarray(forward(params, SMALL, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)).logits)
    worst = 0.0
    for b, (p, g) in enumerate(zip(prompts, gens)):
        # logits after the last prompt token and after each generated token but the last
        want = full_BxLxV[b, len(p) - 1: len(p) - 1 + N]
        worst = max(worst, float(np.abs(want - logits[b]).max()))
        assert np.argmax(want, -1).tolist() == g.tokens
    assert worst <= 1e-4, worst


def test_budget_ends_at_the_context(params):
    long = random_prompts((120, 5), SMALL.vocab_size, seed=3)
    gens = generate_tokens(params, SMALL, long, max_new_tokens=N, stop_ids=[])
    assert [len(g.tokens) for g in gens] == [SMALL.max_position_embeddings - 120, N]
    assert [g.finish_reason for g in gens] == ["length", "length"]
    with pytest.raises(DataError, match="prompt 1 has 128 tokens"):
        generate_tokens(params, SMALL, [[1, 5], [1] * 128], max_new_tokens=4, stop_ids=[])
    with pytest.raises(DataError, match="outside the vocabulary"):
        generate_tokens(params, SMALL, [[1, SMALL.vocab_size]], max_new_tokens=4, stop_ids=[])


def test_sampling_is_reproducible_and_differs_from_greedy(params, prompts, free_run):
    cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.95)
    run = lambda seed: generate_tokens(params, SMALL, prompts, max_new_tokens=N, stop_ids=[], sampling=cfg,  # noqa: E731
                                       key=jax.random.key(seed), length_bucket=8)
    a, b, c = run(3), run(3), run(4)
    greedy = free_run[0]
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert [g.tokens for g in a] != [g.tokens for g in greedy]
    with pytest.raises(DataError, match="PRNG key"):
        generate_tokens(params, SMALL, prompts, max_new_tokens=4, stop_ids=[], sampling=cfg)


def test_mesh_gives_the_same_tokens(params, prompts, free_run):
    from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES
    from openchat_jax.train.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plain, plain_logits = free_run[0][:3], free_run[1][:3]
    # 3 prompts: the batch is padded to the 4 rows data x fsdp shards
    sharded, sharded_logits = generate_tokens(params, SMALL, prompts[:3], max_new_tokens=N, stop_ids=[],
                                              length_bucket=8, return_logits=True, mesh=mesh,
                                              rules=LOGICAL_AXIS_RULES)
    assert [g.tokens for g in sharded] == [g.tokens for g in plain]
    np.testing.assert_allclose(sharded_logits, plain_logits, atol=1e-5)


def test_prefill_in_query_blocks_gives_the_same_answers(params, prompts, free_run, monkeypatch):
    """Prompts prefilled in blocks of 4 queries (the last shorter: 15 = 4+4+4+3) give the same
    tokens and logits as the one-block prefill the free run used."""
    from openchat_jax.model import attention

    monkeypatch.setattr(attention, "PREFILL_BLOCK", 4)
    jax.clear_caches()  # `_decode` would reuse the program compiled with the default block
    try:
        gens, logits = generate_tokens(params, SMALL, prompts, max_new_tokens=N, stop_ids=[], length_bucket=8,
                                       return_logits=True)
    finally:
        jax.clear_caches()
    free, free_logits = free_run
    assert [g.tokens for g in gens] == [g.tokens for g in free]
    np.testing.assert_allclose(logits, free_logits, atol=1e-4, rtol=0)
