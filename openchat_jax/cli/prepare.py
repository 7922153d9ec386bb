"""`openchat-jax prepare --config CFG [--config.data.key=value ...]`: tokenize conversation files
into a TFDS/ArrayRecord dataset plus report.json (see openchat_jax.data.prepare)."""

from __future__ import annotations

import argparse
import json

from openchat_jax.config import load_config, resolve
from openchat_jax.cli import Subparsers, add_command


def register(subparsers: Subparsers) -> None:
    parser = add_command(
        subparsers, "prepare", help="tokenize conversation files into a prepared dataset (TFDS ArrayRecord + report.json)",
        description="Reads config.data (files, classes, label map, tokenizer, max_length, dataset_dir); "
                    "override any field with --config.data.key=value.",
        config_overrides=True)
    parser.add_argument("--config", required=True, help="config file with get_config() (e.g. configs/data_sharegpt.py)")
    parser.add_argument("--progress", action="store_true", help="show TFDS progress bars")
    parser.add_argument("--verbose", action="store_true", help="show TFDS's own messages (quiet by default)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already prepared in data.dataset_dir (refused otherwise)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openchat_jax.data.prepare import format_label_table, prepare
    from openchat_jax.errors import ConfigError

    config = load_config(args.config, args.overrides)
    if "data" not in config:
        raise ConfigError(f"{args.config}: the config has no 'data' section")
    if "train" in config:
        resolve(config, source=args.config)  # a run config: checked whole, as `train` will read it
    report = prepare(config.data, progress=args.progress, overwrite=args.overwrite, verbose=args.verbose)
    summary = {k: v for k, v in report.items() if k not in ("skipped_records", "labels")}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    print(format_label_table(report, config.data.label_field))
    if config.data.get("mask_phrases_file"):
        print(f"masked replies (weight 0, data.mask_phrases_file): {report['masked_replies']}")
    if report["empty_classes"]:
        print(f"WARNING: classes without conversations: {', '.join(report['empty_classes'])} "
              f"(data.allow_empty_classes=True)")
    print(f"prepared {report['examples']} examples from {report['input_records']} records "
          f"({report['skipped']} skipped, see {report['dataset_dir']}/report.json) in {report['wall_time_s']} s")
    return 0
