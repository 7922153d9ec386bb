"""`openchat-jax train --config CFG [--config.key=value ...]`: train on a prepared dataset; logs
(metrics.jsonl, tb/), checkpoints (checkpoints/, config.checkpoint), the final weights (final/) and
the run's config (config.json) go to config.workdir, as the startup summary lists. A run resumes by
itself from the newest checkpoint that restores, under the settings it started with; SIGTERM saves
a checkpoint and exits 0.

Multi-process runs: `--coordinator-address HOST:PORT --num-processes N --process-id I` (or nothing
on TPU pod slices / SLURM, where JAX finds the cluster itself)."""

from __future__ import annotations

import argparse
import logging

from openchat_jax.config import load_config, resolve
from openchat_jax.cli import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers, "train", help="C-RLFT training on a prepared dataset",
        description="Trains the model of config.model (or config.init_from) on config.data.dataset_dir; "
                    "override any field with --config.key=value.",
        config_overrides=True,
    )
    parser.add_argument("--config", required=True, help="config file with get_config() (e.g. configs/tiny_sharegpt.py), "
                        "or the config.json a run wrote into its workdir")
    parser.add_argument("--coordinator-address", default=None,
                        help="HOST:PORT of process 0, for multi-process runs off a TPU/Slurm cluster "
                             "(there they are found by themselves); give all three or none")
    parser.add_argument("--num-processes", type=int, default=None, help="processes in the run (multi-process)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="this process's rank, 0 .. NUM_PROCESSES-1 (multi-process)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openchat_jax.train.distributed import StopSignal, initialize

    # Before anything touches the devices.
    multi = initialize(args.coordinator_address, args.num_processes, args.process_id)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("openchat_jax").setLevel(logging.INFO)

    from openchat_jax.train.loop import make_checkpointer, train

    config = resolve(load_config(args.config, args.overrides), source=args.config)
    # Single process: SIGTERM/SIGINT set a flag the loop polls (save, exit 0). Multi-process: JAX's
    # preemption service owns SIGTERM and the loop asks checkpointer.reached_preemption(step), so
    # every process stops at the same step (a local flag would leave the others in a collective).
    stop = None if multi else StopSignal()
    try:
        result = train(config, checkpointer=make_checkpointer(config), stop=stop, say=print)
    finally:
        if stop is not None:
            stop.close()
    if result.already_finished:
        pass  # train said so
    elif result.final_dir:
        print(f"trained {result.steps_done - result.start_step} steps (step {result.start_step} -> "
              f"{result.steps_done}); final weights in {result.final_dir}")
    else:
        print(f"stopped at step {result.steps_done}")
    return 0
