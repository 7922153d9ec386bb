"""`openchat-jax analyze representations --ckpt CKPT --data DATASET_DIR --out DIR`: the paper's Fig. 4,
mean-pooled last-layer representations per conversation, projected to 2-D and plotted by class,
with a linear probe's held-out accuracy and the silhouette score (openchat_jax/evaluate/representations.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="analyses of a trained model (representations: the paper's Fig. 4)")
    analyses = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    rep = analyses.add_parser(
        "representations", help="mean-pooled last-layer states by class: 2-D plot, linear probe, silhouette",
        description="Embeds each conversation of a prepared dataset as the mean of the model's last-layer "
                    "hidden states over its tokens, plots a 2-D projection (UMAP if umap-learn is installed, "
                    "else PCA) coloured by class, and reports the held-out accuracy of a linear probe for the "
                    "class and the silhouette score. Writes OUT/representations.{json,png} and OUT/embeddings.npz.")
    rep.add_argument("--ckpt", required=True, help="weights folder (training's final/ or convert hf-to-jax)")
    rep.add_argument("--data", required=True, help="prepared dataset folder")
    rep.add_argument("--out", required=True, help="output folder")
    rep.add_argument("--split", choices=("eval", "train"),
                     help="held-out split (default when the dataset has one) or the training set")
    rep.add_argument("--condition", help="held-out split only: render every conversation with this class's "
                     "condition (default: each with its own)")
    rep.add_argument("--max-conversations", type=int, default=2000, help="random subset size (0 = all)")
    rep.add_argument("--max-per-class", type=int, default=0,
                     help="at most this many conversations of each class (0 = no cap), e.g. to balance the classes")
    rep.add_argument("--projection", choices=("auto", "umap", "pca"), default="auto")
    rep.add_argument("--probe-test-fraction", type=float, default=0.3)
    rep.add_argument("--batch-size", type=int, default=16)
    rep.add_argument("--seed", type=int, default=0, help="subset, probe split and UMAP seed")
    rep.add_argument("--dtype", help="compute dtype, e.g. float32 (default: the checkpoint's)")
    rep.set_defaults(func=run_representations)


def run_representations(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import jax
    import numpy as np

    from openchat_jax.data.prepare import load_dataset_info
    from openchat_jax.errors import ConfigError
    from openchat_jax.evaluate import representations as rep
    from openchat_jax.evaluate.checkpoint import check_vocabulary
    from openchat_jax.model import checkpoint_io

    if not 0 < args.probe_test_fraction < 1:
        raise ConfigError(f"--probe-test-fraction must be in (0, 1), got {args.probe_test_fraction}")
    info = load_dataset_info(args.data)
    split = args.split or ("eval" if info.get("eval") else "train")
    tokens, class_ids = rep.load_conversations(args.data, info, split=split, condition=args.condition,
                                               max_conversations=args.max_conversations,
                                               max_per_class=args.max_per_class, seed=args.seed)
    names = [c["name"] for c in info["classes"]]
    params, cfg = checkpoint_io.load_params(args.ckpt)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    check_vocabulary(cfg, info, args.ckpt, args.data)
    x = rep.embed(jax.device_put(params), cfg, tokens, seq_len=int(info["max_length"]), batch_size=args.batch_size,
                  pad_id=int(info.get("pad_id", 0)))
    labels = [names[k] for k in class_ids.tolist()]
    coords, method = rep.project_2d(x, args.projection, args.seed)
    result = {
        "ckpt": args.ckpt, "data": args.data, "split": split, "condition": args.condition or "own",
        "conversations": {n: labels.count(n) for n in names if n in labels},
        "embedding": "mean over each conversation's tokens of the last-layer hidden states (after the final norm)",
        "projection": method,
        **rep.probe_accuracy(x, class_ids, test_fraction=args.probe_test_fraction, seed=args.seed),
        "silhouette": rep.silhouette(x, class_ids),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "embeddings.npz", embeddings=x, class_ids=class_ids, labels=np.asarray(labels), coords=coords)
    (out / "representations.json").write_text(json.dumps(result, indent=1))
    title = (f"{Path(args.ckpt.rstrip('/')).name}: {method.upper()} of mean-pooled last-layer states\n"
             f"probe acc {result['probe_test_accuracy']:.3f}, silhouette {result['silhouette']:.3f}")
    png = rep.plot([(coords, labels, title)], out / "representations.png")
    print(f"{sum(result['conversations'].values())} conversations ({split} split): linear probe held-out accuracy "
          f"{result['probe_test_accuracy']:.3f} (majority {result['majority_baseline']:.3f}), "
          f"silhouette {result['silhouette']:.3f}; {method} plot {png}")
    return 0
