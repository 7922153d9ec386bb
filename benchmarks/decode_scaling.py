"""Generation time against prompt length (docs/benchmarks.md, "Decoding"): prefill and per-step
decode cost of `generate_tokens` on the tiny model with random weights, B prompts of P tokens.

The per-step cost is (time for 65 new tokens - time for 1) / 64, medians of `--repeats` runs after
a warm-up (the compile), timed by `benchmarks/decode.py` `median_seconds`. `--prefill-block 0` attends a prefill in one block over all keys, as
before query blocks existed (for a before/after in one process tree).

    python benchmarks/decode_scaling.py --prompt-lens 128,1024,4032 --batch 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's benchmarks package

from benchmarks.decode import median_seconds  # noqa: E402
from openchat_jax.infer.generate import generate_tokens  # noqa: E402
from openchat_jax.model import attention  # noqa: E402
from openchat_jax.model.config import TINY  # noqa: E402
from openchat_jax.model.llama import init_params  # noqa: E402

NEW_TOKENS = 65


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-lens", default="128,1024,4032")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-block", type=int, default=attention.PREFILL_BLOCK,
                        help="queries per prefill block; 0 = one block over all keys")
    args = parser.parse_args()
    lengths = [int(x) for x in args.prompt_lens.split(",")]
    attention.PREFILL_BLOCK = args.prefill_block or 1 << 30
    context = max(lengths) + NEW_TOKENS + 64
    cfg = TINY.replace(vocab_size=32001, max_position_embeddings=context)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    print(f"{cfg.num_params() / 1e6:.1f}M params, {cfg.dtype}, batch {args.batch}, prefill block "
          f"{args.prefill_block or 'all'}, jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| prompt tokens | cache slots | prefill + 1 token | decode per token |")
    print("|--:|--:|--:|--:|")
    for P in lengths:
        prompts = rng.integers(3, cfg.vocab_size, (args.batch, P)).tolist()

        def run(n: int) -> None:
            generate_tokens(params, cfg, prompts, max_new_tokens=n, stop_ids=[], context=context)

        one = median_seconds(lambda: run(1), args.repeats)
        many = median_seconds(lambda: run(NEW_TOKENS), args.repeats)
        print(f"| {P} | {P + NEW_TOKENS} | {one * 1e3:.0f} ms | {(many - one) / (NEW_TOKENS - 1) * 1e3:.1f} ms |",
              flush=True)


if __name__ == "__main__":
    main()
