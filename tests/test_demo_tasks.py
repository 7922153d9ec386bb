"""The demo's data generator, scorer and tokenizer, checked against independent string arithmetic."""

from __future__ import annotations

import json
import math
import re

import pytest

from openchat_jax.demo import tasks
from openchat_jax.demo.tasks import TaskSpec
from openchat_jax.demo.tokenizer import build_demo_tokenizer
from openchat_jax.errors import ConfigError, DataError

QUESTION_RE = re.compile(r"(\d+)\D+?(\d+)")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _operands(question: str) -> tuple[str, str]:
    m = QUESTION_RE.search(question)
    assert m, question
    return m.group(1), m.group(2)


def _sum_digits(x: str, y: str, final_carry: bool) -> str:
    """Schoolbook addition on digit strings, right to left; final_carry=False leaves out the carry
    out of the leftmost column (the column digits only)."""
    x, y = x.rjust(len(y), "0"), y.rjust(len(x), "0")
    out, c = [], 0
    for dx, dy in zip(reversed(x), reversed(y)):
        s = int(dx) + int(dy) + c
        out.append(str(s % 10))
        c = s // 10
    if c and final_carry:
        out.append(str(c))
    return "".join(reversed(out))


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    spec = TaskSpec(num_train=300, num_test=40, seed=3)
    assert spec.digits == 2
    a = tasks.generate(spec, tmp_path / "a")
    b = tasks.generate(spec, tmp_path / "b")
    c = tasks.generate(TaskSpec(num_train=300, num_test=40, seed=4), tmp_path / "c")
    for name in (tasks.TRAIN_FILE, tasks.TEST_PROMPTS_FILE, tasks.TEST_REFERENCES_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert a.counts == b.counts


def test_sources_answers_and_error_rates_match_the_spec(tmp_path):
    spec = TaskSpec(num_train=6000, num_test=50, expert_fraction=0.1, slip_rate=0.7, seed=0)
    data = tasks.generate(spec, tmp_path)
    rows = _read(data.train)
    assert len(rows) == 6000
    n_expert = sum(r["source"] == "expert" for r in rows)
    assert {r["source"] for r in rows} == {"expert", "suboptimal"}
    assert _binomial_ok(n_expert, 6000, 0.1)

    sub_carry = sub_carry_wrong = 0
    phrasings = set()
    for r in rows:
        user, asst = r["messages"]
        assert (user["role"], asst["role"]) == ("user", "assistant")
        x, y = _operands(user["content"])
        assert len(x) == len(y) == 2 and x[0] != "0" and y[0] != "0"
        phrasings.add(QUESTION_RE.sub("#", user["content"]))
        right, slipped = _sum_digits(x, y, final_carry=True), _sum_digits(x, y, final_carry=False)
        assert right == str(int(x) + int(y))
        if r["source"] == "expert":
            assert asst["content"] == right, r
        elif right == slipped:  # no final carry: the careless source is right too
            assert asst["content"] == right, r
        else:
            sub_carry += 1
            assert asst["content"] in (right, slipped), r  # wrong only in the one systematic way
            sub_carry_wrong += asst["content"] == slipped
    assert sub_carry > 2000  # about 60% of 2-digit sums reach 100
    assert _binomial_ok(sub_carry_wrong, sub_carry, 0.7)
    assert len(phrasings) == len(tasks.QUESTIONS)
    counts = data.counts
    assert counts["expert"]["conversations"] == n_expert and counts["expert"]["wrong"] == 0
    assert counts["suboptimal"]["wrong"] == sub_carry_wrong
    assert counts["suboptimal"]["final_carry"] == sub_carry


@pytest.mark.parametrize("slip_rate", [0.0, 1.0])
def test_slip_rate_extremes(tmp_path, slip_rate):
    data = tasks.generate(TaskSpec(num_train=500, num_test=10, slip_rate=slip_rate, seed=1), tmp_path)
    c = data.counts["suboptimal"]
    assert c["final_carry"] > 0
    assert c["wrong"] == (0 if slip_rate == 0.0 else c["final_carry"])


def test_test_split_is_held_out_and_readable(tmp_path):
    from openchat_jax.infer.prompts import read_prompts

    data = tasks.generate(TaskSpec(num_train=2000, num_test=300, seed=5), tmp_path)
    train_pairs = {frozenset(map(int, _operands(r["messages"][0]["content"]))) for r in _read(data.train)}
    prompts = read_prompts(data.test_prompts)  # the generate command's own reader
    refs = tasks.read_references(data.test_references)
    assert len(prompts) == len(refs) == 300
    test_pairs = set()
    for p in prompts:
        x, y = _operands(p.turns[0])
        assert len(x) == len(y) == 2
        assert frozenset((int(x), int(y))) not in train_pairs
        test_pairs.add(frozenset((int(x), int(y))))
        assert refs[p.id]["reference"] == str(int(x) + int(y))
        assert refs[p.id]["final_carry"] == (_sum_digits(x, y, True) != _sum_digits(x, y, False))
    assert len(test_pairs) == 300  # no repeated question either


def test_train_file_goes_through_the_data_readers(tmp_path):
    from openchat_jax.data.config import data_defaults, validate
    from openchat_jax.data.readers import read_conversations

    data = tasks.generate(TaskSpec(num_train=50, num_test=5, seed=2), tmp_path)
    cfg = data_defaults()
    cfg.files = [str(data.train)]
    cfg.classes = [{"name": "expert", "condition": "GPT4", "weight": 1.0},
                   {"name": "suboptimal", "condition": "GPT3", "weight": 0.1}]
    cfg.label_map = {}
    cfg.default_class = ""
    cfg.tokenizer, cfg.dataset_dir = "not-read-here", str(tmp_path / "unused")
    read = read_conversations(validate(cfg))
    assert read.skips == [] and len(read.conversations) == 50
    labels = [r["source"] for r in _read(data.train)]
    assert [["expert", "suboptimal"][i] for i in read.class_ids] == labels


def test_score_hand_case():
    refs = ["632"] * 6
    preds = ["632", " 632\n", "0632", "632.", "6 32", "522"]
    assert tasks.score(preds, refs) == pytest.approx(2 / 6)
    assert tasks.score(["1", "2"], [" 1", "3"]) == 0.5
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        tasks.score(["1", "2"], ["1"])


def test_score_files(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        '{"id": "t0", "reference": "132", "final_carry": true}\n'
        '{"id": "t1", "reference": "79", "final_carry": false}\n'
        '{"id": "t2", "reference": "105", "final_carry": true}\n'
    )
    out = tmp_path / "answers.jsonl"
    out.write_text(
        '{"id": "t2", "answers": ["105 "]}\n{"id": "t0", "answers": ["32"]}\n{"id": "t1", "answers": ["79"]}\n'
    )
    got = tasks.score_files(out, refs)
    assert got == {"exact_match": pytest.approx(2 / 3), "exact_match_final_carry": 0.5,
                   "exact_match_no_final_carry": 1.0}
    out.write_text('{"id": "t0", "answers": ["132"]}\n')
    with pytest.raises(DataError, match="no answer for 2 test question"):
        tasks.score_files(out, refs)
    out.write_text('{"id": "t0", "answers": ["132"]}\nnot json\n')
    with pytest.raises(DataError, match="answers.jsonl:2: malformed JSON"):
        tasks.score_files(out, refs)


def test_final_carry_hand_cases():
    assert tasks.drop_final_carry(78, 89, 2) == "67"
    assert tasks.drop_final_carry(47, 58, 2) == "05"
    assert tasks.drop_final_carry(347, 785, 3) == "132"
    assert tasks.has_final_carry(50, 50, 2) and not tasks.has_final_carry(50, 49, 2)


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="slip_rate"):
        TaskSpec(slip_rate=1.5)
    with pytest.raises(ConfigError, match="more digits"):
        TaskSpec(num_train=20000, digits=2)


def test_demo_tokenizer_digits_single_words_whole(tmp_path):
    from tokenizers import Tokenizer

    from openchat_jax.data.template import build_prompt
    from openchat_jax.data.tokenizer import load_tokenizer

    path = build_demo_tokenizer(tmp_path, ["GPT4", "GPT3", "User:", "Assistant:"] + tasks.vocabulary_words())
    tok, eot = load_tokenizer(path)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert eot == len(tok) - 1
    text = "What is the sum of 1090 and 98?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "▁What", "▁is", "▁the", "▁sum", "▁of", "▁", "1", "0", "9", "0", "▁and", "▁", "9", "8", "?"]
    # transformers' Llama class and the raw tokenizer.json agree, and decoding gives the text back
    assert ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "é"  # byte fallback, not dropped
    prompt = build_prompt(tok, eot, [{"role": "user", "content": "Add 12 and 9."}], condition="GPT4")
    assert tok.convert_ids_to_tokens(prompt) == [
        "<s>", "▁GPT4", "▁User:", "▁Add", "▁", "1", "2", "▁and", "▁", "9", ".", "<|end_of_turn|>",
        "▁GPT4", "▁Assistant:"]
    with pytest.raises(ConfigError, match="printable ASCII"):
        build_demo_tokenizer(tmp_path / "bad", ["two words"])
