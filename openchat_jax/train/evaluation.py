"""Held-out evaluation on the training mesh: loss and token accuracy per class, per condition.

The prepared held-out split (data/eval_split.py) holds every held-out conversation rendered under
each distinct class condition. Each rendering is packed once (first-fit decreasing, no shuffle)
into rows of the training sequence length, split into batches of the training micro-batch's row
count and placed on the mesh with the batch sharding; a jitted step adds one batch's sums
(loss.Sums: weighted CE, weights, per-class CE / weight / supervised tokens / top-1 hits) to a
running total. Every batch has the same shape, so the step compiles once for all calls.

Scores use the dataset's class weights whatever `train.weighted` says, so runs with and without
the weights report the same quantity. Within a class every supervised token has the same weight,
so a class's weighted NLL is the plain mean NLL of its supervised tokens.

Training (`train.eval_every > 0`) logs, at every `eval_every` steps and at the last step:
  eval/loss, eval/accuracy                  all classes, each under its own condition
  eval/class/<c>/{loss,accuracy}            class c under its own condition
  eval/expert_condition/<c>/{loss,accuracy} class c under the expert class's condition
  eval/seconds                              wall time of this evaluation (the first includes compiling)
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from openchat_jax.data.loader import BATCH_KEYS
from openchat_jax.data.eval_split import EvalVariant, load_eval_split
from openchat_jax.data.loader import pack_rows
from openchat_jax.data.packing import plan_epoch
from openchat_jax.errors import ConfigError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import bind, param_shardings
from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES, Rules, use_rules
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train.config import RunConfig
from openchat_jax.train.loss import Sums, head_loss_sums, zero_sums

EVAL_PREFIX = "eval/"


def eval_sums(params: Any, model_cfg: LlamaConfig, batch: Mapping[str, jax.Array], num_classes: int,
              loss_chunk_length: int = 0) -> Sums:
    """loss.Sums of one batch (forward only; the LM head applied chunk by chunk)."""
    from openchat_jax.train.step import gather_embedding

    model = bind(gather_embedding(params), model_cfg)
    x = model(batch["tokens"], batch["positions"], batch["segment_ids"], head=False).hidden
    return head_loss_sums(x, model.head_weight().astype(model_cfg.compute_dtype), batch["targets"],
                          batch["weights"].astype(np.float32), batch["class_ids"], num_classes,
                          loss_chunk_length, True)


@functools.lru_cache(maxsize=8)
def make_eval_step(model_cfg: LlamaConfig, mesh: Mesh, num_classes: int, loss_chunk_length: int = 0,
                   rules: Rules = LOGICAL_AXIS_RULES):
    """jit((params, batch, totals) -> totals + this batch's sums); the totals are donated."""
    def step(params, batch, totals):
        with use_rules(mesh, rules):
            sums = eval_sums(params, model_cfg, batch, num_classes, loss_chunk_length)
        return jax.tree.map(lambda a, b: a + b, totals, sums)

    rep = mesh_lib.replicated(mesh)
    return jax.jit(step, in_shardings=(param_shardings(model_cfg, mesh, rules), mesh_lib.batch_sharding(mesh), rep),
                   out_shardings=rep, donate_argnums=(2,))


def local_batches(variant: EvalVariant, *, rows: int, seq_len: int, pad_id: int, process_index: int = 0,
                  process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's part of every batch of `rows` global rows (the last one filled with empty rows)."""
    lengths = variant.lengths
    if int(lengths.max()) > seq_len:
        raise ConfigError(f"the held-out split has a {int(lengths.max())}-token conversation, longer than the "
                          f"sequence length {seq_len}; prepare with data.max_length <= {seq_len}")
    if rows % process_count:
        raise ConfigError(f"{rows} rows per eval batch cannot be split over {process_count} processes")
    plan = plan_epoch(lengths, seq_len, seed=0, epoch=0, shuffle=False)
    local = rows // process_count
    out = []
    for first in range(0, plan.num_rows, rows):
        mine = range(first + process_index * local, first + (process_index + 1) * local)
        packed = [[{"tokens": variant.tokens[i], "weights": variant.weights[i], "class_id": variant.class_ids[i]}
                   for i in plan.row(r).tolist()] if r < plan.num_rows else [] for r in mine]
        out.append(pack_rows(packed, seq_len, pad_id))
    return out


class HeldOutEval:
    """Per-class sums of the held-out split under each of its conditions, on `mesh`."""

    def __init__(self, dataset_dir: str | Path, info: Mapping[str, Any], model_cfg: LlamaConfig, mesh: Mesh, *,
                 rows: int, seq_len: int, loss_chunk_length: int = 0, variants: Sequence[str] | None = None,
                 rules: Rules = LOGICAL_AXIS_RULES):
        self.classes = [dict(c) for c in info["classes"]]
        self.class_names = [c["name"] for c in self.classes]
        self.expert = max(self.classes, key=lambda c: c["weight"])["name"]
        every = load_eval_split(dataset_dir, dict(info))
        if variants is not None:
            unknown = [v for v in variants if v not in {x.name for x in every}]
            if unknown:
                raise ConfigError(f"held-out split of {dataset_dir}: no rendering named {unknown}; "
                                  f"it has {[v.name for v in every]}")
            every = [v for v in every if v.name in variants]
        self.variants = every
        self.num_conversations = len(every[0].tokens) if every else 0
        self.mesh = mesh
        pad_id = int(info.get("pad_id", 0))
        self._batches = {
            v.name: [mesh_lib.global_batch(b, mesh, BATCH_KEYS)
                     for b in local_batches(v, rows=rows, seq_len=seq_len, pad_id=pad_id,
                                            process_index=jax.process_index(), process_count=jax.process_count())]
            for v in self.variants
        }
        self.step = make_eval_step(model_cfg, mesh, len(self.class_names), loss_chunk_length, tuple(rules))

    def sums(self, params: Any) -> dict[str, dict[str, np.ndarray]]:
        """{rendering name: host loss.Sums} over the whole held-out split."""
        rep = mesh_lib.replicated(self.mesh)
        out = {}
        for name, batches in self._batches.items():
            # one buffer per leaf (zero_sums shares its zeros between keys, and the totals are donated)
            totals = jax.device_put(jax.tree.map(np.array, zero_sums(len(self.class_names))), rep)
            for batch in batches:
                totals = self.step(params, batch, totals)
            out[name] = totals
        return jax.device_get(out)

    def condition_of(self, class_name: str) -> str:
        """The rendering that uses `class_name`'s condition."""
        condition = next(c["condition"] for c in self.classes if c["name"] == class_name)
        return next(v.name for v in self.variants if v.condition == condition)

    def table(self, params: Any) -> dict[str, dict[str, dict[str, float]]]:
        """{rendering: {class: {nll, perplexity, accuracy, tokens}}}: every class under every condition."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, s in self.sums(params).items():
            out[name] = {}
            for c, cname in enumerate(self.class_names):
                tokens = float(s["class_tokens"][c])
                if tokens == 0:
                    continue
                nll = float(s["class_wce"][c] / s["class_weight"][c])
                out[name][cname] = {"nll": nll, "perplexity": math.exp(nll),
                                    "accuracy": float(s["class_correct"][c] / tokens), "tokens": tokens}
        return out

    def scalars(self, params: Any) -> dict[str, float]:
        """The training log's eval/* scalars (module docstring)."""
        sums = self.sums(params)
        own = {n: sums[self.condition_of(n)] for n in self.class_names}
        expert = sums[self.condition_of(self.expert)]
        out: dict[str, float] = {}
        wce = weight = correct = tokens = 0.0
        for c, name in enumerate(self.class_names):
            s = own[name]
            wce, weight = wce + float(s["class_wce"][c]), weight + float(s["class_weight"][c])
            correct, tokens = correct + float(s["class_correct"][c]), tokens + float(s["class_tokens"][c])
            for prefix, t in ((f"{EVAL_PREFIX}class/{name}/", s), (f"{EVAL_PREFIX}expert_condition/{name}/", expert)):
                if t["class_tokens"][c] > 0:
                    out[prefix + "loss"] = float(t["class_wce"][c] / t["class_weight"][c])
                    out[prefix + "accuracy"] = float(t["class_correct"][c] / t["class_tokens"][c])
        out[EVAL_PREFIX + "loss"] = wce / weight
        out[EVAL_PREFIX + "accuracy"] = correct / tokens
        return out


class EvalHook:
    """`train.eval_every`: when the loop evaluates, and what it records."""

    def __init__(self, evaluator: HeldOutEval, every: int, total_steps: int):
        self.evaluator, self.every, self.total_steps = evaluator, every, total_steps

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def __call__(self, step: int, params: Any, writer: Any) -> dict[str, float]:
        start = time.perf_counter()
        scalars = self.evaluator.scalars(params)
        scalars[EVAL_PREFIX + "seconds"] = time.perf_counter() - start  # the first call includes the compile
        writer.write(step, scalars)
        return {"step": step, **scalars}


def make_eval_hook(config: RunConfig, info: Mapping[str, Any], model_cfg: LlamaConfig, mesh: Mesh,
                   total_steps: int, loss_chunk_length: int = 0) -> EvalHook | None:
    """The hook for `config.train.eval_every` (None when 0); fails here, before training, when the
    dataset has no held-out split."""
    every = config.train.eval_every
    if every == 0:
        return None
    rows = config.train.global_batch_size // config.train.micro_batches
    evaluator = HeldOutEval(config.data.dataset_dir, info, model_cfg, mesh, rows=rows,
                            seq_len=config.data.max_length, loss_chunk_length=loss_chunk_length)
    return EvalHook(evaluator, every, total_steps)
