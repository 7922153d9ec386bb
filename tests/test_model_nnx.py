"""The model is an NNX module tree whose `__call__` is the forward, and the weights' shardings are
read off each nnx.Param's `logical_axes` metadata through the rules table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from openchat_jax.model.config import TINY
from openchat_jax.model.llama import Llama, abstract_model, forward, init_params, param_shardings, param_specs
from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES, shardings_from_metadata
from openchat_jax.train.mesh import make_mesh

CFG = TINY.replace(vocab_size=64, num_layers=2, max_position_embeddings=64)


class _Toy(nnx.Module):
    def __init__(self, axes: tuple[str, ...]):
        self.w = nnx.Param(jnp.zeros((8, 4)), logical_axes=axes)


def test_a_params_metadata_decides_its_sharding():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = [shardings_from_metadata(nnx.state(_Toy(axes), nnx.Param), mesh)["w"].spec
             for axes in [("embed", "mlp"), ("mlp", "embed"), ("layers", "head_dim")]]
    assert specs == [P("fsdp", "tensor"), P("tensor", "fsdp"), P(None, None)]
    toy = _Toy(("embed", "mlp"))
    toy.w.set_metadata("logical_axes", ("vocab", None))  # the metadata, not the attribute name, decides
    assert shardings_from_metadata(nnx.state(toy, nnx.Param), mesh)["w"].spec == P("tensor", None)
    bare = _Toy(("embed", "mlp"))
    bare.w = nnx.Param(jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="no logical_axes metadata"):
        shardings_from_metadata(nnx.state(bare, nnx.Param), mesh)


def test_llama_param_shardings_on_a_2x2x2_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = jax.tree.map(lambda s: s.spec, param_shardings(CFG, mesh))
    assert specs == {
        "embed": P("tensor", "fsdp"),
        "blocks": {
            "attn_norm": P(None, "fsdp"), "mlp_norm": P(None, "fsdp"),
            "wq": P(None, "fsdp", "tensor", None), "wk": P(None, "fsdp", "tensor", None),
            "wv": P(None, "fsdp", "tensor", None), "wo": P(None, "tensor", None, "fsdp"),
            "w_gate": P(None, "fsdp", "tensor"), "w_up": P(None, "fsdp", "tensor"), "w_down": P(None, "tensor", "fsdp"),
        },
        "final_norm": P("fsdp"),
        "lm_head": P("fsdp", "tensor"),
    }
    # Read off the module: the same Param with other metadata gives another sharding.
    state = nnx.state(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    state["blocks"]["wq"].set_metadata("logical_axes", ("layers", "embed", None, "heads"))
    assert shardings_from_metadata(state, mesh, LOGICAL_AXIS_RULES)["blocks"]["wq"].spec == P(None, "fsdp", None, "tensor")


def test_the_params_dict_is_the_modules_state_in_the_param_specs_layout():
    model = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shapes = jax.tree.map(lambda s: s[0], param_specs(CFG), is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3)
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    assert jax.tree.structure(init_params(CFG, jax.random.key(0))) == jax.tree.structure(params)
    tied = TINY.replace(tie_embeddings=True)
    assert "lm_head" not in nnx.to_pure_dict(nnx.state(abstract_model(tied)[1]))


def test_calling_the_module_is_the_forward():
    model = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    positions, segments = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones_like(tokens)
    out = model(tokens, positions, segments, layer_outputs=True)
    assert out.logits.shape == (2, 12, CFG.vocab_size) and out.layer_outputs.shape == (2, 2, 12, CFG.embed)
    assert out.cache is None
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(np.asarray(forward(params, CFG, tokens, positions, segments).logits),
                                  np.asarray(out.logits))
    # The LM head applied to the returned hidden states gives the logits.
    np.testing.assert_allclose(np.asarray(out.hidden @ model.head_weight()), np.asarray(out.logits), atol=1e-5)
