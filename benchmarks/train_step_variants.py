"""Train-step variants side by side: each variant is a list of config overrides; all are compiled
first, then timed in interleaved rounds in one process (same batch, same load), medians printed.

    python benchmarks/train_step_variants.py --config configs/bench_50m.py --rounds 3 \\
        --variant="--config.train.fused_head_loss=False --config.model.attention=xla_autodiff" \\
        --variant="--config.train.loss_chunk_length=0" --variant="--config.train.loss_chunk_length=128"

(`--variant=...` with "=", since the value starts with "--".) --variant= is the config as it is. Results: docs/benchmarks.md, "Train step".
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's benchmarks package

from benchmarks.train_step import JaxStep, bench_batch  # noqa: E402
from openchat_jax.config import load_config, resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_50m.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", dest="variants", action="append", required=True,
                        help='one quoted string of --config.key=value overrides per variant: --variant="--config.a=1"')
    args = parser.parse_args()
    steps = []
    for text in args.variants:
        config = resolve(load_config(args.config, shlex.split(text)), source=args.config)
        B, L = config.train.global_batch_size, config.data.max_length
        batch = bench_batch(np.random.default_rng(config.seed), B, L, config.model.vocab_size)
        step = JaxStep(config, batch)
        step()  # warm-up
        steps.append(step)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            times[i].append(step())
    for text, step, t in zip(args.variants, steps, times):
        print(f"{text or '(config as is)':<90} median {statistics.median(t):7.3f} s  min {min(t):7.3f} s  "
              f"loss after {len(t) + 1} steps {step.last_loss:.6f}")


if __name__ == "__main__":
    main()
