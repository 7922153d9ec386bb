"""`openchat-jax generate`: answer a JSONL prompts file (chat or MT-bench format) with a weights folder."""

from __future__ import annotations

import argparse
import time

from openchat_jax.errors import ConfigError
from openchat_jax.cli import Subparsers, add_command


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `generate` and `chat`."""
    from openchat_jax.data.template import FAMILIES

    parser.add_argument("--ckpt", required=True, help="weights folder (training output or convert hf-to-jax)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub name (default: CKPT/tokenizer)")
    parser.add_argument("--condition", help="class whose template prefix to use (default: the highest weight)")
    parser.add_argument("--condition-text", help="a literal template prefix instead of a class, e.g. GPT4")
    parser.add_argument("--classes-from", help="classes.json / dataset_info.json, or a folder holding one "
                        "(default: CKPT)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    parser.add_argument("--context", type=int, help="max prompt + answer tokens (default: the model's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype (default: the one model_config.json records)")
    parser.add_argument("--template", choices=list(FAMILIES),
                        help="template family (default: the one CKPT/classes.json records, else openchat_v3.2)")
    parser.add_argument("--mesh", help="run on a device mesh, e.g. fsdp=-1 or data=2,tensor=4 "
                        "(default: one device)")


def mesh_from_flag(text: str | None):
    """`--mesh` as (mesh, rules), or (None, None) for one device; chat, generate and eval share it."""
    if not text:
        return None, None
    from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES
    from openchat_jax.train.mesh import make_mesh
    from openchat_jax.train.mesh_spec import parse_mesh

    return make_mesh(parse_mesh(text)), LOGICAL_AXIS_RULES


def load(args: argparse.Namespace):
    """(model, class, sampling) from the shared arguments."""
    from openchat_jax.infer.classes import resolve_condition
    from openchat_jax.infer.engine import load_chat_model
    from openchat_jax.infer.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    conv_class = resolve_condition(args.ckpt, class_name=args.condition, condition_text=args.condition_text,
                                   classes_from=args.classes_from)
    mesh, rules = mesh_from_flag(args.mesh)
    model = load_chat_model(args.ckpt, tokenizer_path=args.tokenizer, mesh=mesh, rules=rules, dtype=args.dtype,
                            template=args.template)
    return model, conv_class, sampling


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "generate", help="answer a JSONL prompts file (messages or MT-bench turns)")
    add_model_args(parser)
    parser.add_argument("--prompts", required=True, help='JSONL: {"id", "messages"} or {"question_id", "turns"}')
    parser.add_argument("--out", required=True, help="JSONL file to write, one line per prompt")
    parser.add_argument("--model-id", help='"model_id" of every output line (default: the run\'s name: RUN for '
                        "RUN/final, else the --ckpt folder's name)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--truncate", action="store_true",
                        help="drop the oldest prompt tokens (after <s>) that do not fit the context, instead of failing")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from openchat_jax.infer.prompts import default_model_id, read_prompts, run_prompts

    records = read_prompts(args.prompts)  # malformed input fails before the model loads
    model, conv_class, sampling = load(args)
    start = time.perf_counter()
    summary = run_prompts(
        model, records, conv_class, args.out, max_new_tokens=args.max_new_tokens, sampling=sampling,
        key=jax.random.key(args.seed), context=args.context, truncate=args.truncate, batch_size=args.batch_size,
        model_id=args.model_id or default_model_id(args.ckpt), progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {summary['records']} lines to {args.out}: {summary['answers']} answers "
        f"(condition {conv_class.name!r}), {summary['new_tokens']} new tokens, {summary['stopped']} ended with "
        f"<|end_of_turn|>/EOS, {summary['truncated_prompts']} prompts truncated, {seconds:.1f}s"
    )
    return 0
