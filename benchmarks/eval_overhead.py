"""What held-out evaluation during training (`train.eval_every`) adds to the demo's train time.

The demo's C-RLFT run (openchat_jax/demo/config.py: tiny Llama, 8 x 128-token rows per step, one
CPU device), on seed 0's data prepared with a held-out split (`data.eval_fraction`), trained
alternately without eval and with `train.eval_every=100` (each eval scores the split under both
conditions; the last step is evaluated too). Time = build_run + train (compilations included), the
final weights not saved. Prints every run, the medians, and the time spent inside the evaluations
(`eval/seconds`) as a share of their run: on a shared machine the difference of two runs' totals
is noisier than the part being measured.

    python benchmarks/eval_overhead.py [--steps 1000] [--repeats 3] [--eval-fraction 0.05] [--out runs/eval_overhead]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (without eval, with eval)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--out", default="runs/eval_overhead")
    args = parser.parse_args()

    import jax

    from openchat_jax.data.prepare import prepare
    from openchat_jax.demo import tasks
    from openchat_jax.demo.config import get_config
    from openchat_jax.demo.run import VARIANTS, task_spec, tokenizer_words, variant_config
    from openchat_jax.demo.tokenizer import build_demo_tokenizer
    from openchat_jax.train.evaluation import make_eval_step
    from openchat_jax.train.loop import build_run, train

    out = Path(args.out)
    config = get_config()
    config.train.num_steps = args.steps
    config.train.progress = False
    data = tasks.generate(task_spec(config, 0), out / "data")
    tokenizer = build_demo_tokenizer(out / "tokenizer", tokenizer_words(config))
    base = variant_config(config, VARIANTS["crlft"], seed=0, train_file=data.train, tokenizer_dir=tokenizer,
                          dataset_dir=out / "prepared", workdir=out / "run")
    base.data.eval_fraction = args.eval_fraction
    with contextlib.redirect_stdout(io.StringIO()):
        report = prepare(base.data)
    ev = report["eval"]
    print(f"demo data: {report['examples']} training conversations, {ev['conversations']} held out "
          f"({ev['classes']}); {args.steps} steps; eval every {args.eval_every} steps")

    times: dict[int, list[float]] = {0: [], args.eval_every: []}
    inside: list[float] = []  # eval seconds / run seconds, measured within each run with eval
    for repeat in range(args.repeats):
        for every in (0, args.eval_every):
            jax.clear_caches()  # every run compiles as a fresh process would
            make_eval_step.cache_clear()
            cfg = base.copy_and_resolve_references()
            cfg.train.eval_every = every
            cfg.workdir = str(out / f"run_{repeat}_{every}")
            start = time.perf_counter()
            run = build_run(cfg, devices=jax.local_devices()[:1])
            result = train(cfg, run=run, save_final=False)
            seconds = time.perf_counter() - start
            times[every].append(seconds)
            evals = [e["eval/seconds"] for e in result.eval_history]
            if evals:
                inside.append(sum(evals) / seconds)
            print(f"  repeat {repeat}: eval_every={every:<4} {seconds:7.1f} s" + (
                f"  {len(evals)} evals: {sum(evals):.2f} s in all (first, with its compile, {evals[0]:.2f} s), "
                f"final eval/loss {result.eval_history[-1]['eval/loss']:.4f}" if evals else ""), flush=True)
    without, with_eval = statistics.median(times[0]), statistics.median(times[args.eval_every])
    print(f"median train time: without eval {without:.1f} s, with eval_every={args.eval_every} {with_eval:.1f} s, "
          f"difference {100 * (with_eval / without - 1):+.1f}%")
    print(f"time inside the evaluations, share of the runs with eval (median): {100 * statistics.median(inside):.2f}%")


if __name__ == "__main__":
    main()
