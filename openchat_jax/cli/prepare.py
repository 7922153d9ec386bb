"""`openchat-jax prepare --config CFG [--config.data.key=value ...]`: tokenize conversation files
into a TFDS/ArrayRecord dataset plus report.json (see openchat_jax.data.prepare)."""

from __future__ import annotations

import argparse
import json

from openchat_jax.config import load_config
from openchat_jax.cli import ConfigOverridesParser


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize conversation files into a prepared dataset (TFDS ArrayRecord + report.json)",
        description="Reads config.data (files, classes, label map, tokenizer, max_length, dataset_dir); "
                    "override any field with --config.data.key=value.")
    parser.__class__ = ConfigOverridesParser
    parser.add_argument("--config", required=True, help="config file with get_config() (e.g. configs/data_sharegpt.py)")
    parser.add_argument("--progress", action="store_true", help="show TFDS progress bars")
    parser.set_defaults(func=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    from openchat_jax.data.prepare import prepare
    from openchat_jax.errors import ConfigError

    config = load_config(args.config, args.overrides)
    if "data" not in config:
        raise ConfigError(f"{args.config}: the config has no 'data' section")
    report = prepare(config.data, progress=args.progress)
    summary = {k: v for k, v in report.items() if k != "skipped_records"}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"prepared {report['examples']} examples from {report['input_records']} records "
          f"({report['skipped']} skipped, see {report['dataset_dir']}/report.json) in {report['wall_time_s']} s")
    return 0
