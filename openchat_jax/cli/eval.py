"""`openchat-jax eval --ckpt CKPT --data DATASET_DIR [--conditions GPT4,GPT3] [--prompts FILE]`: per-class
NLL and perplexity of a prepared dataset's held-out split under each condition (and, with prompts
carrying references, answers under each condition, scored); writes OUT/eval.json and OUT/eval.png."""

from __future__ import annotations

import argparse

from openchat_jax.cli import Subparsers, add_command

HELP = "held-out NLL / perplexity per class under each condition; optionally scored answers"
DESCRIPTION = ("Scores the held-out split of a prepared dataset (prepare with data.eval_fraction or data.eval_files) "
               "with a weights folder: for every class, the NLL per supervised token and the perplexity under each "
               "class condition. With --prompts, also answers a prompts file (generate's format, each record with a "
               "'reference') greedily under each condition and scores the answers. Writes OUT/eval.json and "
               "OUT/eval.png.")


def register(subparsers: Subparsers) -> None:
    parser = add_command(subparsers, "eval", HELP, DESCRIPTION)
    parser.add_argument("--ckpt", required=True, help="weights folder (training's final/ or convert hf-to-jax)")
    parser.add_argument("--data", required=True, help="prepared dataset folder with a held-out split")
    parser.add_argument("--conditions", help="comma-separated class names or condition texts (default: all)")
    parser.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per forward pass (default: 8)")
    parser.add_argument("--mesh", help="device mesh, e.g. fsdp=-1 (default: one device)")
    parser.add_argument("--dtype", help="compute dtype, e.g. float32 (default: the checkpoint's)")
    parser.add_argument("--prompts", help="JSONL prompts (generate's format), each record with a 'reference'")
    parser.add_argument("--scorer", help="module:function(answer, reference) -> float (default: exact match)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--tokenizer", help="tokenizer for --prompts (default: CKPT/tokenizer)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openchat_jax.cli.generate import mesh_from_flag
    from openchat_jax.evaluate.checkpoint import evaluate_checkpoint

    mesh, rules = mesh_from_flag(args.mesh)
    report = evaluate_checkpoint(
        args.ckpt, args.data, args.out, conditions=args.conditions.split(",") if args.conditions else None,
        mesh=mesh, rules=rules, batch_size=args.batch_size, dtype=args.dtype, prompts=args.prompts,
        scorer=args.scorer, max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer,
    )
    for rendering, classes in report["likelihood"].items():
        cond = report["conditions"][rendering] or "plain"
        for cls, row in classes.items():
            print(f"condition {cond:<8} {cls:<12} NLL {row['nll']:.4f}  perplexity {row['perplexity']:.3f}  "
                  f"({row['tokens']:.0f} tokens)")
    for name, row in report.get("answers", {}).get("conditions", {}).items():
        print(f"answers under {name}: {report['answers']['scorer']} {row['score']:.3f}")
    print(f"wrote {args.out}/eval.json and {args.out}/eval.png")
    return 0
