"""The typed run config: `resolve` turns a loaded ConfigDict into a RunConfig with the same values,
and every unknown key or bad value is one ConfigError naming the field (and the nearest known one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.config import apply_overrides, load_config, resolve
from openchat_jax.errors import ConfigError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.train.config import RunConfig, base_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_run_config_resolves_to_the_same_values(path):
    config = load_config(path)
    if "train" not in config:  # a data-only config (prepare)
        pytest.skip("not a run config")
    run = resolve(config, source=str(path))
    assert isinstance(run, RunConfig) and isinstance(run.model, LlamaConfig)
    plain = json.loads(json.dumps(config.to_dict()))
    assert json.loads(json.dumps(run.to_dict())) == plain
    assert run.train.global_batch_size == config.train.global_batch_size
    assert run.data.classes == tuple(config.data.classes.to_dict() if hasattr(config.data.classes, "to_dict")
                                     else config.data.classes)
    assert run.model.num_layers == config.model.num_layers and run.mesh.fsdp == config.mesh.fsdp
    assert resolve(run) is run


def test_typed_fields_are_converted_once():
    config = base_config("tiny")
    config.data.files = ["a.jsonl", "b.jsonl"]
    config.train.lr = "2e-5"
    run = resolve(apply_overrides(config, ["--config.train.warmup_ratio=0", "--config.data.conditioned=False"]))
    assert run.data.files == ("a.jsonl", "b.jsonl")
    assert run.train.warmup_ratio == 0.0 and isinstance(run.train.warmup_ratio, float)
    assert run.train.lr == "2e-5"  # kept as written: config.json compares it on resume
    assert run.train.conditioned is False and run.data.conditioned is False  # one field, two names
    with pytest.raises(Exception):
        run.train.lr = 1.0  # frozen


def _config_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text("from openchat_jax.train.config import base_config\n"
                    "def get_config():\n"
                    "    c = base_config('tiny')\n"
                    + "".join(f"    {line}\n" for line in lines) + "    return c\n")
    return path


@pytest.mark.parametrize("line, message", [
    ("c.lr = 1e-4", "no config field 'lr'; did you mean train.lr?"),
    ("c.seeds = 3", "no config field 'seeds'; did you mean seed?"),
    ("c.train.warmup_ration = 0.1", "no config field 'train.warmup_ration'; did you mean train.warmup_ratio?"),
    ("c.model.num_layer = 2", "no config field 'model.num_layer'; did you mean model.num_layers or model.scan_layers?"),
    ("c.mesh.fdsp = 2", "no config field 'mesh.fdsp'; did you mean mesh.fsdp?"),
    ("c.data.classes = [{'name': 'a', 'condition': 'A', 'wieght': 1.0}]",
     "data.classes[0]: unknown field 'wieght'; did you mean 'weight'?"),
])
def test_an_unknown_key_in_a_config_file_names_the_nearest_field(tmp_path, line, message):
    path = _config_file(tmp_path, line)
    with pytest.raises(ConfigError) as e:
        resolve(load_config(path), source=str(path))
    assert str(e.value) == f"{path}: {message}"


def test_an_unknown_key_in_an_override_names_the_nearest_field(tmp_path):
    path = _config_file(tmp_path)
    with pytest.raises(ConfigError, match=r"no config field 'train.warmup_ration'; did you mean train.warmup_ratio\?"):
        load_config(path, ["--config.train.warmup_ration=0.1"])
    with pytest.raises(ConfigError, match=r"no config field 'model.num_layer'; did you mean model.num_layers or model.scan_layers\?"):
        load_config(path, ["--config.model.num_layer=2"])


def test_the_cli_reports_an_unknown_key_in_one_line(tmp_path, capsys):
    path = _config_file(tmp_path, "c.checkpoint.save_evry = 10")
    assert cli_main(["plan", "--config", str(path), "--mesh", "fsdp=1", "--no-compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"openchat-jax plan: error: {path}: no config field 'checkpoint.save_evry'; did you mean checkpoint.save_every?"


@pytest.mark.parametrize("overrides, message", [
    (["--config.train.micro_batches=0"], "train.micro_batches=0 must be >= 1"),
    (["--config.train.global_batch_size=6", "--config.train.micro_batches=4"],
     "train.micro_batches=4 must divide train.global_batch_size=6"),
    (["--config.train.grad_clip=0"], "train.grad_clip=0.0 must be > 0"),
    (["--config.train.warmup_ratio=1.5"], r"train.warmup_ratio=1.5 must be in \[0, 1\]"),
    (["--config.train.loss_normalization=sequence"], r"train.loss_normalization = 'sequence': choose one of \['message', 'token'\]"),
    (["--config.train.lr=fast"], "train.lr='fast': expected 'auto' or a number"),
    (["--config.train.epochs=0"], r"train.epochs must be >= 1 \(or set train.num_steps > 0\)"),
    (["--config.data.max_length=1"], "data.max_length=1 must be >= 2"),
    (["--config.data.template=openchat_4"], "data.template = 'openchat_4': choose one of"),
    (["--config.data.eval_fraction=1.0"], r"data.eval_fraction=1.0 must be in \[0, 1\)"),
    (["--config.data.default_class=gpt5"], "data.default_class = 'gpt5': no such class"),
    (["--config.mesh.data=0"], "mesh.data=0 must be a positive int or -1"),
    (["--config.mesh.data=-1"], "only one mesh axis may be -1"),
    (["--config.checkpoint.save_every=-1"], "checkpoint.save_every=-1 must be >= 0"),
    (["--config.model.num_kv_heads=3"], "model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
])
def test_a_bad_value_is_one_error_naming_the_field(overrides, message):
    config = apply_overrides(base_config("tiny"), overrides)
    with pytest.raises(ConfigError, match=message):
        resolve(config)


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "skip_unsupervised_logits", "no", "train.skip_unsupervised_logits='no' must be True or False"),
    ("train", "loss_chunk_length", "128", "train.loss_chunk_length='128' must be an int"),
    ("train", "global_batch_size", True, "train.global_batch_size=True must be an int"),
    ("train", "b1", float("nan"), "train.b1=nan must be a finite number"),
    ("data", "files", "a.jsonl", None),  # one path is a list of one
    ("data", "files", 3, r"data.files=3 must be a list"),
    ("data", "label_field", "", "data.label_field='' must be a non-empty string"),
    ("model", "num_layers", 2.5, "model.num_layers=2.5 must be an int"),
])
def test_a_value_of_the_wrong_type_names_the_field(section, field, value, message):
    # Plain values (a hand-written dict, a config.json) are not type-checked by ConfigDict on the way in.
    values = base_config("tiny").to_dict()
    values[section][field] = value
    if message is None:
        assert resolve(values).data.files == ("a.jsonl",)
        return
    with pytest.raises(ConfigError, match=message):
        resolve(values)


def test_a_config_without_a_run_section_says_which():
    values = base_config("tiny").to_dict()
    del values["checkpoint"]
    with pytest.raises(ConfigError, match="the config has no 'checkpoint' section"):
        resolve(values)


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "num_steps", "x", "train.num_steps takes a value of type int, got 'x'"),
    ("model", None, "x", "model takes a value of type ConfigDict, got 'x'"),
])
def test_a_saved_config_json_with_a_wrong_type_names_the_file_and_field(tmp_path, section, field, value, message):
    values = json.loads(json.dumps(base_config("tiny").to_dict()))
    if field is None:
        values[section] = value
    else:
        values[section][field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=f"^{path}: {message}$"):
        load_config(path)
