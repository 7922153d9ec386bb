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
    d.allow_empty_classes = True  # most cases here fill one class; the empty-class checks set False
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
    with pytest.raises(ConfigError, match="refusing to overwrite"):  # --overwrite never deletes foreign files
        prepare(data_config(tiny_tokenizer_dir, [path], out), overwrite=True)
    (out / "precious.txt").unlink()
    assert prepare(data_config(tiny_tokenizer_dir, [path], out))["examples"] == 1
    # a second run over our own output is refused unless asked, and then replaces it
    path2 = write_jsonl(tmp_path / "b.jsonl", [sharegpt("Hello", "four")] * 2)
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare(data_config(tiny_tokenizer_dir, [path2], out))
    assert len(open_data_source(out)) == 1
    assert prepare(data_config(tiny_tokenizer_dir, [path2], out), overwrite=True)["examples"] == 2
    assert len(open_data_source(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders left


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
    path = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four", model="Model: GPT-4"),
                                              sharegpt("Hello", "four", model="Model: GPT-3.5")])
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\nfrom openchat_jax.data.config import data_defaults\n"
        "def get_config():\n    return ml_collections.ConfigDict({'data': data_defaults()})\n")
    argv = ["prepare", "--config", str(cfg), f"--config.data.files=['{path}']",
            f"--config.data.tokenizer={tiny_tokenizer_dir}", f"--config.data.dataset_dir={tmp_path / 'out'}",
            "--config.data.label_field=model", "--config.data.num_workers=1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "prepared 2 examples from 2 records" in out
    assert "Downloading and preparing" not in out and "Subsequent calls" not in out  # quiet unless --verbose
    assert "'Model: GPT-4'    gpt4   label_map" in out and "fell to default_class: 1 conversations" in out
    assert load_dataset_info(tmp_path / "out")["classes"][0]["conversations"] == 1
    assert cli_main(argv) == 2  # the folder now holds a dataset
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite", "--verbose"]) == 0
    assert "Downloading and preparing" in capsys.readouterr().out
    assert cli_main(argv[:3] + ["--config.data.default_class=nope"]) == 2
    assert "default_class" in capsys.readouterr().err


# -- labels, per-message weights, masking, empty classes ------------------------------------------

def openchat(condition, *turns, weights=None, **extra):
    roles = ["user", "assistant"]
    items = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    for item, w in zip(items, weights or []):
        if w is not None:
            item["weight"] = w
    return {"items": items, "condition": condition, **extra}


def test_openchat_condition_selects_the_class_by_its_condition(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """OpenChat's own records ("condition": "GPT4" / "GPT3") land in gpt4 / gpt3, not the default class."""
    recs = ([openchat("GPT4", "Hello", "four", weights=[0.0, 1.0])] * 8
            + [openchat("GPT3", "Hello", "four", weights=[0.0, 0.1])] * 16)
    path = write_jsonl(tmp_path / "oc.jsonl", recs)
    report = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out", allow_empty_classes=False))
    assert report["classes"]["gpt4"]["conversations"] == 8 and report["classes"]["gpt3"]["conversations"] == 16
    assert report["labels"] == [
        {"label": "GPT3", "class": "gpt3", "matched_by": "condition", "conversations": 16},
        {"label": "GPT4", "class": "gpt4", "matched_by": "condition", "conversations": 8}]
    assert report["default_class_conversations"] == 0 and report["messages_with_weight_field"] == 48
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["labels"] == report["labels"]
    src = open_data_source(tmp_path / "out")
    assert [int(src[i]["class_id"]) for i in range(24)] == [0] * 8 + [1] * 16
    assert src[0]["weights"].max() == 1.0 and src[8]["weights"].max() == pytest.approx(0.1)


def test_label_table_counts_default_class(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    recs = [sharegpt("Hello", "four", source="Model: GPT-4"), sharegpt("Hello", "four", source="gpt4"),
            sharegpt("Hello", "four", source="Model: Claude"), sharegpt("Hello", "four")]
    report = prepare(data_config(tiny_tokenizer_dir, [write_jsonl(tmp_path / "a.jsonl", recs)], tmp_path / "out"))
    by_label = {r["label"]: (r["class"], r["matched_by"], r["conversations"]) for r in report["labels"]}
    assert by_label == {"Model: GPT-4": ("gpt4", "label_map", 1), "gpt4": ("gpt4", "name", 1),
                        "Model: Claude": ("gpt3", "default_class", 1), None: ("gpt3", "default_class", 1)}
    assert report["default_class_conversations"] == 2
    from openchat_jax.data.prepare import format_label_table

    table = format_label_table(report, "source")
    assert "(no label field 'source')  gpt3   default_class  1" in table
    assert table.endswith("fell to default_class: 2 conversations")


@pytest.mark.parametrize("change", [
    {"label_map": {"GPT4": "gpt3"}},  # a class's condition mapped to another class
    {"classes": [{"name": "gpt4", "condition": "GPT4", "weight": 1.0},
                 {"name": "GPT4", "condition": "X", "weight": 0.1}], "default_class": "gpt4"},
])
def test_a_label_selecting_two_classes_is_a_config_error(tiny_tokenizer_dir, tmp_path, change):  # noqa: F811
    cfg = data_config(tiny_tokenizer_dir, [write_jsonl(tmp_path / "a.jsonl", [sharegpt("a", "b")])], tmp_path / "out")
    for k, v in change.items():
        cfg[k] = v
    with pytest.raises(ConfigError, match="'GPT4' is ambiguous"):
        validate(cfg)


def test_per_message_weights_and_system_message(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """A message's "weight" is its tokens' and its <|end_of_turn|>'s weight as given (not times
    the class weight; 0 = unsupervised, a user message may be supervised); messages without one
    get the template's default. "system_message" is the system text."""
    from tokenizers import Tokenizer

    turns = ["Hello", "four", "What is two plus two?", "The sea is blue", "Thank you", "welcome"]
    rec = openchat("GPT3", *turns, weights=[0.25, 0.0, None, 0.5, 0.0, None], system_message="Be brief.")
    path = write_jsonl(tmp_path / "oc.jsonl", [rec])
    report = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out"))
    assert report["messages_with_weight_field"] == 4
    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    enc = lambda text: raw.encode(text, add_special_tokens=False).ids  # noqa: E731
    _, eot = load_tokenizer(tiny_tokenizer_dir)
    tokens, weights = [raw.token_to_id("<s>")], [0.0]
    tokens += enc("Be brief.") + [eot]
    weights += [0.0] * (len(enc("Be brief.")) + 1)
    for k, (text, w) in enumerate(zip(turns, [0.25, 0.0, 0.0, 0.5, 0.0, 0.1])):  # gpt3's weight 0.1 on the last
        prefix = enc("GPT3 User:" if k % 2 == 0 else "GPT3 Assistant:")
        tokens += prefix + enc(text) + [eot]
        weights += [0.0] * len(prefix) + [w] * (len(enc(text)) + 1)
    got = open_data_source(tmp_path / "out")[0]
    assert got["tokens"].tolist() == tokens
    np.testing.assert_allclose(got["weights"], weights, rtol=0, atol=1e-7)


@pytest.mark.parametrize("weight", [-1, "1", True, float("nan")])
def test_bad_message_weight_is_a_counted_skip(tiny_tokenizer_dir, tmp_path, weight):  # noqa: F811
    recs = [openchat("GPT4", "Hello", "four"), {"items": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b", "weight": weight}]}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    report = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out"))
    assert report["skipped_by_kind"] == {"bad_weight": 1}
    assert "items[1]: field 'weight'" in report["skipped_records"][0]["reason"]


def test_mask_phrases_zero_the_reply_and_are_counted(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("as an AI\n\n  I cannot  \n")
    recs = [sharegpt("Hello", "As an ai model I like the sea", "Thank you", "welcome", source="gpt4"),
            sharegpt("Hello", "Sorry, I CANNOT help", source="gpt4"),  # its only reply is masked: dropped
            sharegpt("Hello", "four", source="gpt3")]
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    report = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out", mask_phrases_file=str(phrases)))
    assert report["masked_replies"] == 2 and report["masked_by_phrase"] == {"as an ai": 1, "i cannot": 1}
    assert report["examples"] == 2 and report["skipped_by_kind"] == {"no_supervised_token": 1}
    assert "'i cannot'" in report["skipped_records"][0]["reason"]
    src = open_data_source(tmp_path / "out")
    unmasked = prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "plain"))
    assert unmasked["masked_replies"] == 0 and unmasked["examples"] == 3
    plain = open_data_source(tmp_path / "plain")
    assert src[0]["tokens"].tolist() == plain[0]["tokens"].tolist()
    w, w_plain = src[0]["weights"], plain[0]["weights"]
    masked_n = int((w_plain > 0).sum() - (w > 0).sum())
    tok, _ = load_tokenizer(tiny_tokenizer_dir)
    assert masked_n == len(tok("As an ai model I like the sea", add_special_tokens=False)["input_ids"]) + 1
    assert w[-1] == 1.0  # the second reply keeps its weight
    with pytest.raises(ConfigError, match="mask_phrases_file"):
        validate(data_config(tiny_tokenizer_dir, [path], tmp_path / "x", mask_phrases_file=str(tmp_path / "none.txt")))


def test_empty_class_is_an_error_unless_allowed(tiny_tokenizer_dir, tmp_path, caplog):  # noqa: F811
    """Records labelled in "source" under a config that reads "model": all fall to gpt3."""
    recs = [sharegpt("Hello", "four", source="gpt4")] * 3
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    cfg = data_config(tiny_tokenizer_dir, [path], tmp_path / "out", label_field="model", allow_empty_classes=False)
    with pytest.raises(DataError, match=r"class 'gpt4' \(condition 'GPT4'\) received no conversation.*'model'.*"
                                        r"allow_empty_classes=True"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()
    cfg.allow_empty_classes = True
    with caplog.at_level("WARNING"):
        report = prepare(cfg)
    assert "class 'gpt4'" in caplog.text and report["empty_classes"] == ["gpt4"]
    info = load_dataset_info(tmp_path / "out")
    assert info["inference_condition"] == "GPT3" and info["inference_class"] == "gpt3"  # never an untrained prefix
    assert report["inference_condition"] == "GPT3"


def test_roles_any_case_and_unknown_role_names_role_map(tiny_tokenizer_dir, tmp_path):  # noqa: F811
    recs = [{"conversations": [{"from": "Human", "value": "Hello"}, {"from": "GPT", "value": "four"}]},
            {"messages": [{"role": "USER", "content": "Hello"}, {"role": "Assistant", "content": "four"}]},
            {"conversations": [{"from": "Human", "value": "Hello"}, {"from": "Robot", "value": "four"}]}]
    report = prepare(data_config(tiny_tokenizer_dir, [write_jsonl(tmp_path / "a.jsonl", recs)], tmp_path / "out"))
    assert report["examples"] == 2 and report["skipped_by_kind"] == {"unknown_role": 1}
    reason = report["skipped_records"][0]["reason"]
    assert "'Robot'" in reason and "data.role_map" in reason
    # every record unknown: the error itself names the role and data.role_map, and leaves nothing
    path = write_jsonl(tmp_path / "b.jsonl", [recs[2]] * 3)
    with pytest.raises(DataError, match=r"unknown_role: 3 .*'Robot'.*data\.role_map"):
        prepare(data_config(tiny_tokenizer_dir, [path], tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
    cfg = data_config(tiny_tokenizer_dir, [path], tmp_path / "x", role_map={"human": "user", "Bot": "user", "BOT": "assistant"})
    with pytest.raises(ConfigError, match="case-insensitively"):
        validate(cfg)


def test_failures_leave_nothing_behind(tiny_tokenizer_dir, tmp_path, monkeypatch):  # noqa: F811
    import openchat_jax.data.prepare as prep

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "new" / "dataset"
    with pytest.raises(DataError, match="no records"):
        prepare(data_config(tiny_tokenizer_dir, [empty], out))
    assert not (tmp_path / "new").exists()  # nor the parent folder it made
    good = write_jsonl(tmp_path / "a.jsonl", [sharegpt("Hello", "four")] * 2)
    out = tmp_path / "out"
    assert prepare(data_config(tiny_tokenizer_dir, [good], out))["examples"] == 2

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer crashed")
        yield

    monkeypatch.setattr(prep, "_tokenized", broken)
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        prepare(data_config(tiny_tokenizer_dir, [good], out), overwrite=True)
    assert len(open_data_source(out)) == 2  # the dataset already there is untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
