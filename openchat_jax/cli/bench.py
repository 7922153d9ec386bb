"""`openchat-jax bench <what>`: benchmarks that print figures. They live in the source checkout's
benchmarks/ folder (not in the installed package), which this command loads.

    openchat-jax bench train-step --config configs/bench_50m.py [--config.key=value ...]
        matmul peak, then our train step vs transformers + torch.optim.AdamW on this CPU
        (benchmarks/train_step.py)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from openchat_jax.config import load_config, resolve
from openchat_jax.errors import ConfigError
from openchat_jax.cli import Subparsers, add_command, add_command_group

# The checkout openchat_jax was imported from; an installed wheel has no benchmarks/ beside it.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py of the source checkout, or a ConfigError saying that one is needed."""
    path = SOURCE_ROOT / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"openchat-jax bench needs a source checkout: {path} does not exist (the benchmarks "
                          "are not installed with the package); clone the repository, pip install -e . there "
                          "and run the command again")
    module_name = f"benchmarks.{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def register(subparsers: Subparsers) -> None:
    sub = add_command_group(subparsers, "bench", "benchmarks (train-step)", dest="what", metavar="WHAT")
    step = add_command(
        sub, "train-step", help="train step time, tokens/s and MFU vs a measured matmul peak and vs PyTorch",
        description="Times the jitted train step of the config's model on a synthetic batch "
                    "(train.global_batch_size x data.max_length) and, in the same run, the same step in "
                    "transformers + torch.optim.AdamW.",
        config_overrides=True,
    )
    step.add_argument("--config", required=True, help="config file (e.g. configs/bench_50m.py)")
    step.add_argument("--rounds", type=int, default=3, help="alternating JAX/torch rounds (default 3)")
    step.add_argument("--steps-per-round", type=int, default=3, help="timed steps per round and side")
    step.add_argument("--settle-steps", type=int, default=1,
                      help="untimed steps before each side's timed ones in a round (default 1): the first "
                           "step after the other framework ran is slowed by it")
    step.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    step.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n peak matmul")
    step.add_argument("--json", default=None, help="also write the figures to this JSON file")
    step.set_defaults(func=run_train_step)


def run_train_step(args: argparse.Namespace) -> int:
    bench_train_step = load_benchmark("train_step").bench_train_step
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
