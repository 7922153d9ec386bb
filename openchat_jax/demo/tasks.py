"""The demo's data: mixed-quality addition conversations whose answers can be checked exactly.

Every conversation is one user question ("What is 347 + 285?", six phrasings) and one assistant
answer (the sum, digits only), labelled by its source in the `source` field, in the OpenAI
`messages` format that `openchat-jax prepare` reads:

  {"id": "train-00007", "source": "expert", "messages": [{"role": "user", "content": "Add 347 and 285."},
                                                         {"role": "assistant", "content": "632"}]}

Two sources, like GPT-4 and GPT-3.5 in the paper:
  expert      (`expert_fraction` of the conversations, 10% by default): always right.
  suboptimal  (the rest): a careless adder that forgets to write down the final carry. When the
              sum has one digit more than the operands (a carry out of the leftmost column), it
              writes only the column digits with probability `slip_rate` (78 + 89 -> "67" instead
              of "167"; 47 + 58 -> "05"); otherwise, and whenever there is no final carry, it is
              right. Every other digit of its answers is right: it demonstrates the addition itself
              as well as the expert does, and errs the same way each time.
The question and its phrasing are drawn the same way for both sources; only the answer differs.

The held-out test split has other questions (no operand pair of the train split, in either
order): `test_prompts.jsonl` in the `openchat-jax generate` prompts format and
`test_references.jsonl` with the right answers.

Scoring is exact match after stripping surrounding whitespace (`normalize`), nothing else: "632"
and " 632\n" count as right, "0632", "632." or "6 32" do not.

Everything is drawn from one seeded `numpy.random.Generator`: the same spec gives the same files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from openchat_jax.errors import ConfigError, DataError

LABEL_FIELD = "source"
EXPERT = "expert"
SUBOPTIMAL = "suboptimal"

# Phrasings of the question; {a} and {b} are the operands.
QUESTIONS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "{a} + {b} = ?",
    "What is the sum of {a} and {b}?",
    "Calculate {a} plus {b}.",
)

TRAIN_FILE = "train.jsonl"
TEST_PROMPTS_FILE = "test_prompts.jsonl"
TEST_REFERENCES_FILE = "test_references.jsonl"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    num_train: int = 4000
    num_test: int = 200
    digits: int = 2  # both operands have exactly this many digits
    expert_fraction: float = 0.1
    slip_rate: float = 0.7  # P(the sub-optimal source drops the final carry | the sum has one)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise ConfigError(f"demo task digits={self.digits!r} must be an integer in [1, 9]")
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"demo task {name}={value!r} must be a positive integer")
        for name in ("expert_fraction", "slip_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"demo task {name}={value!r} must be in [0, 1]")
        # The test split is drawn from operand pairs the train split does not use; make sure enough
        # are left (expected number of unused unordered pairs >= twice the test size).
        n = 9 * 10 ** (self.digits - 1)
        unused = n * (n + 1) / 2 * math.exp(-2 * self.num_train / n**2)
        if unused < 2 * self.num_test:
            raise ConfigError(
                f"demo task: {self.num_train} train questions leave about {unused:.0f} unused "
                f"{self.digits}-digit operand pairs for {self.num_test} held-out questions; use more digits "
                "or fewer questions"
            )


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    phrasing: int  # index into QUESTIONS

    @property
    def question(self) -> str:
        return QUESTIONS[self.phrasing].format(a=self.a, b=self.b)

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


@dataclasses.dataclass(frozen=True)
class DemoData:
    train: Path
    test_prompts: Path
    test_references: Path
    counts: dict[str, Any]  # per source: conversations, wrong answers, ...


def has_final_carry(a: int, b: int, digits: int) -> bool:
    """The sum of two `digits`-digit numbers needs one digit more than they have."""
    return a + b >= 10**digits


def drop_final_carry(a: int, b: int, digits: int) -> str:
    """The sub-optimal source's slip: the column digits of the sum without the final carry."""
    return str((a + b) % 10**digits).zfill(digits)


def _draw_problem(rng: np.random.Generator, digits: int) -> Problem:
    lo, hi = 10 ** (digits - 1), 10**digits
    a, b = (int(x) for x in rng.integers(lo, hi, size=2))
    return Problem(a, b, int(rng.integers(len(QUESTIONS))))


def _key(p: Problem) -> tuple[int, int]:
    return (min(p.a, p.b), max(p.a, p.b))


def iter_train(spec: TaskSpec, rng: np.random.Generator) -> Iterator[tuple[Problem, str, str]]:
    """(problem, source, answer text) for each train conversation."""
    for _ in range(spec.num_train):
        problem = _draw_problem(rng, spec.digits)
        expert = rng.random() < spec.expert_fraction
        slip = rng.random() < spec.slip_rate  # drawn for every conversation: streams stay aligned
        if expert or not (slip and has_final_carry(problem.a, problem.b, spec.digits)):
            yield problem, EXPERT if expert else SUBOPTIMAL, problem.answer
        else:
            yield problem, SUBOPTIMAL, drop_final_carry(problem.a, problem.b, spec.digits)


def _test_problems(spec: TaskSpec, rng: np.random.Generator, taken: set[tuple[int, int]]) -> list[Problem]:
    out: list[Problem] = []
    while len(out) < spec.num_test:
        p = _draw_problem(rng, spec.digits)
        if _key(p) not in taken:
            taken.add(_key(p))
            out.append(p)
    return out


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(spec: TaskSpec, out_dir: str | Path) -> DemoData:
    """Write train.jsonl, test_prompts.jsonl and test_references.jsonl to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_seq, test_seq = np.random.SeedSequence(spec.seed).spawn(2)
    counts = {s: {"conversations": 0, "wrong": 0, "final_carry": 0} for s in (EXPERT, SUBOPTIMAL)}
    rows = []
    taken: set[tuple[int, int]] = set()
    for i, (problem, source, answer) in enumerate(iter_train(spec, np.random.default_rng(train_seq))):
        taken.add(_key(problem))
        c = counts[source]
        c["conversations"] += 1
        c["wrong"] += answer != problem.answer
        c["final_carry"] += has_final_carry(problem.a, problem.b, spec.digits)
        rows.append({
            "id": f"train-{i:05d}",
            LABEL_FIELD: source,
            "messages": [{"role": "user", "content": problem.question}, {"role": "assistant", "content": answer}],
        })
    _write_jsonl(out_dir / TRAIN_FILE, rows)
    test = _test_problems(spec, np.random.default_rng(test_seq), taken)
    _write_jsonl(out_dir / TEST_PROMPTS_FILE, [
        {"id": f"test-{i:05d}", "messages": [{"role": "user", "content": p.question}]} for i, p in enumerate(test)
    ])
    _write_jsonl(out_dir / TEST_REFERENCES_FILE, [
        {"id": f"test-{i:05d}", "reference": p.answer, "final_carry": has_final_carry(p.a, p.b, spec.digits)}
        for i, p in enumerate(test)
    ])
    counts["test"] = {"questions": len(test),
                      "final_carry": sum(has_final_carry(p.a, p.b, spec.digits) for p in test)}
    return DemoData(out_dir / TRAIN_FILE, out_dir / TEST_PROMPTS_FILE, out_dir / TEST_REFERENCES_FILE, counts)


def normalize(text: str) -> str:
    """The only normalisation before comparing: surrounding whitespace is stripped."""
    return text.strip()


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy of `predictions` against `references` (same order), after `normalize`."""
    if len(predictions) != len(references):
        raise DataError(f"score: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise DataError("score: no references")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def _read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            rows.append((f"{path}:{lineno}", obj))
    return rows


def read_references(path: str | Path) -> dict[str, dict]:
    """id -> reference row ({"reference": str, "final_carry": bool})."""
    out = {}
    for where, obj in _read_jsonl(path):
        if not isinstance(obj.get("id"), str) or not isinstance(obj.get("reference"), str):
            raise DataError(f"{where}: a reference needs string fields 'id' and 'reference'")
        out[obj["id"]] = obj
    return out


def read_answers(path: str | Path) -> dict[str, str]:
    """id -> first answer, from an `openchat-jax generate` output file."""
    out = {}
    for where, obj in _read_jsonl(path):
        answers = obj.get("answers")
        if "id" not in obj or not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
            raise DataError(f"{where}: expected a generate output line with 'id' and 'answers' (list of strings)")
        out[str(obj["id"])] = answers[0]
    return out


def score_files(answers_path: str | Path, references_path: str | Path) -> dict[str, float]:
    """Exact match of a generate output against the references: overall, and on the questions
    whose sum has a final carry / has none. Every reference must have an answer."""
    answers = read_answers(answers_path)
    refs = read_references(references_path)
    missing = sorted(set(refs) - set(answers))
    if missing:
        raise DataError(f"{answers_path}: no answer for {len(missing)} test question(s), e.g. {missing[0]}")
    ids = sorted(refs)
    result = {"exact_match": score([answers[i] for i in ids], [refs[i]["reference"] for i in ids])}
    for name, want in (("exact_match_final_carry", True), ("exact_match_no_final_carry", False)):
        sub = [i for i in ids if bool(refs[i].get("final_carry")) == want]
        result[name] = score([answers[i] for i in sub], [refs[i]["reference"] for i in sub]) if sub else float("nan")
    return result


def vocabulary_words() -> list[str]:
    """Whole words of the questions (for the demo tokenizer): everything but the operands."""
    words: list[str] = []
    for q in QUESTIONS:
        for w in q.format(a="", b="").split():
            w = w.strip(".?")
            if w and not w.isdigit():
                words.append(w)
    return list(dict.fromkeys(words))
