"""Prompts files (chat and MT-bench formats, malformed lines), multi-turn feeding, conditions, the chat session, and
`openchat-jax generate` end to end on a tiny weights folder with the fixture tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.data.template import build_prompt
from openchat_jax.errors import ConfigError, DataError
from openchat_jax.infer.classes import choose_class, read_classes, resolve_condition
from openchat_jax.infer.generate import generate_tokens
from openchat_jax.infer.prompts import read_prompts
from tests.test_infer_fixtures import CLASSES, chat_ckpt, chat_model  # noqa: F401  (pytest fixtures)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)

N = 8  # max new tokens everywhere here, so the tests share compiled programs


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def ckpt(chat_ckpt):  # noqa: F811
    return chat_ckpt


@pytest.fixture
def model(chat_model):  # noqa: F811
    return chat_model


# ----------------------------------------------------------------------------- parsing


def test_reads_both_formats(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        "",
        {"question_id": 81, "turns": ["Write a poem.", "Make it shorter."], "category": "writing"},
        {"id": 3, "system": "S", "messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                              {"role": "user", "content": "C"}]},
    ])
    a, mt, c = read_prompts(path)
    assert (a.key, a.id, a.system, a.history, a.turns) == ("id", "a", "Be brief.", [], ["Hi"])
    assert (mt.key, mt.id, mt.system, mt.history, mt.turns) == ("question_id", 81, None, [],
                                                                 ["Write a poem.", "Make it shorter."])
    assert c.history == [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    assert c.turns == ["C"] and c.system == "S" and c.where.endswith("p.jsonl:4")


@pytest.mark.parametrize("bad, message", [
    ('{"id": 1, "messages": [', "malformed JSON"),
    ({"id": 1}, "expected 'messages'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "needs an 'id'"),
    ({"question_id": 1, "turns": []}, "non-empty list"),
    ({"question_id": 1, "turns": ["ok", 5]}, "turns[1]"),
    ({"id": 1, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"id": 1, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "end with a user message"),
    ({"id": 1, "messages": [{"role": "robot", "content": "a"}]}, "messages[0].role='robot'"),
    ({"id": 1, "messages": [{"role": "user", "content": "  "}]}, "is empty"),
    ({"id": 1, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}, "only come first"),
    ({"id": 0, "messages": [{"role": "user", "content": "dup"}]}, "repeats the record at"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    good = {"id": 0, "messages": [{"role": "user", "content": "Hello"}]}
    path = write_lines(tmp_path / "bad.jsonl", [good, good | {"id": "x"}, bad, good | {"id": "y"}])
    with pytest.raises(DataError) as e:
        read_prompts(path)
    assert f"bad.jsonl:3: " in str(e.value) and message in str(e.value)


def test_not_utf8_and_empty_file(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"id": 1, "messages": [{"role": "user", "content": "ok"}]}\n{"id": 2, "\xff"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: not UTF-8"):
        read_prompts(path)
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- classes


def test_condition_defaults_to_the_highest_weight(tmp_path):
    classes = read_classes(write_lines(tmp_path / "classes.json", [CLASSES]))
    assert choose_class(classes).name == "gpt4"
    assert choose_class(classes, "gpt3").condition == "GPT3"
    with pytest.raises(ConfigError, match="known classes"):
        choose_class(classes, "gpt5")
    info = tmp_path / "ds"
    info.mkdir()
    (info / "dataset_info.json").write_text(json.dumps({"classes": {"a": {"condition": "A", "weight": 0.5},
                                                                    "b": {"condition": "B", "weight": 2.0}}}))
    assert resolve_condition(tmp_path / "nowhere", classes_from=info).name == "b"
    # the layout `prepare` writes: a list with per-class statistics next to name/condition/weight
    (info / "dataset_info.json").write_text(json.dumps({"format": "x", "classes": [
        {"name": "gpt4", "condition": "GPT4", "weight": 1.0, "conversations": 3, "tokens": 99},
        {"name": "gpt3", "condition": "GPT3", "weight": 0.1, "conversations": 30, "tokens": 999}]}))
    assert resolve_condition(tmp_path / "nowhere", classes_from=info).condition == "GPT4"
    assert resolve_condition(tmp_path / "nowhere", class_name="gpt3", classes_from=info / "dataset_info.json").condition == "GPT3"
    assert resolve_condition(tmp_path / "nowhere", condition_text="GPT4").condition == "GPT4"
    with pytest.raises(ConfigError, match="--classes-from"):
        resolve_condition(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- generation


def test_multi_turn_feeds_answers_back_and_long_prompts(model, tmp_path):
    from openchat_jax.infer.prompts import run_prompts

    gpt4 = choose_class(read_classes(write_lines(tmp_path / "c.json", [CLASSES])))
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # > 128 tokens
    path = write_lines(tmp_path / "p.jsonl", [
        {"question_id": 7, "turns": ["What is two plus two?", "Thank you for the help."]},
        {"id": "long", "messages": [{"role": "user", "content": long_text}]},
    ])
    records = read_prompts(path)
    with pytest.raises(DataError, match=r"p.jsonl:2 \(turn 1\): the prompt has \d+ tokens and the context is 128"):
        run_prompts(model, records, gpt4, tmp_path / "out.jsonl", max_new_tokens=N, progress=False)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "c.json", tmp_path / "p.jsonl"]  # no empty or partial output

    summary = run_prompts(model, records, gpt4, tmp_path / "out.jsonl", max_new_tokens=N, truncate=True,
                          progress=False)
    mt, long = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["records"] == 2 and summary["answers"] == 3 and summary["truncated_prompts"] == 1
    assert mt["question_id"] == 7 and len(mt["answers"]) == 2 and mt["choices"][0]["turns"] == mt["answers"]
    assert long["id"] == "long" and long["prompt_tokens"] == [128 - N - 1 + 1]
    assert long["truncated_prompt_tokens"][0] > 0

    # Turn 2 is the answer to the history [turn 1, answer 1, turn 2], built by the training template.
    tok, eot = model.tokenizer, model.eot_id
    history = [{"role": "user", "content": "What is two plus two?"},
               {"role": "assistant", "content": mt["answers"][0]},
               {"role": "user", "content": "Thank you for the help."}]
    ids = build_prompt(tok, eot, history, "", "GPT4")
    assert mt["prompt_tokens"][1] == len(ids)
    (direct,) = generate_tokens(model.params, model.cfg, [ids], max_new_tokens=N, stop_ids=model.stop_ids)
    assert tok.decode(direct.tokens, skip_special_tokens=True) == mt["answers"][1]


def test_chat_session(model):
    from openchat_jax.infer.chat import ChatSession, chat_loop

    gpt3 = choose_class(read_classes_list(), "gpt3")
    session = ChatSession(model, gpt3, max_new_tokens=N)
    inputs = iter(["Hello", "/system Be brief.", "What is two plus two?", "/bogus", "Thanks", "/exit", "never"])
    out: list[str] = []
    assert chat_loop(session, read=lambda _: next(inputs), write=out.append) == 3
    assert session.system == "Be brief."
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert any("unknown command" in line for line in out)
    # the second answer after /system continues the conversation with the system message
    ids = build_prompt(model.tokenizer, model.eot_id, session.history[:3], "Be brief.", "GPT3")
    (direct,) = generate_tokens(model.params, model.cfg, [ids], max_new_tokens=N, stop_ids=model.stop_ids)
    assert model.tokenizer.decode(direct.tokens, skip_special_tokens=True) == session.history[3]["content"]


def read_classes_list():
    from openchat_jax.data.template import ConvClass

    return [ConvClass(**c) for c in CLASSES]


def test_generate_command_end_to_end(ckpt, model, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.jsonl", [
        {"id": "p1", "messages": [{"role": "user", "content": "Hello, how are you today?"}]},
        {"question_id": 2, "turns": ["What is the capital of France?"]},
        {"id": "p3", "system": "You are a helpful assistant.",
         "messages": [{"role": "user", "content": "Write a poem."}]},
    ])
    out = tmp_path / "answers.jsonl"
    rc = cli_main(["generate", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                   "--max-new-tokens", str(N), "--condition", "gpt3", "--no-progress", "--model-id", "tiny-13b"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("id", x.get("question_id")) for x in lines] == ["p1", 2, "p3"]
    assert {x["model_id"] for x in lines} == {"tiny-13b"}
    assert all(x["condition"] == "gpt3" and len(x["answers"]) == 1 and x["new_tokens"][0] <= N for x in lines)
    assert "wrote 3 lines" in capsys.readouterr().out
    # the command used the GPT3 prefix: same answer as generating from build_prompt directly
    ids = build_prompt(model.tokenizer, model.eot_id, [{"role": "user", "content": "Write a poem."}],
                       "You are a helpful assistant.", "GPT3")
    (direct,) = generate_tokens(model.params, model.cfg, [ids], max_new_tokens=N, stop_ids=model.stop_ids)
    assert lines[2]["answers"][0] == model.tokenizer.decode(direct.tokens, skip_special_tokens=True)
    assert lines[2]["prompt_tokens"] == [len(ids)]

    bad = write_lines(tmp_path / "bad.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "ok"}]}, "{oops"])
    rc = cli_main(["generate", "--ckpt", str(ckpt), "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert rc == 2 and "bad.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_model_id_defaults_to_the_runs_name():
    from openchat_jax.infer.prompts import default_model_id

    assert default_model_id("runs/13b-crlft/final") == "13b-crlft"
    assert default_model_id("runs/13b-crlft/final/") == "13b-crlft"
    assert default_model_id("gs://bucket/runs/13b/final") == "13b"
    assert default_model_id("weights/llama2-13b-jax") == "llama2-13b-jax"


def test_malformed_json_column_is_the_offending_character(tmp_path):
    good = {"id": 0, "messages": [{"role": "user", "content": "Hello"}]}
    bad = '  {"id": 1, "messages": [{"role": "user", "content": "héllo wörld"} }'
    path = write_lines(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        read_prompts(path)
    column = bad.rindex("}") + 1  # 1-based, in characters: the "}" where "," or "]" belongs
    assert f"bad.jsonl:2: malformed JSON: Expecting ',' delimiter (column {column})" in str(e.value)
    # A byte-order mark opening the file (Windows editors write one) is not a malformed line.
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n")
    assert read_prompts(tmp_path / "bom.jsonl")[0].id == 0
