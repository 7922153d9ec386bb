"""The fused LM-head loss (`loss.head_loss_sums`) against the plain one (`loss_sums` of the
logits, differentiated by JAX), and the config's choice of its chunk length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openchat_jax.config import resolve
from openchat_jax.errors import ConfigError
from openchat_jax.model.llama import lm_head
from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES
from openchat_jax.train import loss as loss_lib
from openchat_jax.train import step as step_lib
from openchat_jax.train.config import base_config
from openchat_jax.train.step import loss_options
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

B, L, E, V, C = 3, 16, 24, 70, 2


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, L, E)), jnp.float32)
    w_head = jnp.asarray(rng.standard_normal((E, V)) / np.sqrt(E), jnp.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    weights = np.where(rng.random((B, L)) < 0.6, 1.0, 0.0) * np.where(rng.random((B, L)) < 0.5, 1.0, 0.1)
    class_ids = rng.integers(0, C, (B, L)).astype(np.int32)
    # Padding: no weight, an out-of-vocabulary target, class -1.
    weights[2, 10:], targets[2, 10:], class_ids[2, 10:] = 0.0, 10**6, -1
    return x, w_head, jnp.asarray(targets), jnp.asarray(weights, jnp.float32), jnp.asarray(class_ids)


def _plain(x, w_head, t, w, c):
    sums = loss_lib.loss_sums(lm_head(x, w_head), t, w, c, C)
    return sums["wce"], sums


@pytest.mark.parametrize("chunk,skip", [(0, True), (4, True), (4, False), (8, True), (8, False), (16, True)])
def test_fused_head_loss_equals_plain_loss_and_gradient(inputs, chunk, skip):
    x, w_head, t, w, c = inputs

    def fused(x, w_head):
        sums = loss_lib.head_loss_sums(x, w_head, t, w, c, C, chunk, skip)
        return sums["wce"], sums

    (ref, ref_sums), ref_grads = jax.value_and_grad(lambda a, b: _plain(a, b, t, w, c), argnums=(0, 1), has_aux=True)(x, w_head)
    (got, got_sums), got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(x, w_head)
    assert np.isfinite(float(got)) and float(got) == pytest.approx(float(ref), rel=1e-6)
    for key in ref_sums.keys() - {"lm_head_tokens"}:  # the plain loss computes every position's logits
        np.testing.assert_allclose(np.asarray(got_sums[key]), np.asarray(ref_sums[key]), rtol=1e-6, atol=1e-6, err_msg=key)
    for name, a, b in zip(("x", "lm_head"), got_grads, ref_grads):
        assert np.abs(np.asarray(b)).max() > 1e-2, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6, err_msg=name)
    # Padded positions get no gradient.
    assert not np.asarray(got_grads[0])[2, 10:].any()


def test_fused_head_loss_top1_and_class_sums_match_numpy(inputs):
    x, w_head, t, w, c = inputs
    sums = jax.jit(lambda *a: loss_lib.head_loss_sums(*a, C, 8))(x, w_head, t, w, c)
    logits = np.asarray(x, np.float64) @ np.asarray(w_head, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    t_np, w_np, c_np = np.asarray(t), np.asarray(w), np.asarray(c)
    sup = w_np > 0
    ce = -np.take_along_axis(logp, np.where(sup, t_np, 0)[..., None], -1)[..., 0]
    correct = (logits.argmax(-1) == t_np) & sup
    for k in range(C):
        sel = sup & (c_np == k)
        assert float(sums["class_wce"][k]) == pytest.approx((w_np * ce)[sel].sum(), rel=1e-5)
        assert float(sums["class_correct"][k]) == correct[sel].sum()
        assert float(sums["class_tokens"][k]) == sel.sum() > 0


def test_only_the_total_carries_a_gradient(inputs):
    """Per-class sums are metrics: differentiating one gives zero, by design (documented)."""
    x, w_head, t, w, c = inputs
    g = jax.grad(lambda a: loss_lib.head_loss_sums(a, w_head, t, w, c, C)["class_wce"][0])(x)
    assert not np.asarray(g).any()


def test_bfloat16_compute_keeps_gradient_dtypes(inputs):
    x, w_head, t, w, c = inputs
    xb, wb = x.astype(jnp.bfloat16), w_head.astype(jnp.bfloat16)
    gx, gw = jax.grad(lambda a, b: loss_lib.head_loss_sums(a, b, t, w, c, C, 8)["wce"], argnums=(0, 1))(xb, wb)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    _, (rx, rw) = jax.value_and_grad(lambda a, b: _plain(a, b, t, w, c)[0], argnums=(0, 1))(x, w_head)
    for a, b in ((gx, rx), (gw, rw)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def _supervised_at_row_ends(rows: int, length: int, per_row: list[int]):
    """Weights > 0 only on each row's last `per_row[b]` positions (so skipping needs the reorder),
    padding (weight 0, an out-of-vocabulary target) elsewhere."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, length, E)).astype(np.float32)
    w_head = jnp.asarray(rng.standard_normal((E, V)) / np.sqrt(E), jnp.float32)
    targets = np.full((rows, length), 10**6, np.int32)
    weights = np.zeros((rows, length), np.float32)
    class_ids = np.full((rows, length), -1, np.int32)
    for b, n in enumerate(per_row):
        if n:
            targets[b, -n:] = rng.integers(0, V, n)
            weights[b, -n:] = rng.choice([1.0, 0.1], n)
            class_ids[b, -n:] = rng.integers(0, C, n)
    return x, w_head, jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(class_ids)


def test_skipped_chunks_are_never_computed():
    """2 rows x 16 positions in chunks of 4 positions (8 tokens per chunk): 8 supervised tokens fill
    exactly the first chunk after the reorder, so the other 3 chunks must not run. The unsupervised
    tokens' hidden states are NaN: if any of them reached the LM head, dW would be NaN."""
    x, w_head, t, w, c = _supervised_at_row_ends(2, 16, [5, 3])
    clean = np.where(np.asarray(w)[..., None] > 0, x, 0.0)
    poisoned = np.where(np.asarray(w)[..., None] > 0, x, np.nan)
    (ref, ref_sums), (rx, rw) = jax.value_and_grad(lambda a, b: _plain(a, b, t, w, c), argnums=(0, 1), has_aux=True)(jnp.asarray(clean), w_head)
    fused = lambda a, b: loss_lib.head_loss_sums(a, b, t, w, c, C, 4, True)["wce"]  # noqa: E731
    got, (gx, gw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(jnp.asarray(poisoned), w_head)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=0, atol=1e-6)
    counted = lambda skip: float(loss_lib.head_loss_sums(jnp.asarray(clean), w_head, t, w, c, C, 4, skip)["lm_head_tokens"])  # noqa: E731
    assert counted(True) == 8 and counted(False) == 32
    # Without skipping, the NaN rows are computed (their weight 0 does not stop NaN * 0 = NaN).
    assert np.isnan(np.asarray(jax.grad(lambda b: loss_lib.head_loss_sums(jnp.asarray(poisoned), b, t, w, c, C, 4, False)["wce"])(w_head))).any()


@pytest.mark.parametrize("per_row", [[0, 16, 2, 0], [3, 1, 4, 1], [0, 0, 0, 0]])
def test_skip_per_batch_shard_matches_plain_loss(per_row):
    """Under the mesh rules (batch over data=4: one reorder group per device), uneven supervised
    counts, a row with all tokens supervised and a batch with none."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from openchat_jax.model.partitioning import use_rules
    from openchat_jax.train import mesh as mesh_lib

    x, w_head, t, w, c = _supervised_at_row_ends(4, 16, per_row)
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
    rows = NamedSharding(mesh, P("data"))

    def fused(a, b, t, w, c):
        with use_rules(mesh, LOGICAL_AXIS_RULES):
            sums = loss_lib.head_loss_sums(a, b, t, w, c, C, 4, True)
        return sums["wce"], sums

    args = [jax.device_put(a, rows) for a in (jnp.asarray(x), t, w, c)]
    (got, got_sums), (gx, gw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(args[0], w_head, *args[1:])
    (ref, ref_sums), (rx, rw) = jax.value_and_grad(lambda a, b: _plain(a, b, t, w, c), argnums=(0, 1), has_aux=True)(jnp.asarray(x), w_head)
    assert float(got) == pytest.approx(float(ref), rel=1e-6, abs=1e-7)
    for key in ref_sums.keys() - {"lm_head_tokens"}:  # the plain loss computes every position's logits
        np.testing.assert_allclose(np.asarray(got_sums[key]), np.asarray(ref_sums[key]), rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=0, atol=1e-6)
    assert float(got_sums["tokens"]) == sum(per_row)


def test_loss_options_pick_a_dividing_chunk_or_refuse():
    def cfg(**train):
        values = base_config("tiny").to_dict()
        values["train"].update({"loss_chunk_length": 0, **train})
        return resolve(values).train

    assert loss_options(cfg(), 4096) == {"fused_head": True, "loss_chunk_length": 0, "skip_unsupervised_logits": True,
                                         "loss_normalization": "token"}
    assert loss_options(cfg(loss_normalization="message"), 64)["loss_normalization"] == "message"
    with pytest.raises(ConfigError, match="loss_normalization"):
        loss_options(cfg(loss_normalization="sequence"), 64)
    assert loss_options(cfg(skip_unsupervised_logits=False), 64)["skip_unsupervised_logits"] is False
    with pytest.raises(ConfigError, match="skip_unsupervised_logits"):
        loss_options(cfg(skip_unsupervised_logits="no"), 64)
    assert loss_options(cfg(loss_chunk_length=512), 4096)["loss_chunk_length"] == 512
    assert loss_options(cfg(loss_chunk_length=512), 128)["loss_chunk_length"] == 0  # shorter rows: whole rows
    assert loss_options(cfg(loss_chunk_length=512), 1000)["loss_chunk_length"] == 500
    assert loss_options(cfg(loss_chunk_length=100), 1009)["loss_chunk_length"] == 0  # prime length: whole rows
    assert loss_options(cfg(fused_head_loss=False), 64)["fused_head"] is False
    for bad in (-1, 1.5, True, "128"):
        with pytest.raises(ConfigError, match="loss_chunk_length"):
            loss_options(cfg(loss_chunk_length=bad), 512)


def _message_batch():
    """Two rows of hand-placed messages: (row, first position, last position, weight). Runs touch
    only through a single weight-0 position; a message of one token; one ending the row."""
    messages = [(0, 1, 4, 1.0), (0, 6, 6, 0.1), (0, 8, 12, 1.0), (1, 0, 2, 0.1), (1, 4, 9, 0.5), (1, 11, 15, 1.0)]
    w = np.zeros((B - 1, L), np.float32)
    for r, a, b, wm in messages:
        w[r, a:b + 1] = wm
    return messages, w


def test_message_mean_loss_equals_numpy_reference(inputs):
    """`loss_normalization="message"`: sum_m w_m mean_{t in m} CE_t / sum_m w_m, computed here
    message by message in float64 NumPy from the hand-placed messages (no run detection)."""
    x, w_head, t, _, _ = inputs
    messages, w = _message_batch()
    x, t = x[: B - 1], t[: B - 1]
    c = jnp.zeros((B - 1, L), jnp.int32)
    logits = np.asarray(lm_head(x, w_head), np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.asarray(t)[..., None], -1)[..., 0]
    means = np.array([ce[r, a:b + 1].mean() for r, a, b, _ in messages])
    wm = np.array([wt for *_, wt in messages])
    for weighted, want in ((True, (wm * means).sum() / wm.sum()), (False, means.mean())):
        mw = loss_lib.token_weights(jnp.asarray(w), weighted, "message")
        sums = loss_lib.loss_sums(lm_head(x, w_head), t, mw, c, C)
        assert float(sums["wce"] / sums["weight"]) == pytest.approx(want, rel=1e-5)
        assert float(sums["weight"]) == pytest.approx(wm.sum() if weighted else len(messages), rel=1e-6)
        fused = loss_lib.head_loss_sums(x, w_head, t, mw, c, C, 4)
        assert float(fused["wce"] / fused["weight"]) == pytest.approx(want, rel=1e-5)
    token = loss_lib.token_weights(jnp.asarray(w), True, "token")
    sums = loss_lib.loss_sums(lm_head(x, w_head), t, token, c, C)
    assert abs(float(sums["wce"] / sums["weight"]) - (wm * means).sum() / wm.sum()) > 1e-3  # the modes differ here
    np.testing.assert_array_equal(np.asarray(token), w)  # "token" is the weights as prepared


def test_prepared_messages_are_separate_runs_in_loader_batches(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """What "message" normalization relies on: in packed batches each supervised message is its
    own run of weight > 0 targets, text tokens + <|end_of_turn|> long, even when a supervised
    user message (an OpenChat "weight") directly precedes an assistant reply."""
    import json

    from tokenizers import Tokenizer

    from openchat_jax.data.config import data_defaults
    from openchat_jax.data.loader import make_loader
    from openchat_jax.data.prepare import prepare

    turns = [("user", "Hello", 0.5), ("assistant", "four", 1.0), ("user", "What is two plus two?", 0.0),
             ("assistant", "Two plus two is four.", 0.1), ("user", "Thank you", 0.3), ("assistant", "welcome", None)]
    recs = [{"items": [{"role": r, "content": t, **({} if w is None else {"weight": w})} for r, t, w in turns[:n]],
             "condition": "GPT4"} for n in (2, 4, 6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    d = data_defaults()
    d.files, d.tokenizer, d.dataset_dir = [str(tmp_path / "a.jsonl")], str(tiny_tokenizer_dir), str(tmp_path / "ds")
    d.max_length, d.num_workers, d.allow_empty_classes = 128, 1, True
    prepare(d)
    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    want = sorted(len(raw.encode(t, add_special_tokens=False).ids) + 1
                  for n in (2, 4, 6) for _, t, w in turns[:n] if w is None or w > 0)
    batch = next(iter(make_loader(tmp_path / "ds", global_batch_size=1, seq_len=128, seed=0, num_epochs=1)))
    w = batch["weights"][0]
    on = np.concatenate([[0], (w > 0).astype(int), [0]])
    starts, ends = np.nonzero(np.diff(on) == 1)[0], np.nonzero(np.diff(on) == -1)[0]
    assert sorted((ends - starts).tolist()) == want
    mw = np.asarray(loss_lib.message_mean_weights(jnp.asarray(batch["weights"])))[0]
    message_weights = [w for n in (2, 4, 6) for _, _, w in turns[:n] if w is None or w > 0]
    assert mw.sum() == pytest.approx(sum(1.0 if w is None else w for w in message_weights), rel=1e-6)
def test_build_step_passes_the_train_config_to_the_step(monkeypatch):
    from openchat_jax.train import mesh as mesh_lib

    seen: dict = {}
    monkeypatch.setattr(step_lib, "make_train_step", lambda *args, **kwargs: seen.update(kwargs) or "step")
    config = base_config("tiny")
    config.train.update(micro_batches=4, weighted=False, loss_chunk_length=512)
    run = resolve(config)
    one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    step = step_lib.build_step(run, one, total_steps=10, seq_len=1024, num_classes=3)
    assert step.fn == "step" and step.model_cfg is run.model and (step.seq_len, step.micro_batches) == (1024, 4)
    assert seen == {"num_classes": 3, "micro_batches": 4, "weighted": False, "fused_head": True,
                    "loss_chunk_length": 512, "skip_unsupervised_logits": True,
                    "loss_normalization": "token"}
    step_lib.build_step(run, one, total_steps=10, seq_len=1024, micro_batches=1)
    assert seen["micro_batches"] == 1 and seen["num_classes"] == len(run.data.classes) == 2
    assert step_lib.build_step(run, one, total_steps=10).seq_len == run.data.max_length == 4096
    # 8 rows in 4 micro-batches: 2 rows each cannot be split over 8 batch devices (train, plan and bench alike)
    eight = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
    with pytest.raises(ConfigError, match="2 rows cannot be split over mesh data x fsdp = 8"):
        step_lib.build_step(run, eight, total_steps=10)
