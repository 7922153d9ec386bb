"""`openchat-jax eval`: a checkpoint on a prepared dataset's held-out split, per class and condition.

Likelihood (the paper's Fig. 5 by likelihood): for every rendering of the held-out split (each
class condition, see data/eval_split.py) and every class, the mean NLL of the class's supervised
tokens and its perplexity, computed by train/evaluation.py's HeldOutEval, the same code that
scores the split during training.

Answers (optional, `--prompts FILE`): a generate-format JSONL prompts file (infer/prompts.py) whose
every record also carries "reference"; each record is answered greedily under each condition and
its last answer scored against the reference: exact match after stripping surrounding whitespace,
or a user scorer `module:function` called as `function(answer: str, reference) -> float | bool`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from openchat_jax.data.template import ConvClass
from openchat_jax.errors import ConfigError, DataError

Scorer = Callable[[str, Any], Any]


def check_vocabulary(cfg: Any, info: Mapping[str, Any], ckpt: str, data: str) -> None:
    """A token id past the model's vocabulary would be clamped silently by the embedding lookup."""
    if cfg.vocab_size < int(info.get("vocab_size", 0)):
        raise ConfigError(f"{ckpt}: the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's of "
                          f"{data} ({info['vocab_size']}): this dataset was not prepared for this model")


def select_renderings(variants: Sequence[Any], conditions: Sequence[str] | None) -> list[str]:
    """Rendering names for `--conditions`: each item is a class name or a condition text."""
    if not conditions:
        return [v.name for v in variants]
    out = []
    for item in conditions:
        match = next((v.name for v in variants if item in (v.name, v.condition)), None)
        if match is None:
            known = ", ".join(f"{v.name} ({v.condition or 'plain'})" for v in variants)
            raise ConfigError(f"--conditions {item!r}: the held-out split has no such class or condition; "
                              f"it was rendered under: {known}")
        if match not in out:
            out.append(match)
    return out


def exact_match(answer: str, reference: Any) -> bool:
    return answer.strip() == str(reference).strip()


def load_scorer(spec: str | None) -> tuple[str, Scorer]:
    """(name, function) for `--scorer module:function`; exact match when None."""
    if not spec:
        return "exact_match", exact_match
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--scorer {spec!r}: expected module:function, e.g. my_scores:contains_answer")
    if os.getcwd() not in sys.path:  # a console script's path does not hold the current directory
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--scorer {spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"--scorer {spec!r} is not callable")
    return spec, fn


def read_references(path: str | Path) -> list[Any]:
    """The "reference" of every record of a prompts file, in record order."""
    refs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = json.loads(line)  # read_prompts has already validated the file
            if "reference" not in obj:
                raise DataError(f"{path}:{lineno}: field 'reference' is missing (needed to score the answer)")
            refs.append(obj["reference"])
    return refs


def score_answers(model: Any, prompts_path: str | Path, classes: Sequence[ConvClass], out_dir: Path, *,
                  scorer_spec: str | None = None, max_new_tokens: int = 512, batch_size: int = 16,
                  progress: bool = False) -> dict[str, Any]:
    """Answers under each class's condition (OUT/answers_<class>.jsonl) and their mean score."""
    from openchat_jax.infer.prompts import read_prompts, run_prompts

    records = read_prompts(prompts_path)
    references = read_references(prompts_path)
    name, scorer = load_scorer(scorer_spec)
    out: dict[str, Any] = {"scorer": name, "prompts": str(prompts_path), "records": len(records), "conditions": {}}
    for conv_class in classes:
        path = out_dir / f"answers_{conv_class.name}.jsonl"
        run_prompts(model, records, conv_class, path, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress, model_id="eval")
        answers = [json.loads(line)["answers"][-1] for line in path.read_text(encoding="utf-8").splitlines()]
        scores = [float(scorer(a, r)) for a, r in zip(answers, references)]
        out["conditions"][conv_class.name] = {"condition": conv_class.condition, "score": sum(scores) / len(scores),
                                              "answers": str(path)}
    return out


def evaluate_checkpoint(ckpt: str, data: str, out_dir: str | Path, *, conditions: Sequence[str] | None = None,
                        mesh: Any = None, rules: Any = None, batch_size: int = 8, dtype: str | None = None,
                        prompts: str | None = None, scorer: str | None = None, max_new_tokens: int = 512,
                        tokenizer: str | None = None) -> dict[str, Any]:
    """The whole `eval` command (module docstring): returns the report, also written with its plot
    to OUT/eval.json and OUT/eval.png. No mesh: one device."""
    import jax

    from openchat_jax.data.eval_split import load_eval_split
    from openchat_jax.data.prepare import load_dataset_info
    from openchat_jax.model import checkpoint_io
    from openchat_jax.model.llama import param_shardings
    from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES
    from openchat_jax.train import mesh as mesh_lib
    from openchat_jax.train.evaluation import HeldOutEval

    info = load_dataset_info(data)
    names = select_renderings(load_eval_split(data, info), [c.strip() for c in conditions] if conditions else None)
    if prompts:  # a bad prompts file or scorer fails before the model loads
        from openchat_jax.infer.prompts import read_prompts

        read_prompts(prompts)
        read_references(prompts)
        load_scorer(scorer)
    if mesh is None:
        mesh, rules = mesh_lib.make_mesh({"fsdp": -1}, jax.local_devices()[:1]), LOGICAL_AXIS_RULES
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if batch_size < 1 or batch_size % mesh_lib.batch_axis_size(mesh):
        raise ConfigError(f"--batch-size {batch_size} must be a positive multiple of the mesh's batch devices "
                          f"({mesh_lib.batch_axis_size(mesh)})")
    model = None
    if prompts:
        from openchat_jax.infer.engine import load_chat_model

        model = load_chat_model(ckpt, tokenizer_path=tokenizer, mesh=mesh, rules=rules)
        params, cfg = model.params, model.cfg
    else:
        cfg = checkpoint_io.read_model_config(ckpt)
        params, cfg = checkpoint_io.load_params(ckpt, param_shardings(cfg, mesh, rules))
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    check_vocabulary(cfg, info, ckpt, data)
    evaluator = HeldOutEval(data, info, cfg, mesh, rows=batch_size, seq_len=int(info["max_length"]),
                            variants=names, rules=rules)
    report: dict[str, Any] = {
        "ckpt": ckpt, "data": data, "held_out_conversations": evaluator.num_conversations,
        "conditions": {v.name: v.condition for v in evaluator.variants},
        "likelihood": evaluator.table(params),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        classes = [ConvClass(v.name, v.condition, 1.0) for v in evaluator.variants]
        report["answers"] = score_answers(model, prompts, classes, out, scorer_spec=scorer,
                                          max_new_tokens=max_new_tokens)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "eval.png")
    return report


def plot(report: Mapping[str, Any], path: str | Path) -> Path:
    """Left: NLL of each class's held-out tokens under each condition; right (with answers): scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    likelihood = report["likelihood"]
    answers = report.get("answers")
    renderings = list(likelihood)
    classes = list(dict.fromkeys(c for r in likelihood.values() for c in r))
    fig, axes = plt.subplots(1, 2 if answers else 1, figsize=(11 if answers else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(renderings)
    for j, r in enumerate(renderings):
        xs = np.arange(len(classes)) + (j - (len(renderings) - 1) / 2) * width
        ax.bar(xs, [likelihood[r].get(c, {}).get("nll", np.nan) for c in classes], width,
               label=f"condition of {r} ({report['conditions'][r] or 'plain'})")
    ax.set_xticks(np.arange(len(classes)), [f"{c} conversations" for c in classes])
    ax.set_ylabel("NLL per supervised token (held out)")
    ax.set_title("Held-out likelihood by condition")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if answers:
        ax = axes[0][1]
        names = list(answers["conditions"])
        ax.bar(names, [answers["conditions"][n]["score"] for n in names], color="tab:green")
        ax.set_ylabel(f"mean score ({answers['scorer']})")
        ax.set_title(f"Answers to {answers['records']} prompts, by condition")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
