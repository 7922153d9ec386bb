"""`openchat-jax demo [--ablation] [--seeds N] [--first-seed K] [--out DIR] [--config FILE] [--config.key=value ...]`:
C-RLFT vs SFT in miniature on a CPU, no download (see openchat_jax/demo and docs/demo.md)."""

from __future__ import annotations

import argparse
import time

from openchat_jax.cli import Subparsers, add_command

HELP = "C-RLFT vs SFT in miniature: mixed-quality digit sorting, a tiny Llama trained on the CPU"
DESCRIPTION = ("Generates mixed-quality digit-sorting conversations (10% from an expert that is always right, 90% "
               "from a careless source that often sorts the wrong way round or drops repeated digits), runs prepare "
               "-> train -> generate, and scores exact match on held-out questions under the expert and the "
               "sub-optimal condition. Writes OUT/table.md, OUT/demo.png and OUT/results.json.")


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "demo", HELP, DESCRIPTION, config_overrides=True)
    parser.add_argument("--ablation", action="store_true",
                        help="also SFT (all data), SFT (expert data only), C-RLFT w/o rewards and w/o conditions, "
                             "with the same budget (the paper's Table 2)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds K..K+N-1 (default: 1, or 3 with --ablation)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="K, the first seed (default: 0); e.g. --first-seed 3 --seeds 3 repeats a run on "
                             "seeds 3-5, data and initial weights the default seeds never drew")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants instead (sft_all, sft_expert, no_weights, no_conditions, crlft)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--config", default=None, help="config file (default: the built-in configs/demo.py)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from openchat_jax.config import apply_overrides, load_config
    from openchat_jax.demo import report
    from openchat_jax.demo.config import get_config
    from openchat_jax.demo.run import ABLATION_VARIANTS, DEFAULT_VARIANTS, run_demo
    from openchat_jax.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides) if args.config else apply_overrides(get_config(), args.overrides)
    if "demo" not in config:
        raise ConfigError(f"{args.config}: the config has no 'demo' section (start from configs/demo.py)")
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    else:
        variants = ABLATION_VARIANTS if args.ablation else DEFAULT_VARIANTS
    n_seeds = args.seeds if args.seeds is not None else (3 if args.ablation else 1)
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n_seeds}")
    if args.first_seed < 0:
        raise ConfigError(f"--first-seed must be >= 0, got {args.first_seed}")
    out = Path(args.out)
    start = time.perf_counter()
    results = run_demo(config, out, variants=variants, seeds=list(range(args.first_seed, args.first_seed + n_seeds)))
    table = report.format_table(results)
    (out / "table.md").write_text(table + "\n")
    png = report.plot(results, out / "demo.png")
    minutes = (time.perf_counter() - start) / 60
    print()
    print(table)
    print()
    for text, ok in report.acceptance(results):
        print(f"[{'ok' if ok else 'NOT MET'}] {text}")
    print(f"\nwrote {out / 'table.md'}, {png}, {out / 'results.json'} in {minutes:.1f} min")
    return 0
