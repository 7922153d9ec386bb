"""The demo's data: mixed-quality digit-sorting conversations whose answers can be checked exactly.

Every conversation is one user question ("Sort the digits 44557241.", six phrasings) and one
assistant answer (the digits in ascending order, e.g. "12444557"), labelled by its source in the
`source` field, in the OpenAI `messages` format that `openchat-jax prepare` reads:

  {"id": "train-00007", "source": "expert", "messages": [{"role": "user", "content": "Sort 44557241 in ascending order."},
                                                         {"role": "assistant", "content": "12444557"}]}

Two sources, like GPT-4 and GPT-3.5 in the paper:
  expert      (`expert_fraction` of the conversations, 10% by default): always right.
  suboptimal  (the rest): a careless sorter. With probability `slip_rate` it makes its one
              systematic mistake (`slip`), otherwise it is right:
                descending    the right digits in the wrong order: 44557241 -> "75544421"
                drop_repeats  every distinct digit once: 44557241 -> "12457"
                unsorted      the digits as the question gave them: 44557241 -> "44557241"
                shuffled      the right digits in an order that looks random (a fixed function of
                              the question, by a seeded shuffle): 44557241 -> "72514544"
              or several joined by "+" (`descending+drop_repeats`, the default): each slipping
              answer makes one of them, drawn uniformly. With `slip_digit` = d it slips only on
              the questions whose list contains the digit d (its "hard" questions) and is right
              on the others.
              A question it cannot get wrong that way (all digits equal; no repeated digit to
              drop) it answers right. The mistake is the same every time, so a model trained on
              the mixture learns it.
The question and its phrasing are drawn the same way for both sources; only the answer differs.
Why "descending+drop_repeats" is the default: the "descending" answers still demonstrate the hard
part of the task (keeping every digit with its count), as GPT-3.5's answers still show a lot that
GPT-4's do, and the condition tells their order apart easily; the "drop_repeats" answers contradict
exactly that part, in the weights both sources share, which is what the class weights damp
(docs/demo.md has each slip alone and the mixture).

The held-out test split has other questions: no test question has the answer (the sorted digits)
of any train question, nor of another test question. `test_prompts.jsonl` is in the
`openchat-jax generate` prompts format, `test_references.jsonl` holds the right answers.

Scoring is exact match after stripping surrounding whitespace (`normalize`), nothing else:
"12444557" and " 12444557\\n" count as right; "124457", "1244 4557" or "12444557." do not.

Everything is drawn from one seeded `numpy.random.Generator` per split: the same spec gives the
same files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from openchat_jax.errors import ConfigError, DataError

LABEL_FIELD = "source"
EXPERT = "expert"
SUBOPTIMAL = "suboptimal"

# Phrasings of the question; {x} is the digit string.
QUESTIONS = (
    "Sort the digits {x}.",
    "Sort {x} in ascending order.",
    "What is {x} with its digits sorted?",
    "Put the digits of {x} in increasing order.",
    "Arrange the digits {x} from smallest to largest.",
    "Order the digits of {x}.",
)

TRAIN_FILE = "train.jsonl"
TEST_PROMPTS_FILE = "test_prompts.jsonl"
TEST_REFERENCES_FILE = "test_references.jsonl"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    num_train: int = 1500
    num_test: int = 200
    min_length: int = 8  # digits per question, drawn uniformly from [min_length, max_length]
    max_length: int = 8
    expert_fraction: float = 0.1
    slip_rate: float = 0.7  # P(the sub-optimal source makes its mistake | the mistake is possible)
    # The sub-optimal source's mistake: one of SLIPS, or several joined by "+" (each slipping
    # answer then makes one of them, drawn uniformly).
    slip: str = "descending+drop_repeats"
    # 0-9: the sub-optimal source slips only on questions whose list contains this digit (its
    # "hard" questions; on the others it is right); -1: on any question.
    slip_digit: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_test", "min_length", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"demo task {name}={value!r} must be a positive integer")
        if self.min_length > self.max_length:
            raise ConfigError(f"demo task min_length={self.min_length} > max_length={self.max_length}")
        if not self.slips or any(name not in SLIPS for name in self.slips):
            raise ConfigError(f"demo task slip={self.slip!r}: choose one of {sorted(SLIPS)}, or several joined by '+'")
        if isinstance(self.slip_digit, bool) or not isinstance(self.slip_digit, int) or not -1 <= self.slip_digit <= 9:
            raise ConfigError(f"demo task slip_digit={self.slip_digit!r} must be a digit 0-9, or -1 (any question)")
        for name in ("expert_fraction", "slip_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"demo task {name}={value!r} must be in [0, 1]")
        # Test questions need answers no train question has: keep at least half the answers free.
        answers = sum(math.comb(n + 9, 9) for n in range(self.min_length, self.max_length + 1))
        if self.num_train + 2 * self.num_test > answers // 2:
            raise ConfigError(
                f"demo task: {self.num_train} train + {self.num_test} test questions need more distinct "
                f"answers than lists of {self.min_length}-{self.max_length} digits have ({answers}); "
                "use longer lists or fewer questions"
            )

    @property
    def slips(self) -> tuple[str, ...]:
        return tuple(self.slip.split("+"))


@dataclasses.dataclass(frozen=True)
class Problem:
    digits: str
    phrasing: int  # index into QUESTIONS

    @property
    def question(self) -> str:
        return QUESTIONS[self.phrasing].format(x=self.digits)

    @property
    def answer(self) -> str:
        return "".join(sorted(self.digits))

    @property
    def has_repeats(self) -> bool:
        return len(set(self.digits)) < len(self.digits)


@dataclasses.dataclass(frozen=True)
class DemoData:
    train: Path
    test_prompts: Path
    test_references: Path
    counts: dict[str, Any]  # per source: conversations, wrong answers, questions with repeats


def drop_repeats(digits: str) -> str:
    """Slip "drop_repeats": every distinct digit once, in ascending order."""
    return "".join(sorted(set(digits)))


def descending(digits: str) -> str:
    """Slip "descending": the right digits, sorted the wrong way round."""
    return "".join(sorted(digits, reverse=True))


def unsorted(digits: str) -> str:
    """Slip "unsorted": the right digits, left in the order the question gave them (a lazy echo)."""
    return digits


def shuffled(digits: str) -> str:
    """Slip "shuffled": the right digits in a pseudo-random order, the same for the same question
    (the order carries no pattern a model can learn: every such answer is a high-entropy target)."""
    order = list(digits)
    random.Random(digits).shuffle(order)
    return "".join(order)


SLIPS = {"descending": descending, "drop_repeats": drop_repeats, "unsorted": unsorted, "shuffled": shuffled}


def _draw_problem(rng: np.random.Generator, spec: TaskSpec) -> Problem:
    n = int(rng.integers(spec.min_length, spec.max_length + 1))
    digits = "".join(str(int(d)) for d in rng.integers(0, 10, size=n))
    return Problem(digits, int(rng.integers(len(QUESTIONS))))


def iter_train(spec: TaskSpec, rng: np.random.Generator) -> Iterator[tuple[Problem, str, str]]:
    """(problem, source, answer text) for each train conversation."""
    for _ in range(spec.num_train):
        problem = _draw_problem(rng, spec)
        expert = rng.random() < spec.expert_fraction
        slip = rng.random() < spec.slip_rate  # drawn for every conversation: streams stay aligned
        # (with one slip nothing more is drawn, so its data stay what they were before mixes existed)
        which = spec.slips[int(rng.integers(len(spec.slips)))] if len(spec.slips) > 1 else spec.slips[0]
        wrong = SLIPS[which](problem.digits)
        hard = spec.slip_digit < 0 or str(spec.slip_digit) in problem.digits
        if expert or not slip or not hard or wrong == problem.answer:  # e.g. no repeated digit to drop
            yield problem, EXPERT if expert else SUBOPTIMAL, problem.answer
        else:
            yield problem, SUBOPTIMAL, wrong


def _test_problems(spec: TaskSpec, rng: np.random.Generator, taken: set[str]) -> list[Problem]:
    out: list[Problem] = []
    while len(out) < spec.num_test:
        p = _draw_problem(rng, spec)
        if p.answer not in taken:
            taken.add(p.answer)
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
    counts: dict[str, Any] = {s: {"conversations": 0, "wrong": 0, "repeats": 0} for s in (EXPERT, SUBOPTIMAL)}
    rows = []
    taken: set[str] = set()
    for i, (problem, source, answer) in enumerate(iter_train(spec, np.random.default_rng(train_seq))):
        taken.add(problem.answer)
        c = counts[source]
        c["conversations"] += 1
        c["wrong"] += answer != problem.answer
        c["repeats"] += problem.has_repeats
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
        {"id": f"test-{i:05d}", "reference": p.answer, "repeats": p.has_repeats} for i, p in enumerate(test)
    ])
    counts["test"] = {"questions": len(test), "repeats": sum(p.has_repeats for p in test)}
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
    """id -> reference row ({"reference": str, "repeats": bool})."""
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
    where a digit repeats / none does. Every reference must have an answer."""
    answers = read_answers(answers_path)
    refs = read_references(references_path)
    missing = sorted(set(refs) - set(answers))
    if missing:
        raise DataError(f"{answers_path}: no answer for {len(missing)} test question(s), e.g. {missing[0]}")
    ids = sorted(refs)
    result = {"exact_match": score([answers[i] for i in ids], [refs[i]["reference"] for i in ids])}
    for name, want in (("exact_match_repeats", True), ("exact_match_no_repeats", False)):
        sub = [i for i in ids if bool(refs[i].get("repeats")) == want]
        result[name] = score([answers[i] for i in sub], [refs[i]["reference"] for i in sub]) if sub else float("nan")
    return result


def vocabulary_words() -> list[str]:
    """Whole words of the questions (for the demo tokenizer): everything but the digits."""
    words: list[str] = []
    for q in QUESTIONS:
        for w in q.format(x="").split():
            w = w.strip(".?")
            if w:
                words.append(w)
    return list(dict.fromkeys(words))
