"""`openchat-jax bench <what>`: benchmarks that print figures.

    openchat-jax bench train-step --config configs/bench_50m.py [--config.key=value ...]
        matmul peak, then our train step vs transformers + torch.optim.AdamW on this CPU."""

from __future__ import annotations

import argparse
import json

from openchat_jax.config import load_config, resolve
from openchat_jax.errors import ConfigError
from openchat_jax.cli import ConfigOverridesParser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (train-step)")
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    step = sub.add_parser(
        "train-step", help="train step time, tokens/s and MFU vs a measured matmul peak and vs PyTorch",
        description="Times the jitted train step of the config's model on a synthetic batch "
                    "(train.global_batch_size x data.max_length) and, in the same run, the same step in "
                    "transformers + torch.optim.AdamW.",
    )
    step.__class__ = ConfigOverridesParser
    step.add_argument("--config", required=True, help="config file (e.g. configs/bench_50m.py)")
    step.add_argument("--rounds", type=int, default=3, help="alternating JAX/torch rounds (default 3)")
    step.add_argument("--steps-per-round", type=int, default=3, help="timed steps per round and side")
    step.add_argument("--settle-steps", type=int, default=1,
                      help="untimed steps before each side's timed ones in a round (default 1): the first "
                           "step after the other framework ran is slowed by it")
    step.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    step.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n peak matmul")
    step.add_argument("--json", default=None, help="also write the figures to this JSON file")
    step.set_defaults(func=run_train_step, overrides=[])


def run_train_step(args: argparse.Namespace) -> int:
    from openchat_jax.train.bench import bench_train_step

    config = resolve(load_config(args.config, args.overrides), source=args.config)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError('the PyTorch comparison needs torch, which comes with the test extra: '
                              'pip install -e ".[test]" (or pass --no-torch)') from None
    result = bench_train_step(
        config, rounds=args.rounds, steps_per_round=args.steps_per_round, settle_steps=args.settle_steps,
        torch_compare=not args.no_torch,
        matmul_size=args.matmul_size,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
