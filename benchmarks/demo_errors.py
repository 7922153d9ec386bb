"""Kinds of answers under the expert condition in a demo run (docs/demo.md, "Do the reward weights
matter?"), split by whether the list holds a given digit:

  right         the reference
  descending    the sub-optimal source's "descending" mistake, exactly
  drop_repeats  its "drop_repeats" mistake, exactly
  fewer_repeats shorter, every distinct digit kept, some repeats lost (drop_repeats half done)
  wrong_length  any other answer of the wrong length
  miscount      the right length, the wrong digits (the task's hard part: a digit's count)

    python benchmarks/demo_errors.py runs/demo --seeds 0,1,2 --digit 9 --variants no_weights,crlft
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from openchat_jax.demo import tasks

KINDS = ("right", "descending", "drop_repeats", "fewer_repeats", "wrong_length", "miscount")


def kind(answer: str, right: str) -> str:
    if answer == right:
        return "right"
    for slip in ("descending", "drop_repeats"):  # the slips that depend on the digits alone
        if answer == tasks.SLIPS[slip](right):
            return slip
    if len(answer) < len(right) and set(answer) == set(right) and not collections.Counter(answer) - collections.Counter(right):
        return "fewer_repeats"
    return "wrong_length" if len(answer) != len(right) else "miscount"


def classify(run_dir: Path, seed: int, variant: str, digit: str) -> collections.Counter:
    refs = tasks.read_references(run_dir / f"seed{seed}" / "data" / tasks.TEST_REFERENCES_FILE)
    answers = tasks.read_answers(run_dir / f"seed{seed}" / variant / "answers_expert.jsonl")
    counts: collections.Counter = collections.Counter()
    for qid, ref in refs.items():
        right = ref["reference"]
        counts[(digit in right, kind(tasks.normalize(answers[qid]), right))] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--digit", default="9")
    parser.add_argument("--variants", default="no_weights,crlft")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        total: collections.Counter = collections.Counter()
        for seed in (int(s) for s in args.seeds.split(",")):
            total += classify(args.run_dir, seed, variant, args.digit)
        for has in (True, False):
            n = sum(v for (h, _), v in total.items() if h == has)
            kinds = "  ".join(f"{k} {total[(has, k)]:3d}" for k in KINDS)
            print(f"{variant:12s} lists {'with' if has else 'without'} {args.digit}: {n:4d}  {kinds}")


if __name__ == "__main__":
    main()
