"""`openchat-jax eval --ckpt CKPT --data DATASET_DIR [--conditions GPT4,GPT3] [--prompts FILE]`: per-class
NLL and perplexity of a prepared dataset's held-out split under each condition (and, with prompts
carrying references, answers under each condition, scored); writes OUT/eval.json and OUT/eval.png."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="held-out NLL / perplexity per class under each condition; optionally scored answers",
        description="Scores the held-out split of a prepared dataset (prepare with data.eval_fraction or "
                    "data.eval_files) with a weights folder: for every class, the NLL per supervised token and "
                    "the perplexity under each class condition. With --prompts, also answers a prompts file "
                    "(generate's format, each record with a 'reference') greedily under each condition and "
                    "scores the answers. Writes OUT/eval.json and OUT/eval.png.")
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
    import json
    from pathlib import Path

    import jax

    from openchat_jax.cli.generate import parse_mesh
    from openchat_jax.data.eval_split import load_eval_split
    from openchat_jax.data.prepare import load_dataset_info
    from openchat_jax.data.template import ConvClass
    from openchat_jax.errors import ConfigError
    from openchat_jax.evaluate.checkpoint import (
        check_vocabulary, load_scorer, plot, score_answers, select_renderings,
    )
    from openchat_jax.model import checkpoint_io
    from openchat_jax.train import mesh as mesh_lib
    from openchat_jax.train.evaluation import HeldOutEval

    info = load_dataset_info(args.data)
    conditions = [c.strip() for c in args.conditions.split(",")] if args.conditions else None
    names = select_renderings(load_eval_split(args.data, info), conditions)
    if args.prompts:
        from openchat_jax.evaluate.checkpoint import read_references
        from openchat_jax.infer.prompts import read_prompts

        read_prompts(args.prompts)  # a bad prompts file or scorer fails before the model loads
        read_references(args.prompts)
        load_scorer(args.scorer)
    mesh, rules = parse_mesh(args.mesh)
    if mesh is None:
        mesh, rules = mesh_lib.make_mesh({"fsdp": -1}, jax.local_devices()[:1]), mesh_lib.LOGICAL_AXIS_RULES
    if args.batch_size < 1 or args.batch_size % mesh_lib.batch_axis_size(mesh):
        raise ConfigError(f"--batch-size {args.batch_size} must be a positive multiple of the mesh's "
                          f"batch devices ({mesh_lib.batch_axis_size(mesh)})")
    model = None
    if args.prompts:
        from openchat_jax.infer.engine import load_chat_model

        model = load_chat_model(args.ckpt, tokenizer_path=args.tokenizer, mesh=mesh, rules=rules)
        params, cfg = model.params, model.cfg
    else:
        cfg = checkpoint_io.read_model_config(args.ckpt)
        params, cfg = checkpoint_io.load_params(args.ckpt, mesh_lib.param_shardings(cfg, mesh, rules))
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    check_vocabulary(cfg, info, args.ckpt, args.data)
    evaluator = HeldOutEval(args.data, info, cfg, mesh, rows=args.batch_size, seq_len=int(info["max_length"]),
                            variants=names, rules=rules)
    report = {
        "ckpt": args.ckpt, "data": args.data, "held_out_conversations": evaluator.num_conversations,
        "conditions": {v.name: v.condition for v in evaluator.variants},
        "likelihood": evaluator.table(params),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        classes = [ConvClass(v.name, v.condition, 1.0) for v in evaluator.variants]
        report["answers"] = score_answers(model, args.prompts, classes, out, scorer_spec=args.scorer,
                                          max_new_tokens=args.max_new_tokens)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    png = plot(report, out / "eval.png")
    for rendering, classes in report["likelihood"].items():
        cond = report["conditions"][rendering] or "plain"
        for cls, row in classes.items():
            print(f"condition {cond:<8} {cls:<12} NLL {row['nll']:.4f}  perplexity {row['perplexity']:.3f}  "
                  f"({row['tokens']:.0f} tokens)")
    for name, row in report.get("answers", {}).get("conditions", {}).items():
        print(f"answers under {name}: {report['answers']['scorer']} {row['score']:.3f}")
    print(f"wrote {out / 'eval.json'} and {png}")
    return 0
