"""`openchat-jax <command>`: each command lives in its own module here, which only parses
arguments and calls the library. A module provides `register(subparsers)` that adds its
parser and sets `func` to a callable taking the parsed namespace and returning an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

from openchat_jax import __version__
from openchat_jax.config import split_config_args
from openchat_jax.errors import OpenChatError

DESCRIPTION = (
    "C-RLFT fine-tuning of Llama-2 in JAX: prepare mixed-quality conversations, train on a device "
    "mesh, generate, convert to and from Hugging Face. New here? Run `openchat-jax demo`."
)

# command name -> module under openchat_jax.cli (imported lazily so `--help` stays fast).
COMMANDS = {
    "convert": "convert",
    "prepare": "prepare",
    "train": "train",
    "bench": "bench",
    "generate": "generate",
    "chat": "chat",
    "demo": "demo",
    "plan": "plan",
    "eval": "eval",
    "analyze": "analyze",
}


class ConfigOverridesParser(argparse.ArgumentParser):
    """A command parser that takes the open-ended `--config.key=value` items out before argparse
    sees them and puts them in `args.overrides` (set `parser.__class__` to this)."""

    def parse_known_args(self, args=None, namespace=None):
        rest, overrides = split_config_args(list(sys.argv[1:] if args is None else args))
        namespace, extras = super().parse_known_args(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, extras


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openchat-jax", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"openchat-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"openchat_jax.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OpenChatError as e:
        print(f"openchat-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
