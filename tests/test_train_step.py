"""The train step against independent references and its non-finite guard.

The reference is transformers' LlamaForCausalLM + torch.optim.AdamW with our weights copied in
(our own mapping here, not openchat_jax.hf): each packed conversation is run as its own
sequence (so neither packing nor segment ids exist on the reference side) and the weighted
objective sum(w * CE) / sum(w) is computed in float64 torch code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from openchat_jax.model.config import TINY
from openchat_jax.model.llama import forward
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train.optimizer import make_optimizer
from openchat_jax.train.step import init_train_state, make_train_step
from tests.synthetic import packed_batch

CFG = TINY.replace(num_layers=2, embed=64, mlp=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=128)
B, L, C = 8, 32, 2


def train_cfg(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        lr=1e-3, warmup_ratio=0.0, end_lr_ratio=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-5,
        weight_decay=0.1, decay_norms=True, decay_embeddings=True,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def one_device_mesh():
    return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def to_torch_model(params, cfg):
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed, intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    E = cfg.embed
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    head = p["embed"] if cfg.tie_embeddings else p["lm_head"].T
    sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"]), "lm_head.weight": t(head)}
    blk = p["blocks"]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t(blk["attn_norm"][i])
        sd[pre + "post_attention_layernorm.weight"] = t(blk["mlp_norm"][i])
        sd[pre + "self_attn.q_proj.weight"] = t(blk["wq"][i].reshape(E, -1).T)
        sd[pre + "self_attn.k_proj.weight"] = t(blk["wk"][i].reshape(E, -1).T)
        sd[pre + "self_attn.v_proj.weight"] = t(blk["wv"][i].reshape(E, -1).T)
        sd[pre + "self_attn.o_proj.weight"] = t(blk["wo"][i].reshape(-1, E).T)
        sd[pre + "mlp.gate_proj.weight"] = t(blk["w_gate"][i].T)
        sd[pre + "mlp.up_proj.weight"] = t(blk["w_up"][i].T)
        sd[pre + "mlp.down_proj.weight"] = t(blk["w_down"][i].T)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def torch_objective(model, batch) -> torch.Tensor:
    """sum(w * CE) / sum(w), every conversation run on its own (positions from 0)."""
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            idx = np.nonzero(seg == s)[0]
            tokens = torch.from_numpy(batch["tokens"][b, idx].astype(np.int64))[None]
            logits = model(input_ids=tokens, position_ids=torch.arange(len(idx))[None]).logits[0].double()
            ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["targets"][b, idx].astype(np.int64)), reduction="none")
            w = torch.from_numpy(batch["weights"][b, idx].astype(np.float64))
            num = num + (w * ce).sum()
            den += float(w.sum())
    return num / den


@pytest.fixture(scope="module")
def batch():
    return packed_batch(np.random.default_rng(0), B, L, CFG.vocab_size)


@pytest.fixture(scope="module")
def setup(batch):
    """One mesh, optimizer, initial state and compiled step shared by the tests (compiles are the
    slow part on CPU); the step does not donate, so the shared state stays valid."""
    mesh = one_device_mesh()
    tx, schedule, _ = make_optimizer(train_cfg(lr=3e-3), total_steps=10, tokens_per_step=B * L)
    state = init_train_state(CFG, tx, mesh, seed=1)
    step = make_train_step(CFG, tx, schedule, mesh, num_classes=C, donate=False)
    return dict(mesh=mesh, tx=tx, schedule=schedule, state=state, step=step, gb=mesh_lib.global_batch(batch, mesh))


@pytest.fixture(scope="module")
def ce_numpy(setup, batch):
    """Per-token CE and argmax from our forward's logits, log-softmax in float64 NumPy."""
    params = jax.device_get(setup["state"]["params"])
    logits = jax.jit(lambda p, b: forward(p, CFG, b["tokens"], b["positions"], b["segment_ids"]).logits)(params, batch)
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0], logits.argmax(-1)


def test_synthetic_batch_is_packed(batch):
    # The reference comparisons below mean something only if rows really hold several conversations.
    assert (batch["segment_ids"].max(axis=1) >= 2).all()
    assert (batch["segment_ids"] == 0).any()
    np.testing.assert_allclose(np.unique(batch["weights"]), [0.0, 0.1, 1.0])


def test_loss_and_adamw_update_match_transformers_and_torch(setup, batch):
    params0 = jax.tree.map(np.asarray, setup["state"]["params"])
    state, metrics = setup["step"](setup["state"], setup["gb"])
    model = to_torch_model(params0, CFG)
    ref = torch_objective(model, batch)
    assert abs(float(metrics["loss"]) - ref.item()) / ref.item() <= 1e-5, (float(metrics["loss"]), ref.item())

    lr = float(setup["schedule"](0))
    assert lr == pytest.approx(3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi / 10)), rel=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    opt.zero_grad()
    ref.float().backward()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    assert torch_norm > 1.0, "the test should exercise clipping"
    assert float(metrics["grad_norm"]) == pytest.approx(torch_norm, rel=1e-5)
    opt.step()
    ours = to_torch_model(jax.tree.map(np.asarray, state["params"]), CFG).state_dict()
    before = to_torch_model(params0, CFG).state_dict()
    for name, theirs in model.state_dict().items():
        if "rotary" in name:
            continue
        delta_ref = theirs.numpy() - before[name].numpy()
        delta = ours[name].numpy() - before[name].numpy()
        assert np.abs(delta_ref).max() > 0.5 * lr, name
        # Adam moves each coordinate by ~lr; agree to 1e-3 of that (torch's clip adds 1e-6 to the norm).
        np.testing.assert_allclose(delta, delta_ref, atol=1e-3 * lr, rtol=0, err_msg=name)


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused_head", "plain"])
def test_tied_embeddings_step_matches_transformers(batch, fused_head):
    """With tie_embeddings the LM head is the embedding table: no lm_head leaf, and the loss, the
    gradient norm and the AdamW update of `embed` (which gets the lookup's and the head's
    gradients) equal a tied transformers model's, through the fused head loss and plain autodiff."""
    cfg = CFG.replace(tie_embeddings=True)
    mesh = one_device_mesh()
    tx, schedule, _ = make_optimizer(train_cfg(lr=3e-3), total_steps=10, tokens_per_step=B * L)
    state0 = init_train_state(cfg, tx, mesh, seed=1)
    assert "lm_head" not in state0["params"]
    step = make_train_step(cfg, tx, schedule, mesh, num_classes=C, donate=False, fused_head=fused_head, loss_chunk_length=8)
    params0 = jax.tree.map(np.asarray, state0["params"])
    state, metrics = step(state0, mesh_lib.global_batch(batch, mesh))

    model = to_torch_model(params0, cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = torch_objective(model, batch)
    assert abs(float(metrics["loss"]) - ref.item()) / ref.item() <= 1e-5
    lr = float(schedule(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    ref.float().backward()
    assert float(metrics["grad_norm"]) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)), rel=1e-5)
    opt.step()
    before, after = params0["embed"], np.asarray(state["params"]["embed"])
    delta_ref = model.model.embed_tokens.weight.detach().numpy() - before
    assert np.abs(delta_ref).max() > 0.5 * lr
    np.testing.assert_allclose(after - before, delta_ref, atol=1e-3 * lr, rtol=0)


@pytest.mark.parametrize("chunk", [0, 8])
def test_four_micro_batches_equal_one_batch(setup, chunk):
    """Also with the loss in chunks of 8 positions, each micro-batch skipping the chunks past its
    supervised tokens (loss.head_loss_sums), against the one-batch step in whole rows."""
    step4 = make_train_step(CFG, setup["tx"], setup["schedule"], setup["mesh"], num_classes=C, micro_batches=4, donate=False,
                            loss_chunk_length=chunk)
    s1, m1 = jax.device_get(setup["step"](setup["state"], setup["gb"]))
    s4, m4 = jax.device_get(step4(setup["state"], setup["gb"]))
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)  # float32 sums in another order
    if chunk:  # some chunks were skipped (the batch has ~40% unsupervised tokens and pad tails)
        assert float(m4["lm_head_tokens"]) < B * L == float(m1["lm_head_tokens"])
    for key in ("weight_sum", "supervised_tokens", "class_tokens", "class_loss", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-6, atol=1e-6, err_msg=key)
    moved = 0.0
    for a, b, before in zip(jax.tree.leaves(s1), jax.tree.leaves(s4), jax.tree.leaves(jax.device_get(setup["state"]))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
        moved = max(moved, float(np.abs(np.asarray(a, np.float64) - np.asarray(before, np.float64)).max()))
    assert moved > 1e-4  # the update is not trivially zero


def test_per_class_metrics_match_numpy(setup, batch, ce_numpy):
    ce, argmax = ce_numpy
    _, metrics = setup["step"](setup["state"], setup["gb"])
    w, cls = batch["weights"], batch["class_ids"]
    for c in range(C):
        sel = (w > 0) & (cls == c)
        assert metrics["class_tokens"][c] == sel.sum() > 0
        assert float(metrics["class_loss"][c]) == pytest.approx(ce[sel].mean(), rel=1e-5)
        assert float(metrics["class_accuracy"][c]) == pytest.approx((argmax == batch["targets"])[sel].mean(), abs=1e-6)
    assert float(metrics["tokens"]) == (batch["segment_ids"] > 0).sum()
    assert float(metrics["loss"]) == pytest.approx((w * ce).sum() / w.sum(), rel=1e-5)


def test_weighted_false_gives_every_supervised_token_weight_one(setup, batch, ce_numpy):
    """Ablation `train.weighted=False`: the same supervised tokens, each weighted 1.0, so the loss
    is the plain mean CE over supervised tokens; with it on, 0.1-class tokens count a tenth."""
    ce, _ = ce_numpy
    w = batch["weights"]
    plain, weighted = ce[w > 0].mean(), (w * ce).sum() / w.sum()
    assert abs(plain - weighted) > 1e-4  # the switch makes a difference on this batch
    step_off = make_train_step(CFG, setup["tx"], setup["schedule"], setup["mesh"], num_classes=C, weighted=False, donate=False)
    _, m_off = step_off(setup["state"], setup["gb"])
    _, m_on = setup["step"](setup["state"], setup["gb"])
    assert float(m_off["loss"]) == pytest.approx(plain, rel=1e-5)
    assert float(m_on["loss"]) == pytest.approx(weighted, rel=1e-5)
    assert float(m_off["weight_sum"]) == (w > 0).sum() == float(m_off["supervised_tokens"])
    assert float(m_on["weight_sum"]) == pytest.approx(w.sum(), rel=1e-6)
    np.testing.assert_array_equal(m_on["class_tokens"], m_off["class_tokens"])


def test_nonfinite_step_leaves_state_unchanged(setup, batch):
    step, state, gb = setup["step"], setup["state"], setup["gb"]
    bad = dict(state, params=dict(state["params"], final_norm=state["params"]["final_norm"].at[3].set(jnp.inf)))
    after, m = step(bad, gb)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(after["step"]) == int(state["step"]) + 1  # the batch was consumed
    for a, b in zip(jax.tree.leaves((bad["params"], bad["opt_state"])), jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A batch with no supervised token: loss is nan (never a silent 0) and the update is skipped.
    zero = mesh_lib.global_batch(dict(batch, weights=np.zeros_like(batch["weights"])), setup["mesh"])
    after, m = step(state, zero)
    assert int(m["nonfinite"]) == 1 and float(m["weight_sum"]) == 0.0 and np.isnan(float(m["loss"]))
    for a, b in zip(jax.tree.leaves((state["params"], state["opt_state"])), jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ...while a finite step does move the params and the count.
    after, m = step(state, gb)
    assert int(m["nonfinite"]) == 0
    assert not np.array_equal(np.asarray(after["params"]["lm_head"]), np.asarray(state["params"]["lm_head"]))


def test_fused_head_loss_gives_the_same_update_as_plain_autodiff(setup):
    """The default step (LM head fused into the loss, chunked along the row) against the step
    that differentiates logits -> loss as written."""
    plain = make_train_step(CFG, setup["tx"], setup["schedule"], setup["mesh"], num_classes=C, donate=False,
                            fused_head=False)
    chunked = make_train_step(CFG, setup["tx"], setup["schedule"], setup["mesh"], num_classes=C, donate=False,
                              loss_chunk_length=8)
    s_ref, m_ref = jax.device_get(plain(setup["state"], setup["gb"]))
    for step in (setup["step"], chunked):
        s, m = jax.device_get(step(setup["state"], setup["gb"]))
        for key in ("loss", "grad_norm", "accuracy", "class_loss", "class_accuracy", "class_tokens"):
            np.testing.assert_allclose(m[key], m_ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_message_normalized_step_loss_matches_numpy(setup, batch, ce_numpy):
    """`train.loss_normalization="message"` through the compiled step: each message (a run of
    weight > 0 targets, found here by a plain loop) contributes w_m * its mean CE."""
    ce, _ = ce_numpy
    w = batch["weights"]
    num = den = 0.0
    for b in range(w.shape[0]):
        t = 0
        while t < w.shape[1]:
            if w[b, t] > 0:
                end = t
                while end + 1 < w.shape[1] and w[b, end + 1] > 0:
                    end += 1
                num += w[b, t] * ce[b, t:end + 1].mean()
                den += w[b, t]
                t = end
            t += 1
    step = make_train_step(CFG, setup["tx"], setup["schedule"], setup["mesh"], num_classes=C, donate=False,
                           loss_normalization="message", micro_batches=2)
    _, metrics = step(setup["state"], setup["gb"])
    assert float(metrics["loss"]) == pytest.approx(num / den, rel=1e-5)
    assert abs(num / den - (w * ce).sum() / w.sum()) > 1e-4  # differs from the token mean on this batch
