"""Kinds of wrong answers under the expert condition in a demo run (docs/demo.md, "Do the reward
weights matter?"): right, the sub-optimal source's descending answer, or another mistake, split by
whether the list holds a given digit.

    python benchmarks/demo_errors.py runs/demo --seeds 0,1,2 --digit 9 --variants no_weights,crlft
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from openchat_jax.demo import tasks


def classify(run_dir: Path, seed: int, variant: str, digit: str) -> collections.Counter:
    refs = tasks.read_references(run_dir / f"seed{seed}" / "data" / tasks.TEST_REFERENCES_FILE)
    answers = tasks.read_answers(run_dir / f"seed{seed}" / variant / "answers_expert.jsonl")
    counts: collections.Counter = collections.Counter()
    for qid, ref in refs.items():
        right, answer = ref["reference"], tasks.normalize(answers[qid])
        kind = "right" if answer == right else "descending" if answer == tasks.descending(right) else "other"
        counts[(digit in right, kind)] += 1
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
            print(f"{variant:12s} lists {'with' if has else 'without'} {args.digit}: {n:4d}  right {total[(has, 'right')]:4d}  "
                  f"descending {total[(has, 'descending')]:4d}  other {total[(has, 'other')]:4d}")


if __name__ == "__main__":
    main()
