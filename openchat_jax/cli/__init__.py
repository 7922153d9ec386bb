"""`openchat-jax <command>`: each command lives in its own module here, which only parses
arguments and calls the library. A module provides `register(subparsers)` that adds its
parser and sets `func` to a callable taking the parsed namespace and returning an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Protocol

from openchat_jax import __version__
from openchat_jax.config import split_config_args
from openchat_jax.errors import ConfigError, OpenChatError

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


def _show_default(action: argparse.Action) -> None:
    """An option's help ends with "(default: X)", unless its help already names the default or
    the default is empty (None; False for a flag that is off)."""
    default = action.default
    if (not action.option_strings or any(default is x for x in (None, False, argparse.SUPPRESS)) or isinstance(default, list)
            or "default" in (action.help or "").lower()):
        return
    action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """The parser of every command (subparsers are made of the parent's class): each option's
    help shows its default."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        _show_default(action)
        return action


class Subparsers(Protocol):
    """What `register(subparsers)` receives: the object `add_subparsers()` returns."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


class ConfigOverridesParser(Parser):
    """A command parser that takes the open-ended `--config.key=value` (or `--config.key value`)
    items out before argparse sees them and puts them in `args.overrides` (`add_command(...,
    config_overrides=True)` makes one)."""

    def parse_known_args(self, args=None, namespace=None):
        try:
            rest, overrides = split_config_args(list(sys.argv[1:] if args is None else args))
        except ConfigError as e:
            self.error(str(e))
        namespace, extras = super().parse_known_args(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, extras


def add_command(subparsers: Subparsers, name: str, help: str, description: str | None = None, *,
                config_overrides: bool = False) -> argparse.ArgumentParser:
    """The parser of a command (or of a second word: `convert hf-to-jax`). With `config_overrides` it
    also takes `--config.key=value` items into `args.overrides`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    if config_overrides:
        # add_parser builds every parser of one subparsers object with the same class.
        parser.__class__ = ConfigOverridesParser
    return parser


def add_command_group(subparsers: Subparsers, name: str, help: str, *, dest: str, metavar: str) -> Subparsers:
    """A command whose work a second word chooses (`analyze representations`); returns the
    subparsers that the second words are added to with `add_command`."""
    parser = subparsers.add_parser(name, help=help)
    return parser.add_subparsers(dest=dest, required=True, metavar=metavar)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="openchat-jax", description=DESCRIPTION)
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
