"""`openchat-jax train --config CFG [--config.key=value ...]`: train on a prepared dataset; logs
(metrics.jsonl, tb/), checkpoints (checkpoints/, config.checkpoint) and the final weights (final/) go
to config.workdir. A run resumes by itself from the newest checkpoint that restores; SIGTERM saves a
checkpoint and exits 0.

Multi-process runs: `--coordinator-address HOST:PORT --num-processes N --process-id I` (or nothing
on TPU pod slices / SLURM, where JAX finds the cluster itself)."""

from __future__ import annotations

import argparse
import logging
import sys

from openchat_jax.config import load_config, split_config_args


class _ConfigOverridesParser(argparse.ArgumentParser):
    """Takes the open-ended `--config.key=value` items out before argparse sees them."""

    def parse_known_args(self, args=None, namespace=None):
        rest, overrides = split_config_args(list(sys.argv[1:] if args is None else args))
        namespace, extras = super().parse_known_args(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, extras


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="C-RLFT training on a prepared dataset",
        description="Trains the model of config.model (or config.init_from) on config.data.dataset_dir; "
                    "override any field with --config.key=value.",
    )
    parser.__class__ = _ConfigOverridesParser
    parser.add_argument("--config", required=True, help="config file with get_config() (e.g. configs/tiny_sharegpt.py)")
    parser.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.set_defaults(func=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    from openchat_jax.train.distributed import StopSignal, initialize

    # Before anything touches the devices.
    multi = initialize(args.coordinator_address, args.num_processes, args.process_id)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("openchat_jax").setLevel(logging.INFO)

    from openchat_jax.train.loop import make_checkpointer, train

    config = load_config(args.config, args.overrides)
    # Single process: SIGTERM/SIGINT set a flag the loop polls (save, exit 0). Multi-process: JAX's
    # preemption service owns SIGTERM and the loop asks checkpointer.reached_preemption(step), so
    # every process stops at the same step (a local flag would leave the others in a collective).
    stop = None if multi else StopSignal()
    try:
        result = train(config, checkpointer=make_checkpointer(config), stop=stop)
    finally:
        if stop is not None:
            stop.close()
    if result.final_dir:
        print(f"trained {result.steps_done} steps; final weights in {result.final_dir}")
    else:
        print(f"stopped at step {result.steps_done}")
    return 0
