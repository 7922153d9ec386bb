"""The demo pipeline, per variant and seed, through the library functions a user calls:

    tasks.generate                      -> train.jsonl, test_prompts.jsonl, test_references.jsonl
    data.prepare.prepare(config.data)   (= `openchat-jax prepare`)
    train.loop.train(config)            (= `openchat-jax train`)
    infer: load_chat_model + read_prompts + run_prompts   (= `openchat-jax generate`), once per condition
    tasks.score_files                   exact match on the held-out split

Variants (the paper's Table 2 ablation; every one gets the same steps, batch and seeds):
    sft_all        one plain template, every token weight 1.0, all data
    sft_expert     one plain template, weight 1.0, expert conversations only (the others are
                   skipped by the label map: a counted skip in report.json, as for a user)
    no_weights     C-RLFT without the coarse rewards: class conditions, every weight 1.0
    no_conditions  C-RLFT without the class-conditioned policy: plain template, weights 1.0 / 0.1
    crlft          both ingredients

Seed s draws the data (questions, sources, slips) and the model's initial weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from openchat_jax.demo import tasks
from openchat_jax.demo.tokenizer import build_demo_tokenizer
from openchat_jax.errors import ConfigError

Log = Callable[[str], None]
PLAIN = "plain"  # the condition name reported for variants trained without class conditions


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    title: str
    conditioned: bool
    weighted: bool
    expert_only: bool = False


VARIANTS = {
    v.key: v
    for v in (
        Variant("sft_all", "SFT, all data", conditioned=False, weighted=False),
        Variant("sft_expert", "SFT, expert data only", conditioned=False, weighted=False, expert_only=True),
        Variant("no_weights", "C-RLFT w/o coarse-grained rewards", conditioned=True, weighted=False),
        Variant("no_conditions", "C-RLFT w/o class-conditioned policy", conditioned=False, weighted=True),
        Variant("crlft", "C-RLFT", conditioned=True, weighted=True),
    )
}
DEFAULT_VARIANTS = ("sft_all", "crlft")
ABLATION_VARIANTS = ("sft_all", "sft_expert", "no_weights", "no_conditions", "crlft")


@dataclasses.dataclass
class RunResult:
    variant: str
    seed: int
    # condition name ("expert", "suboptimal", or "plain") -> tasks.score_files(...) dict
    accuracy: dict[str, dict[str, float]]
    history: list[dict[str, float]]  # logged train scalars (step, loss, class/<name>/loss, ...)
    steps: int
    prepare_seconds: float
    train_seconds: float
    generate_seconds: float
    workdir: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def task_spec(config: ml_collections.ConfigDict, seed: int) -> tasks.TaskSpec:
    d = config.demo
    return tasks.TaskSpec(
        num_train=d.num_train, num_test=d.num_test, min_length=d.min_length, max_length=d.max_length,
        expert_fraction=d.expert_fraction, slip_rate=d.slip_rate, slip=d.slip, slip_digit=d.slip_digit, seed=seed,
    )


def tokenizer_words(config: ml_collections.ConfigDict) -> list[str]:
    from openchat_jax.data.template import ROLE_NAMES

    conditions = [c["condition"] for c in config.data.classes]
    words = [w for c in conditions for w in c.split()] + list(ROLE_NAMES.values()) + tasks.vocabulary_words()
    return list(dict.fromkeys(words))


def variant_config(
    config: ml_collections.ConfigDict,
    variant: Variant,
    *,
    seed: int,
    train_file: str | Path,
    tokenizer_dir: str | Path,
    dataset_dir: str | Path,
    workdir: str | Path,
) -> ml_collections.ConfigDict:
    """The full run config for one variant: what a user would write for `prepare` + `train`."""
    cfg = copy.deepcopy(config)
    cfg.seed = seed
    cfg.workdir = str(workdir)
    cfg.data.files = [str(train_file)]
    cfg.data.tokenizer = str(tokenizer_dir)
    cfg.data.dataset_dir = str(dataset_dir)
    cfg.data.conditioned = variant.conditioned  # also train.conditioned (one reference)
    cfg.train.weighted = variant.weighted
    if variant.expert_only:
        expert = [c for c in cfg.data.classes if c["name"] == tasks.EXPERT]
        if not expert:
            raise ConfigError(f"data.classes has no class named {tasks.EXPERT!r} for the expert-only variant")
        cfg.data.classes = expert
        cfg.data.label_map = {}
        cfg.data.default_class = ""  # sub-optimal records: counted skips
    return cfg


def _dataset_key(variant: Variant) -> str:
    return ("conditioned" if variant.conditioned else "plain") + ("_expert_only" if variant.expert_only else "")


def _evaluate(final_dir: str, dataset_dir: str, data: tasks.DemoData, out_dir: Path,
              config: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
    from openchat_jax.infer.classes import read_classes
    from openchat_jax.infer.engine import load_chat_model
    from openchat_jax.infer.prompts import read_prompts, run_prompts

    records = read_prompts(data.test_prompts)
    model = load_chat_model(final_dir)
    accuracy: dict[str, dict[str, float]] = {}
    seen_conditions: set[str] = set()
    for conv_class in read_classes(dataset_dir):
        if conv_class.condition in seen_conditions:
            continue  # unconditioned: every class has the plain template; generate once
        seen_conditions.add(conv_class.condition)
        name = conv_class.name if conv_class.condition else PLAIN
        answers = out_dir / f"answers_{name}.jsonl"
        run_prompts(model, records, conv_class, answers, max_new_tokens=config.demo.max_new_tokens,
                    batch_size=config.demo.generate_batch_size, progress=False, model_id="demo")
        accuracy[name] = tasks.score_files(answers, data.test_references)
    return accuracy


def run_variant(
    config: ml_collections.ConfigDict,
    variant: Variant,
    seed: int,
    data: tasks.DemoData,
    tokenizer_dir: Path,
    seed_dir: Path,
    log: Log = print,
    prepared: set[Path] | None = None,
) -> RunResult:
    """One variant on one seed's data. `prepared`: dataset folders already prepared by this demo run
    (variants with the same template share one); None prepares anyway."""
    import jax

    from openchat_jax.data.prepare import prepare
    from openchat_jax.train.loop import build_run, train

    workdir = seed_dir / variant.key
    dataset_dir = seed_dir / "prepared" / _dataset_key(variant)
    cfg = variant_config(config, variant, seed=seed, train_file=data.train, tokenizer_dir=tokenizer_dir,
                         dataset_dir=dataset_dir, workdir=workdir)
    t0 = time.perf_counter()
    if prepared is None or dataset_dir not in prepared:
        report = prepare(cfg.data, overwrite=True)  # an older demo run's dataset is replaced
        log(f"  prepared {dataset_dir.name}: {report['examples']} conversations "
            f"({report['skipped']} skipped by the label map), {report['totals']['tokens']} tokens")
        if prepared is not None:
            prepared.add(dataset_dir)
    t1 = time.perf_counter()
    # One device: the model is tiny, sharding it would only add communication.
    run = build_run(cfg, devices=jax.local_devices()[:1])
    result = train(cfg, run=run, say=lambda line: log(f"    {line}"))
    t2 = time.perf_counter()
    accuracy = _evaluate(result.final_dir, str(dataset_dir), data, workdir, cfg)
    t3 = time.perf_counter()
    history = [{k: v for k, v in h.items() if k == "step" or k == "loss" or k.startswith("class/")}
               for h in result.history]
    out = RunResult(variant=variant.key, seed=seed, accuracy=accuracy, history=history, steps=result.steps_done,
                    prepare_seconds=round(t1 - t0, 2), train_seconds=round(t2 - t1, 2),
                    generate_seconds=round(t3 - t2, 2), workdir=str(workdir))
    (workdir / "result.json").write_text(json.dumps(out.to_dict(), indent=1))
    accs = ", ".join(f"{k} {100 * v['exact_match']:.1f}%" for k, v in accuracy.items())
    log(f"  {variant.key:<14} seed {seed}: exact match {accs}  "
        f"(train {t2 - t1:.0f}s for {result.steps_done} steps, generate {t3 - t2:.1f}s)")
    return out


def run_demo(
    config: ml_collections.ConfigDict,
    out_dir: str | Path,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seeds: Sequence[int] = (0,),
    log: Log = print,
) -> list[RunResult]:
    """Every (seed, variant) run; writes OUT/results.json. The table and plot come from report.py."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown demo variant(s) {unknown}; known: {list(VARIANTS)}")
    if not seeds:
        raise ConfigError("the demo needs at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_demo_tokenizer(out_dir / "tokenizer", tokenizer_words(config))
    results: list[RunResult] = []
    prepared: set[Path] = set()  # prepared in this call (an older one may hold other data)
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        spec = task_spec(config, seed)
        data = tasks.generate(spec, seed_dir / "data")
        c = data.counts
        log(f"seed {seed}: {c['expert']['conversations']} expert + {c['suboptimal']['conversations']} sub-optimal "
            f"conversations ({c['suboptimal']['wrong']} sub-optimal answers wrong by the slip {spec.slip!r}), "
            f"{c['test']['questions']} held-out questions")
        for key in variants:
            results.append(run_variant(config, VARIANTS[key], seed, data, tokenizer_dir, seed_dir, log, prepared))
            (out_dir / "results.json").write_text(json.dumps(
                {"config": config.to_dict(), "results": [r.to_dict() for r in results]}, indent=1, default=str))
    return results
