"""Readers, classes config and `prepare`: bad input -> counted skips; config errors fail before
any work; zero supervised tokens is an error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.data.config import data_defaults, resolve_classes, validate
from openchat_jax.data.prepare import load_dataset_info, prepare
from openchat_jax.data.template import PLAIN_CONDITION, Conversation, Message, build_example
from openchat_jax.data.tfds_builder import open_data_source
from openchat_jax.data.tokenizer import EOT_TOKEN, load_tokenizer
from openchat_jax.errors import ConfigError, DataError
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)


def sharegpt(*turns, **extra):
    roles = ["human", "gpt"]
    return {"conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)], **extra}


def data_config(tok_dir: Path, files, out: Path, **kw):
    d = data_defaults()
    d.files = [str(f) for f in files]
    d.tokenizer = str(tok_dir)
    d.dataset_dir = str(out)
    d.max_length = 256
    d.num_workers = 1
    for k, v in kw.items():
        d[k] = v
    return d


def write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    path.write_bytes(data)
    return path


# -- bad input corpus -----------------------------------------------------------------------------

BAD = [  # (record, expected kind or None for kept)
    (sharegpt("Hello", "four", source="Model: GPT-4"), None),
    ('{"conversations": [{"from": "human", "value": "x"},', "malformed_json"),
    (b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "ok"}]}', "not_utf8"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "missing_field"),
    ({"dialog": []}, "missing_field"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}, "unknown_role"),
    (sharegpt("Hello", "   "), "empty_message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles_not_alternating"),
    (sharegpt("Hello", "four", source="Model: Claude"), "unclaimed_label"),  # no default class
    (sharegpt("Hello"), "no_assistant_turn"),
    (sharegpt("Hello", f"two {EOT_TOKEN} four", source="Model: GPT-4"), None),  # handled as text
    ("[1, 2]", "not_object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "late"}]}, "misplaced_system"),
]


def test_bad_input_corpus_counted_skips(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    path = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD])
    cfg = data_config(tiny_tokenizer_dir, [path], tmp_path / "out", default_class="")
    report = prepare(cfg)
    expected_skips = [(line, kind) for line, (_, kind) in enumerate(BAD, start=1) if kind is not None]
    got = [(s["line"], s["kind"]) for s in report["skipped_records"]]
    assert got == expected_skips
    assert all(s["file"] == str(path) and s["reason"] for s in report["skipped_records"])
    assert report["input_records"] == len(BAD)
    assert report["examples"] + report["skipped"] == report["input_records"]
    assert report["examples"] == 2 and report["classes"]["gpt4"]["conversations"] == 2
    assert sum(report["skipped_by_kind"].values()) == report["skipped"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["skipped_records"] == report["skipped_records"]
    # the record with a literal <|end_of_turn|> in its text: only the template's own two EOT ids
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    src = open_data_source(tmp_path / "out")
    assert len(src) == 2
    assert list(src[1]["tokens"]).count(eot) == 2
    # every reason names the field / position
    reasons = {s["line"]: s["reason"] for s in report["skipped_records"]}
    assert "conversations[0]" in reasons[4] and "'value'" in reasons[4]
    assert "'conversations', 'messages', 'items'" in reasons[5]
    assert "'robot'" in reasons[6] and "messages[1]" in reasons[8] and "Model: Claude" in reasons[9]


def test_truncated_json_array_keeps_complete_records(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    recs = [sharegpt("Hello", "four"), sharegpt("What is two plus two?", "four", "Thank you", "welcome")]
    text = json.dumps(recs, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 30])  # cut inside the second record, like the ShareGPT export
    report = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out"))
    assert report["examples"] == 1 and report["skipped_by_kind"] == {"malformed_json": 1}
    second = text.index('"conversations"', text.index('"conversations"') + 1)
    assert report["skipped_records"][0]["line"] == text[:second].count("\n")  # the line of its "{"


def test_formats_system_labels_and_leading_assistant(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    records = [
        # ShareGPT with a system message and a leading assistant message to drop
        {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                           {"from": "gpt", "value": "dropped"}, {"from": "human", "value": "Hello"},
                           {"from": "gpt", "value": "four"}], "source": "Model: GPT-4"},
        # OpenAI with a system message, unlabeled -> default class gpt3
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "four"}]},
        # OpenChat: condition used as the label when the label field is absent ("gpt4" = class name)
        {"items": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "four"}],
         "condition": "gpt4", "system": "You are a helpful assistant."},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records[:2]))
    write_jsonl(tmp_path / "b.jsonl", records[2:])
    report = prepare(data_config(tiny_tokenizer_dir, [tmp_path / "*.json*"], tmp_path / "out"))
    assert report["examples"] == 3 and report["trimmed_leading_assistant"] == 1
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    cfg = validate(data_config(tiny_tokenizer_dir, [tmp_path / "a.json"], tmp_path / "x"))
    conv = Conversation((Message("user", "Hello"), Message("assistant", "four")), "You are a helpful assistant.")
    src = open_data_source(tmp_path / "out")
    for i, cls_id in enumerate([0, 1, 0]):
        want = build_example(tok, eot, conv, cfg.classes[cls_id], cls_id, 256)
        got = src[i]
        assert got["class_id"] == cls_id
        assert got["tokens"].tolist() == want.tokens.tolist()
        np.testing.assert_array_equal(got["weights"], want.weights)
    info = load_dataset_info(tmp_path / "out")
    assert info["eot_id"] == eot and info["vocab_size"] == len(tok) and info["num_examples"] == 3
    assert [c["name"] for c in info["classes"]] == ["gpt4", "gpt3"]
    assert [c["weight"] for c in info["classes"]] == [1.0, 0.1]
    assert info["inference_condition"] == "GPT4" and info["pad_id"] == 0 and info["max_length"] == 256
    assert sum(c["supervised_tokens"] for c in info["classes"]) == info["total_supervised_tokens"]
    lengths = np.load(tmp_path / "out" / "index.npz")["lengths"]
    assert lengths.tolist() == [len(src[i]["tokens"]) for i in range(3)]


def test_unconditioned_ablation_uses_plain_template(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four", source="Model: GPT-4"), sharegpt("Hello", "four")])
    prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out", conditioned=False))
    tok, eot = load_tokenizer(tiny_tokenizer_dir)
    src = open_data_source(tmp_path / "out")
    assert src[0]["tokens"].tolist() == src[1]["tokens"].tolist()  # same text, plain prefix for both
    assert src[0]["weights"].max() == 1.0 and src[1]["weights"].max() == pytest.approx(0.1)
    assert tok.convert_tokens_to_ids("▁User:") in src[0]["tokens"].tolist()
    assert tok.convert_tokens_to_ids("▁GPT4") not in src[0]["tokens"].tolist()
    info = load_dataset_info(tmp_path / "out")
    assert info["conditioned"] is False and info["inference_condition"] == PLAIN_CONDITION


def test_rewards_with_beta_normalised():
    classes, _ = resolve_classes([{"name": "a", "condition": "A", "reward": 2.0},
                                  {"name": "b", "condition": "B", "reward": 0.0},
                                  {"name": "c", "condition": "C", "reward": 1.0}], beta=0.5)
    assert [c.weight for c in classes] == pytest.approx([1.0, math.exp(-4.0), math.exp(-2.0)])
    paper, _ = resolve_classes(data_defaults().classes, 1.0)
    assert [(c.name, c.condition, c.weight) for c in paper] == [("gpt4", "GPT4", 1.0), ("gpt3", "GPT3", 0.1)]


@pytest.mark.parametrize("change, message", [
    ({"label_map": {"Model: GPT-4": "gpt5"}}, "no such class"),
    ({"classes": [{"name": "a", "condition": "A", "weight": 0.0}]}, "weight must be"),
    ({"classes": [{"name": "a", "condition": "A", "weight": -1.0}]}, "weight must be"),
    ({"classes": [{"name": "a", "condition": "A", "reward": 1.0}], "beta": 0.0}, "beta"),
    ({"classes": [{"name": "a", "condition": "A"}]}, "exactly one of"),
    ({"default_class": "gpt5"}, "default_class"),
    ({"files": ["/nonexistent/*.jsonl"]}, "matches no file"),
    ({"max_length": 1}, "max_length"),
])
def test_config_errors_fail_before_any_work(tiny_tokenizer_dir, tmp_path, change, message):  # noqa: F811
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four")])
    cfg = data_config(tiny_tokenizer_dir, [path], tmp_path / "out")
    for k, v in change.items():
        cfg[k] = v
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


def test_zero_supervised_tokens_is_an_error(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    # every conversation's answer lies beyond max_length -> no supervised token anywhere
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("What is two plus two? " * 5, "four")] * 3)
    with pytest.raises(DataError, match="no example with a supervised token"):
        prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out", max_length=8))
    assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_refuses_to_overwrite_foreign_folder(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        prepare(data_config(tiny_tokenizer_dir, [path], out))
    (out / "precious.txt").unlink()
    assert prepare(data_config(tiny_tokenizer_dir, [path], out))["examples"] == 1
    # a second run over our own output replaces it
    path2 = write_jsonl(tmp_path / "b.jsonl", [sharegpt("Hello", "four")] * 2)
    assert prepare(data_config(tiny_tokenizer_dir, [path2], out))["examples"] == 2
    assert len(open_data_source(out)) == 2


def test_parallel_workers_match_single_process(tiny_tokenizer_dir, tmp_path, monkeypatch):  # noqa: F811
    import openchat_jax.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK", 16)  # several tasks per worker
    rng = np.random.default_rng(0)
    words = "the sea is blue what two plus four thank you help".split()
    recs = [sharegpt(*(" ".join(rng.choice(words, int(rng.integers(1, 30)))) for _ in range(2 * int(rng.integers(1, 4)))),
                     source=str(rng.choice(["Model: GPT-4", "other"]))) for _ in range(80)]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    one = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "one", num_workers=1))
    two = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "two", num_workers=2))
    assert one["classes"] == two["classes"] and one["examples"] == 80
    a, b = open_data_source(tmp_path / "one"), open_data_source(tmp_path / "two")
    for i in range(80):
        assert a[i]["tokens"].tolist() == b[i]["tokens"].tolist() and a[i]["class_id"] == b[i]["class_id"]


def test_cli_prepare_with_overrides(tiny_tokenizer_dir, tmp_path, capsys):  # noqa: F811
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four", model="Model: GPT-4")])
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\nfrom openchat_jax.data.config import data_defaults\n"
        "def get_config():\n    return ml_collections.ConfigDict({'data': data_defaults()})\n")
    argv = ["prepare", "--config", str(cfg), f"--config.data.files=['{path}']",
            f"--config.data.tokenizer={tiny_tokenizer_dir}", f"--config.data.dataset_dir={tmp_path / 'out'}",
            "--config.data.label_field=model", "--config.data.num_workers=1"]
    assert cli_main(argv) == 0
    assert "prepared 1 examples from 1 records" in capsys.readouterr().out
    assert load_dataset_info(tmp_path / "out")["classes"][0]["conversations"] == 1
    assert cli_main(argv[:3] + ["--config.data.default_class=nope"]) == 2
    assert "default_class" in capsys.readouterr().err
