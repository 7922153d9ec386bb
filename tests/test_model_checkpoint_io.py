"""The JAX weights folder: sharded save on a mesh, restore straight into other shardings, dtype
cast on restore, leaf-by-leaf streaming, side files, and clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from openchat_jax.errors import CheckpointError
from openchat_jax.model import checkpoint_io
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import abstract_model, param_shapes
from openchat_jax.model.partitioning import shardings_from_metadata

CFG = LlamaConfig(vocab_size=70, embed=32, mlp=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  dtype="float32", param_dtype="float32")
RULES = [("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor")]


def _shardings(mesh, rules):
    return shardings_from_metadata(abstract_model(CFG)[1], mesh, rules)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Params created sharded on a (fsdp=4, tensor=2) mesh and saved."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    shardings = _shardings(mesh, RULES)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), param_shapes(CFG))
    params = jax.device_put(host, shardings)
    assert params["blocks"]["wq"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    folder = tmp_path_factory.mktemp("w") / "weights"
    checkpoint_io.save_params(str(folder), params, CFG, special_tokens={"bos_token_id": 1, "eot_token_id": 69})
    return folder, jax.tree.map(np.asarray, params)


def test_restore_into_other_shardings(saved):
    folder, expected = saved
    mesh = jax.make_mesh((8,), ("data",))
    shardings = _shardings(mesh, [("embed", "data"), ("mlp", "data")])
    params, cfg = checkpoint_io.load_params(str(folder), shardings)
    assert cfg == CFG
    for got, want, sh in zip(jax.tree.leaves(params), jax.tree.leaves(expected), jax.tree.leaves(shardings)):
        assert isinstance(got, jax.Array) and got.sharding == sh
        np.testing.assert_array_equal(np.asarray(got), want)
    assert params["blocks"]["w_down"].sharding.spec == PartitionSpec(None, "data", None)

    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    params, _ = checkpoint_io.load_params(str(folder), one)
    assert all(x.sharding == one for x in jax.tree.leaves(params))


def test_restore_to_host_and_cast(saved):
    folder, expected = saved
    params, cfg = checkpoint_io.load_params(str(folder))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["lm_head"], expected["lm_head"])
    bf16, cfg16 = checkpoint_io.load_params(str(folder), dtype=jnp.bfloat16)
    assert cfg16.param_dtype == "bfloat16" and bf16["embed"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16["embed"], expected["embed"].astype(ml_dtypes.bfloat16))


def test_iter_params_streams_every_leaf_in_order(saved):
    folder, expected = saved
    seen = []
    for path, leaf in checkpoint_io.iter_params(str(folder)):
        node = expected
        for key in path:
            node = node[key]
        np.testing.assert_array_equal(leaf, node)
        seen.append(path)
    assert seen == list(checkpoint_io.expected_shapes(CFG))


def test_side_files_and_copy_assets(saved, tmp_path):
    folder, expected = saved
    assert json.loads((folder / "model_config.json").read_text())["num_kv_heads"] == 2
    special = checkpoint_io.read_special_tokens(str(folder))
    assert special == {"bos_token_id": 1, "eos_token_id": None, "pad_token_id": None, "eot_token_id": 69}
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected)
    checkpoint_io.save_params(str(tmp_path / "next"), bf16, CFG, copy_assets_from=str(folder))
    assert checkpoint_io.read_special_tokens(str(tmp_path / "next")) == special
    assert (tmp_path / "next" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert checkpoint_io.read_model_config(str(tmp_path / "next")).param_dtype == "bfloat16"


def test_errors_name_the_problem(saved, tmp_path):
    folder, expected = saved
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint_io.save_params(str(folder), expected, CFG)
    bad = {**expected, "blocks": {**expected["blocks"], "wk": expected["blocks"]["wk"][:, :, :1]}}
    with pytest.raises(CheckpointError, match=r"blocks\.wk has shape \(2, 32, 1, 8\), expected \(2, 32, 2, 8\)"):
        checkpoint_io.save_params(str(tmp_path / "bad"), bad, CFG)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_io.save_params(str(tmp_path / "bad"), {k: v for k, v in expected.items() if k != "lm_head"}, CFG)
    with pytest.raises(CheckpointError, match="no model_config.json"):
        checkpoint_io.load_params(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="shardings tree does not match"):
        checkpoint_io.load_params(str(folder), {"embed": jax.sharding.SingleDeviceSharding(jax.devices()[0])})


def test_streamed_save_writes_leaf_by_leaf_and_marks_completion_last(saved, tmp_path):
    folder, expected = saved
    flat = {p: leaf for p, leaf in checkpoint_io.iter_params(str(folder))}
    written = []

    def leaves():
        for path, leaf in flat.items():
            # Every earlier leaf is already on disk when the next is asked for.
            assert all((tmp_path / "s" / "params" / ".".join(p)).is_dir() for p in written)
            written.append(path)
            yield path, leaf

    checkpoint_io.save_param_leaves(str(tmp_path / "s"), leaves(), CFG)
    params, _ = checkpoint_io.load_params(str(tmp_path / "s"))
    np.testing.assert_array_equal(params["blocks"]["w_up"], expected["blocks"]["w_up"])

    partial = ((p, v) for p, v in flat.items() if p != ("final_norm",))
    with pytest.raises(CheckpointError, match=r"missing \['final_norm'\]"):
        checkpoint_io.save_param_leaves(str(tmp_path / "p"), partial, CFG)
    assert not (tmp_path / "p" / "model_config.json").exists()  # an unfinished folder is not loadable
    with pytest.raises(CheckpointError, match="no model_config.json"):
        checkpoint_io.load_params(str(tmp_path / "p"))
    twice = [(("embed",), flat[("embed",)])] * 2
    with pytest.raises(CheckpointError, match="repeated tensor embed"):
        checkpoint_io.save_param_leaves(str(tmp_path / "r"), iter(twice), CFG)


def test_missing_leaf_on_disk_is_named(saved, tmp_path):
    import shutil

    folder, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "params" / "blocks.wv")
    with pytest.raises(CheckpointError, match=r"missing tensor blocks\.wv"):
        checkpoint_io.load_params(str(copy))


def test_relative_folder_saves_and_loads(saved, tmp_path, monkeypatch):
    """`--out runs/x` is relative; orbax alone refuses relative checkpoint paths."""
    folder, expected = saved
    params, _ = checkpoint_io.load_params(str(folder))
    monkeypatch.chdir(tmp_path)
    checkpoint_io.save_params("runs/weights", params, CFG)
    assert (tmp_path / "runs" / "weights" / checkpoint_io.MODEL_CONFIG).exists()
    again, cfg = checkpoint_io.load_params("runs/weights")
    assert cfg == CFG
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_read_json_names_the_file_and_the_malformed_line(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text('{\n  "embed": 64,\n  oops\n}\n')
    with pytest.raises(CheckpointError, match=r"model_config\.json:3: malformed JSON"):
        checkpoint_io.read_json(path)
    with pytest.raises(CheckpointError, match=r"missing\.json: cannot read"):
        checkpoint_io.read_json(tmp_path / "missing.json")
    path.write_text('{"embed": 64}')
    assert checkpoint_io.read_json(path) == {"embed": 64}
