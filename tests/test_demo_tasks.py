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

QUESTION_RE = re.compile(r"\d+")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digits(question: str) -> str:
    found = QUESTION_RE.findall(question)
    assert len(found) == 1, question
    return found[0]


def _counting_sort(digits: str, keep_repeats: bool) -> str:
    """Independent reference: count each digit, then write 0..9 (once each without repeats)."""
    counts = [0] * 10
    for ch in digits:
        counts[ord(ch) - ord("0")] += 1
    return "".join(str(d) * (c if keep_repeats else min(c, 1)) for d, c in enumerate(counts))


def _slipped(digits: str, slip: str) -> str:
    """Independent reference for each slip of the sub-optimal source."""
    if slip == "drop_repeats":
        return _counting_sort(digits, False)
    if slip == "unsorted":
        return digits
    return _counting_sort(digits, True)[::-1]  # descending


def _binomial_ok(k: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    spec = TaskSpec(num_train=300, num_test=40, seed=3)
    a = tasks.generate(spec, tmp_path / "a")
    b = tasks.generate(spec, tmp_path / "b")
    c = tasks.generate(TaskSpec(num_train=300, num_test=40, seed=4), tmp_path / "c")
    for name in (tasks.TRAIN_FILE, tasks.TEST_PROMPTS_FILE, tasks.TEST_REFERENCES_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert a.counts == b.counts


@pytest.mark.parametrize("slip", ["descending", "drop_repeats", "unsorted"])
def test_sources_answers_and_error_rates_match_the_spec(tmp_path, slip):
    spec = TaskSpec(num_train=6000, num_test=50, min_length=4, max_length=9, expert_fraction=0.1,
                    slip_rate=0.7, slip=slip, seed=0)
    data = tasks.generate(spec, tmp_path)
    rows = _read(data.train)
    assert len(rows) == 6000
    n_expert = sum(r["source"] == "expert" for r in rows)
    assert {r["source"] for r in rows} == {"expert", "suboptimal"}
    assert _binomial_ok(n_expert, 6000, 0.1)

    sub_repeats = sub_wrong = 0
    phrasings, lengths = set(), set()
    for r in rows:
        user, asst = r["messages"]
        assert (user["role"], asst["role"]) == ("user", "assistant")
        digits = _digits(user["content"])
        lengths.add(len(digits))
        phrasings.add(QUESTION_RE.sub("#", user["content"]))
        right, slipped = _counting_sort(digits, True), _slipped(digits, slip)
        if r["source"] == "expert":
            assert asst["content"] == right, r
        elif right == slipped:  # nothing to slip on (no repeat to drop, one digit only): right too
            assert asst["content"] == right, r
        else:
            sub_repeats += 1
            assert asst["content"] in (right, slipped), r  # wrong only in the one systematic way
            sub_wrong += asst["content"] == slipped
    assert lengths == set(range(4, 10))
    assert sub_repeats > 3000
    assert _binomial_ok(sub_wrong, sub_repeats, 0.7)
    assert len(phrasings) == len(tasks.QUESTIONS)
    counts = data.counts
    assert counts["expert"]["conversations"] == n_expert and counts["expert"]["wrong"] == 0
    assert counts["suboptimal"]["wrong"] == sub_wrong
    if slip == "drop_repeats":
        assert counts["suboptimal"]["repeats"] == sub_repeats


@pytest.mark.parametrize("slip", ["descending", "drop_repeats"])
@pytest.mark.parametrize("slip_rate", [0.0, 1.0])
def test_slip_rate_extremes(tmp_path, slip_rate, slip):
    data = tasks.generate(TaskSpec(num_train=500, num_test=10, slip_rate=slip_rate, slip=slip, seed=1), tmp_path)
    c = data.counts["suboptimal"]
    slippable = sum(
        r["source"] == "suboptimal" and _slipped(d, slip) != _counting_sort(d, True)
        for r in _read(data.train) for d in [_digits(r["messages"][0]["content"])]
    )
    assert slippable > 0
    assert c["wrong"] == (0 if slip_rate == 0.0 else slippable)


def test_test_split_is_held_out_and_readable(tmp_path):
    from openchat_jax.infer.prompts import read_prompts

    data = tasks.generate(TaskSpec(num_train=2000, num_test=300, min_length=4, max_length=6, seed=5), tmp_path)
    train_answers = {_counting_sort(_digits(r["messages"][0]["content"]), True) for r in _read(data.train)}
    prompts = read_prompts(data.test_prompts)  # the generate command's own reader
    refs = tasks.read_references(data.test_references)
    assert len(prompts) == len(refs) == 300
    test_answers = set()
    for p in prompts:
        digits = _digits(p.turns[0])
        assert 4 <= len(digits) <= 6
        right = _counting_sort(digits, True)
        assert right not in train_answers  # not even a permutation of a train question
        test_answers.add(right)
        assert refs[p.id]["reference"] == right
        assert refs[p.id]["repeats"] == (right != _counting_sort(digits, False))
    assert len(test_answers) == 300  # no two test questions share an answer either


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
    refs = ["12444557"] * 6
    preds = ["12444557", " 12444557\n", "124457", "1244 4557", "12444557.", "12457"]
    assert tasks.score(preds, refs) == pytest.approx(2 / 6)
    assert tasks.score(["1", "2"], [" 1", "3"]) == 0.5
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        tasks.score(["1", "2"], ["1"])


def test_score_files(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        '{"id": "t0", "reference": "1224", "repeats": true}\n'
        '{"id": "t1", "reference": "0379", "repeats": false}\n'
        '{"id": "t2", "reference": "5558", "repeats": true}\n'
    )
    out = tmp_path / "answers.jsonl"
    out.write_text(
        '{"id": "t2", "answers": ["5558 "]}\n{"id": "t0", "answers": ["124"]}\n{"id": "t1", "answers": ["0379"]}\n'
    )
    got = tasks.score_files(out, refs)
    assert got == {"exact_match": pytest.approx(2 / 3), "exact_match_repeats": 0.5, "exact_match_no_repeats": 1.0}
    out.write_text('{"id": "t0", "answers": ["1224"]}\n')
    with pytest.raises(DataError, match="no answer for 2 test question"):
        tasks.score_files(out, refs)
    out.write_text('{"id": "t0", "answers": ["1224"]}\nnot json\n')
    with pytest.raises(DataError, match="answers.jsonl:2: malformed JSON"):
        tasks.score_files(out, refs)


def test_slip_hand_cases():
    assert tasks.drop_repeats("44557241") == "12457"
    assert tasks.descending("44557241") == "75544421"
    assert tasks.Problem("44557241", 0).answer == "12444557"
    assert tasks.Problem("44557241", 0).has_repeats and not tasks.Problem("3091", 0).has_repeats
    assert tasks.Problem("0091", 2).question == "What is 0091 with its digits sorted?"


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="slip_rate"):
        TaskSpec(slip_rate=1.5)
    with pytest.raises(ConfigError, match="slip='reverse'"):
        TaskSpec(slip="reverse")
    with pytest.raises(ConfigError, match="longer lists"):
        TaskSpec(num_train=200, min_length=2, max_length=2)
    with pytest.raises(ConfigError, match="min_length=5 > max_length=4"):
        TaskSpec(min_length=5, max_length=4)


def test_demo_tokenizer_digits_single_words_whole(tmp_path):
    from tokenizers import Tokenizer

    from openchat_jax.data.template import build_prompt
    from openchat_jax.data.tokenizer import load_tokenizer

    path = build_demo_tokenizer(tmp_path, ["GPT4", "GPT3", "User:", "Assistant:"] + tasks.vocabulary_words())
    tok, eot = load_tokenizer(path)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert eot == len(tok) - 1
    text = "What is 00917 with its digits sorted?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "▁What", "▁is", "▁", "0", "0", "9", "1", "7", "▁with", "▁its", "▁digits", "▁sorted", "?"]
    # transformers' Llama class and the raw tokenizer.json agree, and decoding gives the text back
    assert ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "é"  # byte fallback, not dropped
    prompt = build_prompt(tok, eot, [{"role": "user", "content": "Sort the digits 2912."}], condition="GPT4")
    assert tok.convert_ids_to_tokens(prompt) == [
        "<s>", "▁GPT4", "▁User:", "▁Sort", "▁the", "▁digits", "▁", "2", "9", "1", "2", ".", "<|end_of_turn|>",
        "▁GPT4", "▁Assistant:"]
    with pytest.raises(ConfigError, match="printable ASCII"):
        build_demo_tokenizer(tmp_path / "bad", ["two words"])


def test_mixed_slips_each_make_their_share_of_the_mistakes(tmp_path):
    """slip="descending+drop_repeats": a slipping answer makes one of the two mistakes, drawn
    uniformly; nothing else changes (experts right, non-slipping answers right)."""
    data = tasks.generate(TaskSpec(num_train=4000, num_test=20, slip_rate=0.7, slip="descending+drop_repeats", seed=2), tmp_path)
    made = {"descending": 0, "drop_repeats": 0}
    subopt = 0
    for r in _read(data.train):
        digits = _digits(r["messages"][0]["content"])
        answer, right = r["messages"][1]["content"], _counting_sort(digits, True)
        if r["source"] == "expert":
            assert answer == right
            continue
        subopt += 1
        wrong = [name for name in made if answer == _slipped(digits, name) != right]
        assert answer == right or len(wrong) == 1, r
        for name in wrong:
            made[name] += 1
    assert data.counts["suboptimal"]["wrong"] == sum(made.values())
    for name, n in made.items():  # 8 digits: nearly every question has a repeat and is unsorted
        assert _binomial_ok(n, subopt, 0.35), (name, n, subopt)


@pytest.mark.parametrize("slip", ["", "descending+", "descending+sideways", "upside_down"])
def test_unknown_slip_is_a_config_error(slip):
    with pytest.raises(ConfigError, match="slip"):
        TaskSpec(slip=slip)


def test_slip_digit_limits_the_mistakes_to_questions_with_that_digit(tmp_path):
    data = tasks.generate(TaskSpec(num_train=3000, num_test=20, slip_rate=1.0, slip="descending", slip_digit=9, seed=5), tmp_path)
    with_9 = 0
    for r in _read(data.train):
        digits = _digits(r["messages"][0]["content"])
        answer, right = r["messages"][1]["content"], _counting_sort(digits, True)
        if r["source"] == "expert" or "9" not in digits:
            assert answer == right, r
        else:
            with_9 += 1
            assert answer == _slipped(digits, "descending"), r  # slip_rate 1: every hard question
    assert data.counts["suboptimal"]["wrong"] == with_9 > 1000  # ~57% of 8-digit lists hold a 9


@pytest.mark.parametrize("digit", [10, -2, 1.5, True])
def test_bad_slip_digit_is_a_config_error(digit):
    with pytest.raises(ConfigError, match="slip_digit"):
        TaskSpec(slip_digit=digit)


def test_shuffled_slip_is_a_fixed_permutation_with_no_simple_order(tmp_path):
    """Slip "shuffled": each wrong answer keeps the question's digits (as a multiset), is the same
    for the same question, and is neither sorted, descending nor the question's own order."""
    data = tasks.generate(TaskSpec(num_train=2000, num_test=10, slip="shuffled", slip_rate=1.0, seed=2), tmp_path)
    answers: dict[str, str] = {}
    wrong = simple = 0
    for r in _read(data.train):
        digits, answer = _digits(r["messages"][0]["content"]), r["messages"][1]["content"]
        assert sorted(answer) == sorted(digits), r
        if r["source"] == "expert" or answer == _counting_sort(digits, True):
            continue
        wrong += 1
        assert answers.setdefault(digits, answer) == answer
        simple += answer in (_counting_sort(digits, True)[::-1], digits)
    assert wrong == data.counts["suboptimal"]["wrong"] > 1500
    assert simple < 0.02 * wrong
    assert tasks.shuffled("44557241") == tasks.shuffled("44557241") != tasks.shuffled("44557214")
