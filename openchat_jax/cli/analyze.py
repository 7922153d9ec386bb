"""`openchat-jax analyze representations --ckpt CKPT --data DATASET_DIR --out DIR`: the paper's Fig. 4,
mean-pooled last-layer representations per conversation, projected to 2-D and plotted by class,
with a linear probe's held-out accuracy and the silhouette score (openchat_jax/evaluate/representations.py)."""

from __future__ import annotations

import argparse

from openchat_jax.cli import Subparsers, add_command, add_command_group


def register(subparsers: Subparsers) -> None:
    analyses = add_command_group(subparsers, "analyze", "analyses of a trained model (representations: the paper's Fig. 4)",
                                 dest="analysis", metavar="ANALYSIS")
    rep = add_command(
        analyses, "representations", help="mean-pooled last-layer states by class: 2-D plot, linear probe, silhouette",
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
    from openchat_jax.evaluate.representations import analyze_representations

    result = analyze_representations(
        args.ckpt, args.data, args.out, split=args.split, condition=args.condition,
        max_conversations=args.max_conversations, max_per_class=args.max_per_class, projection=args.projection,
        probe_test_fraction=args.probe_test_fraction, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
    )
    print(f"{sum(result['conversations'].values())} conversations ({result['split']} split): linear probe held-out "
          f"accuracy {result['probe_test_accuracy']:.3f} (majority {result['majority_baseline']:.3f}), silhouette "
          f"{result['silhouette']:.3f}; {result['projection']} plot {args.out}/representations.png")
    return 0
