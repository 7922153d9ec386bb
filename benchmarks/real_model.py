"""SFT (all data), SFT (expert data only) and C-RLFT on SmolLM2-135M-Instruct at the same budget,
through the command line a user types: convert hf-to-jax --add-eot -> prepare -> train -> generate,
then the per-class training loss curves of every method in one PNG.

    python -m openchat_jax.hf.smollm2 --out runs/real/smollm2_hf
    python benchmarks/real_model_data.py --hf-dir runs/real/smollm2_hf --out runs/real/data
    python benchmarks/real_model.py [--methods sft_all,sft_expert,crlft] [--steps 200] [--config.key=value ...]

The methods are the paper's ablation variants as openchat_jax/demo/run.py defines them
(`VARIANTS`: whether classes are conditioned, whether the class weights apply, expert data only),
applied as overrides of configs/smollm2_crlft.py. Every method gets the same steps, batch, lr and
seed. Each command's wall time goes to OUT/timings.json; the commands themselves are printed.
Extra `--config.key=value` items go to prepare and train of every method.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openchat_jax.config import load_config, split_config_args  # noqa: E402
from openchat_jax.demo.run import VARIANTS, Variant  # noqa: E402

CONFIG = REPO / "configs" / "smollm2_crlft.py"
METHODS = ("sft_all", "sft_expert", "crlft")
EXPERT_CLASS = "expert"


def method_overrides(variant: Variant, runs: Path, base_classes: list[dict]) -> list[str]:
    """The --config overrides that turn configs/smollm2_crlft.py into `variant`."""
    dataset = ("conditioned" if variant.conditioned else "plain") + ("_expert_only" if variant.expert_only else "")
    out = [
        f"--config.workdir={runs / variant.key}",
        f"--config.data.dataset_dir={runs / 'prepared' / dataset}",
        f"--config.data.conditioned={variant.conditioned}",
        f"--config.train.weighted={variant.weighted}",
    ]
    if variant.expert_only:
        expert = [c for c in base_classes if c["name"] == EXPERT_CLASS]
        out += [f"--config.data.classes={expert!r}", "--config.data.default_class=''"]
    return out


def run(cmd: list[str], timings: dict[str, float], key: str, log: Path) -> None:
    """Run `cmd`, its output appended to `log`; its wall time goes to timings[key] and to
    timings.json next to the log, written before a failure stops the script."""
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    timings[key] = round(time.perf_counter() - t0, 1)
    (log.parent / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"  {key}: {timings[key]:.1f}s (exit {result.returncode}; log {log})", flush=True)
    if result.returncode:
        raise SystemExit(f"{key} failed: see {log}")


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_class_losses(runs: Path, methods: list[str], out: Path, window: int = 10) -> None:
    """Training loss per class, each logged step as a dot and their moving mean over `window` as a line
    (a step whose batch has no token of a class has no point for it), one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.5), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = read_metrics(runs / method)
        names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("class/") and k.endswith("/loss")})
        for name in names:
            pts = [(r["step"], r[f"class/{name}/loss"]) for r in rows if f"class/{name}/loss" in r]
            steps, losses = np.array(pts).T
            k = min(window, len(losses))
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            line, = ax.plot(steps[k - 1:], smooth, label=name)
            ax.plot(steps, losses, ".", color=line.get_color(), alpha=0.3, markersize=3)  # every logged step
        ax.set_title(VARIANTS[method].title)
        ax.set_xlabel("step")
        ax.legend()
    axes[0][0].set_ylabel(f"train loss per class (mean of {window} steps)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_config_args(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "real", help="folder of the HF model, data and runs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=200, help="train steps per method")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--generate-batch-size", type=int, default=25)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="skip a method's prepare / train / generate whose output an earlier run left complete")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(VARIANTS)}")

    runs = args.runs.resolve()
    cli = [str(Path(sys.executable).parent / "openchat-jax")]  # the console script of this environment
    log = runs / "real_model.log"
    timings_file = runs / "timings.json"  # written by run()
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    weights = runs / "smollm2_jax"
    if not (weights / "model_config.json").is_file():
        run(cli + ["convert", "hf-to-jax", "--hf-dir", str(runs / "smollm2_hf"), "--out", str(weights), "--add-eot"],
            timings, "convert", log)

    base = load_config(CONFIG, overrides)
    common = [f"--config.init_from={weights}", f"--config.data.tokenizer={weights / 'tokenizer'}",
              f"--config.data.files={[str(runs / 'data' / 'train.jsonl')]!r}", f"--config.train.num_steps={args.steps}",
              *overrides]
    for method in methods:
        config_args = ["--config", str(CONFIG), *common, *method_overrides(VARIANTS[method], runs, list(base.data.classes))]
        dataset = Path(next(a for a in config_args if a.startswith("--config.data.dataset_dir=")).split("=", 1)[1])
        final, answers = runs / method / "final", runs / method / "answers.jsonl"
        if not (args.resume and (dataset / "report.json").is_file()):
            run(cli + ["prepare", *config_args, "--overwrite"], timings, f"{method}/prepare", log)
        if not (args.resume and (final / "model_config.json").is_file()):
            run(cli + ["train", *config_args], timings, f"{method}/train", log)
        if not args.skip_generate and not (args.resume and answers.is_file()):
            # The expert class's prefix (the highest weight); the plain template when unconditioned.
            run(cli + ["generate", "--ckpt", str(final), "--classes-from", str(dataset),
                       "--prompts", str(runs / "data" / "heldout_prompts.jsonl"), "--out", str(answers),
                       "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.generate_batch_size),
                       "--no-progress"],
                timings, f"{method}/generate", log)
    plot_class_losses(runs, methods, runs / "class_losses.png")
    print(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
