"""`openchat-jax chat`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse

from openchat_jax.cli import Subparsers, add_command
from openchat_jax.cli.generate import add_model_args, load


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "chat", help="talk to a model in the terminal (multi-turn)")
    add_model_args(parser)
    parser.add_argument("--system", help="system message")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openchat_jax.infer.chat import ChatSession, chat_loop

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, conv_class, sampling = load(args)
    session = ChatSession(model, conv_class, system=args.system, max_new_tokens=args.max_new_tokens,
                          sampling=sampling, seed=args.seed, context=args.context)
    chat_loop(session)
    return 0
