"""Mesh invariance (the same step on any mesh), sharded creation of the state, mesh config errors."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from openchat_jax.errors import ConfigError
from openchat_jax.model.config import TINY
from openchat_jax.model.llama import param_shardings
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train.optimizer import make_optimizer
from openchat_jax.train.step import init_train_state, make_train_step
from tests.synthetic import packed_batch

CFG = TINY.replace(num_layers=2, embed=64, mlp=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=128)
TRAIN = ml_collections.ConfigDict(dict(
    lr=3e-3, warmup_ratio=0.2, end_lr_ratio=0.1, grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
    decay_norms=True, decay_embeddings=True,
))
MESHES = [
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    ({"data": 1, "fsdp": 8, "tensor": 1}, 8),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
]


# 256 positions: training attention runs in 2 causal query blocks of 128 (model/attention.py), so
# the blocked path is checked on every mesh, heads sharded over "tensor" included.
L = 256


def run_five_steps(mesh_cfg, num_devices):
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:num_devices])
    tx, schedule, _ = make_optimizer(TRAIN, total_steps=5, tokens_per_step=8 * L)
    state = init_train_state(CFG, tx, mesh, seed=0)
    # Loss chunks of 64 positions: the fused head reorders each batch shard's tokens
    # supervised-first and skips the chunks past them (loss.head_loss_sums), on every mesh.
    step = make_train_step(CFG, tx, schedule, mesh, num_classes=2, micro_batches=1, loss_chunk_length=64)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(5):
        state, metrics = step(state, mesh_lib.global_batch(packed_batch(rng, 8, L, CFG.vocab_size), mesh))
        losses.append(float(metrics["loss"]))
    return losses, state, mesh


def test_mesh_invariance_five_steps():
    from openchat_jax.model.attention import CAUSAL_BLOCK

    assert L > CAUSAL_BLOCK and L % CAUSAL_BLOCK == 0  # the blocked attention path is the one tested
    results = [run_five_steps(m, n) for m, n in MESHES]
    ref_losses, ref_state, _ = results[0]
    assert len(set(ref_losses)) == 5  # five different batches, five different losses
    for (mesh_cfg, _), (losses, state, mesh) in zip(MESHES[1:], results[1:]):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=0, err_msg=str(mesh_cfg))
        for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(state["params"])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5, err_msg=str(mesh_cfg))
    # The sharded runs really were sharded: FSDP splits embed, tensor splits heads.
    _, state, mesh = results[2]
    assert state["params"]["blocks"]["wq"].sharding.spec == P(None, "fsdp", None, None)
    assert state["params"]["blocks"]["wq"].addressable_shards[0].data.shape == (2, 8, 4, 16)
    mu = state["opt_state"][1][0].mu["blocks"]["wq"]
    assert mu.sharding == state["params"]["blocks"]["wq"].sharding
    _, state, mesh = results[3]
    assert state["params"]["blocks"]["wk"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert state["params"]["lm_head"].sharding.spec == P("fsdp", "tensor")


def test_state_is_created_in_its_shardings():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    tx, _, _ = make_optimizer(TRAIN, total_steps=5, tokens_per_step=1)
    state = init_train_state(CFG, tx, mesh, seed=0)
    expected = param_shardings(CFG, mesh)
    for arr, sharding in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected)):
        assert arr.sharding == sharding
    embed = state["params"]["embed"]
    assert embed.sharding.spec == P(None, "fsdp")  # vocab -> tensor (size 1, dropped), embed -> fsdp
    assert {s.data.shape for s in embed.addressable_shards} == {(128, 16)}
    assert state["step"].sharding == NamedSharding(mesh, P())


def test_uneven_dimension_is_replicated_not_an_error():
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    odd = CFG.replace(vocab_size=129)  # e.g. Llama-2 + <|end_of_turn|> = 32001 rows
    sh = param_shardings(odd, mesh)
    assert sh["embed"].spec == P(None, "fsdp") and sh["lm_head"].spec == P("fsdp", None)
    assert sh["blocks"]["w_gate"].spec == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("mesh_cfg, devices, shape", [
    ({"data": -1, "fsdp": 2, "tensor": 1}, 8, (4, 2, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, 8, (1, 4, 2)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"fsdp": -1}, 1, (1, 1, 1)),
])
def test_mesh_shape_resolution(mesh_cfg, devices, shape):
    assert mesh_lib.mesh_shape(mesh_cfg, devices) == shape


@pytest.mark.parametrize("mesh_cfg, message", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "only one mesh axis may be -1"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "not divisible by 3"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "uses 4 devices but 8"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, "mesh.data=0"),
])
def test_mesh_config_errors(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.mesh_shape(mesh_cfg, 8)
