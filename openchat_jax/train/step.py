"""Train state and the jitted C-RLFT train step.

State layout (a plain dict, so orbax saves/restores it as is):
    {"step": int32 [] (batches consumed, including skipped ones),
     "params": the model params (float32, sharded by the rules table),
     "opt_state": optax state (sharded like the params; its count = updates applied),
     "rng": uint32 [2] key data (carried for checkpoints; the step itself is deterministic)}

One call = one optimizer step on a global batch [B, L]: the batch is split into `micro_batches`
interleaved micro-batches (micro-batch m takes rows m, m+M, m+2M, ..., so every device keeps
working on its own rows), gradients of sum(w * CE) / sum(w) are accumulated in a lax.scan with the
denominator taken over the whole batch up front, then clipped and applied. If the loss or the
gradient norm is not finite, params and optimizer state come back unchanged and `nonfinite` is 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from openchat_jax.data.loader import BATCH_KEYS
from openchat_jax.errors import ConfigError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import bind, init_params, param_shapes, param_shardings as model_param_shardings
from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES, Rules, constrain, use_rules
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train.config import RunConfig, TrainConfig
from openchat_jax.train.loss import (head_loss_sums, loss_sums, sums_to_metrics,
                                     token_weights, zero_sums)
from openchat_jax.train.optimizer import Schedule, make_optimizer, schedule_count

log = logging.getLogger(__name__)

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng}


def state_shardings(model_cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    p_shardings = model_param_shardings(model_cfg, mesh, rules)
    rep = mesh_lib.replicated(mesh)
    return {
        "step": rep,
        "params": p_shardings,
        "opt_state": mesh_lib.opt_state_shardings(tx, param_shapes(model_cfg), p_shardings, mesh),
        "rng": rep,
    }


def abstract_train_state(model_cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    shapes = jax.eval_shape(lambda p, r: make_state(p, tx, r), param_shapes(model_cfg), rng)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings(model_cfg, tx, mesh, rules)
    )


def init_train_state(
    model_cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    *,
    params: Any | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> TrainState:
    """Params (random from `seed`, or the given ones) and optimizer state, created directly in
    their shardings by jit out_shardings: no host ever holds a full copy."""
    rng = jax.random.key_data(jax.random.key(seed))
    if params is None:
        return _init_fn(model_cfg, tx, mesh, tuple(rules))(rng)
    return _from_params_fn(model_cfg, tx, mesh, tuple(rules))(params, rng)


def _init_compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    # Init runs once, and on CPU compiling its random-normal kernels dominates start-up unless LLVM
    # optimisation is off (docs/benchmarks.md); accelerators keep their defaults.
    return {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else None


@functools.lru_cache(maxsize=8)
def _init_fn(model_cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules):
    def create(rng_data: jax.Array) -> TrainState:
        return make_state(init_params(model_cfg, jax.random.wrap_key_data(rng_data)), tx, rng_data)

    return jax.jit(
        create, out_shardings=state_shardings(model_cfg, tx, mesh, rules), compiler_options=_init_compiler_options(mesh)
    )


@functools.lru_cache(maxsize=8)
def _from_params_fn(model_cfg: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules):
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    return jax.jit(lambda p, r: make_state(p, tx, r), in_shardings=(shardings["params"], None), out_shardings=shardings)


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[B, L] -> [M, B/M, L], micro-batch m = rows m, m+M, ... (a device-local reshape when each
    device holds a multiple of M rows)."""

    def split(x: jax.Array) -> jax.Array:
        B = x.shape[0]
        x = x.reshape(B // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "length"))

    return {k: split(v) for k, v in batch.items()}


def gather_embedding(params: Any) -> Any:
    """All-gather the embedding table's `embed` axis (as FSDP does for every weight before its
    matmul) before the token lookup. Left sharded, the lookup's output is split along `embed` and
    must be moved to the batch sharding, which the partitioner can only do by replicating the
    whole [B, L, E] activation ("involuntary full rematerialization")."""
    return dict(params, embed=constrain(params["embed"], ("vocab", None)))


def _where_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    num_classes: int,
    micro_batches: int = 1,
    weighted: bool = True,
    loss_normalization: str = "token",
    param_shardings: Any = None,
    fused_head: bool = True,
    loss_chunk_length: int = 0,
    skip_unsupervised_logits: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The un-jitted step (see module doc). Call under `use_rules` to shard activations.
    `fused_head`: the LM head is applied inside the loss (`loss.head_loss_sums`, chunks of
    `loss_chunk_length` positions, skipping the chunks that hold no supervised token when
    `skip_unsupervised_logits`); False differentiates logits -> `loss_sums` as written.
    `loss_normalization`: "token" or "message" (`loss.token_weights`)."""
    params = state["params"]
    batch = {k: batch[k] for k in BATCH_KEYS}
    batch["weights"] = token_weights(batch["weights"], weighted, loss_normalization)
    denominator = batch["weights"].sum()  # the whole step's sum(w), before any micro-batching

    def micro_loss(p: Any, mb: Batch) -> tuple[jax.Array, dict]:
        p = gather_embedding(p)
        model = bind(p, model_cfg)
        if fused_head:
            x = model(mb["tokens"], mb["positions"], mb["segment_ids"], head=False).hidden
            sums = head_loss_sums(x, model.head_weight().astype(model_cfg.compute_dtype), mb["targets"], mb["weights"],
                                  mb["class_ids"], num_classes, loss_chunk_length, skip_unsupervised_logits)
        else:
            logits = model(mb["tokens"], mb["positions"], mb["segment_ids"]).logits
            sums = loss_sums(logits, mb["targets"], mb["weights"], mb["class_ids"], num_classes)
        return sums["wce"] / denominator, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if micro_batches == 1:
        (_, sums), grads = grad_fn(params, batch)
    else:
        def accumulate(carry, mb):
            grads_acc, sums_acc = carry
            (_, s), g = grad_fn(params, mb)
            grads_acc = jax.tree.map(jnp.add, grads_acc, g)
            if param_shardings is not None:
                grads_acc = jax.lax.with_sharding_constraint(grads_acc, param_shardings)
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, s)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums(num_classes)), split_micro_batches(batch, micro_batches))

    metrics = sums_to_metrics(sums)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    lr = schedule(schedule_count(state["opt_state"]))
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {
        "step": state["step"] + 1,
        "params": _where_tree(finite, new_params, params),
        "opt_state": _where_tree(finite, new_opt_state, state["opt_state"]),
        "rng": state["rng"],
    }
    metrics.update(
        grad_norm=grad_norm,
        lr=lr,
        nonfinite=(~finite).astype(jnp.int32),
        tokens=(batch["segment_ids"] > 0).sum().astype(jnp.float32),
    )
    return new_state, metrics


def loss_options(train_cfg: TrainConfig, seq_len: int) -> dict[str, Any]:
    """The train config's loss implementation fields, as `make_train_step` keyword arguments.
    `train.loss_chunk_length` is an upper bound: the chunk is its largest divisor of the sequence
    length, or the whole row when no divisor is at least half of it."""
    chunk = train_cfg.loss_chunk_length
    if 0 < chunk < seq_len:
        divisor = max(d for d in range(1, chunk + 1) if seq_len % d == 0)
        if divisor < chunk // 2:
            log.warning("train.loss_chunk_length=%d: sequence length %d has no divisor in [%d, %d]; "
                        "the fused loss takes whole rows", chunk, seq_len, chunk // 2, chunk)
            divisor = 0
        chunk = divisor
    else:
        chunk = 0
    return {"fused_head": train_cfg.fused_head_loss, "loss_chunk_length": chunk,
            "skip_unsupervised_logits": train_cfg.skip_unsupervised_logits,
            "loss_normalization": train_cfg.loss_normalization}


def check_batch(train_cfg: TrainConfig, mesh: Mesh, micro_batches: int | None = None) -> None:
    """The batch rules of a step on `mesh`: each micro-batch's rows split evenly over the batch
    devices (data x fsdp), the global batch over the processes. (The config alone already has
    micro_batches dividing global_batch_size.)"""
    B, M = train_cfg.global_batch_size, train_cfg.micro_batches if micro_batches is None else micro_batches
    shards = mesh_lib.batch_axis_size(mesh)
    if (B // M) % shards:
        raise ConfigError(
            f"a micro-batch of train.global_batch_size / train.micro_batches = {B // M} rows cannot be split "
            f"over mesh data x fsdp = {shards} devices; make it a multiple of {shards}"
        )
    if B % jax.process_count():
        raise ConfigError(f"train.global_batch_size={B} must be a multiple of the process count {jax.process_count()}")


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A run's jitted step and what it was built with."""

    fn: StepFn
    model_cfg: LlamaConfig
    tx: optax.GradientTransformation
    schedule: Schedule
    peak_lr: float
    seq_len: int
    micro_batches: int


def build_step(
    run: RunConfig,
    mesh: Mesh,
    *,
    total_steps: int,
    model_cfg: LlamaConfig | None = None,
    seq_len: int | None = None,
    num_classes: int | None = None,
    micro_batches: int | None = None,
) -> TrainStep:
    """The train step a run config describes, on `mesh`: its batch rules, optimizer and schedule
    over `total_steps`, micro-batches, `weighted` and loss implementation (`loss_options`); the
    one builder for train, plan and bench. Each keyword overrides what the config gives: the
    model (default `run.model`; train takes the vocabulary from the dataset, plan substitutes
    what XLA:CPU cannot compile), the row length (default `train.seq_len` or `data.max_length`),
    the classes (default `data.classes`) and the micro-batches (plan counts FLOPs at 1)."""
    model_cfg = run.model if model_cfg is None else model_cfg
    seq_len = seq_len or run.train.seq_len or run.data.max_length
    micro_batches = run.train.micro_batches if micro_batches is None else micro_batches
    check_batch(run.train, mesh, micro_batches)
    tx, schedule, peak_lr = make_optimizer(run.train, total_steps, run.train.global_batch_size * seq_len)
    fn = make_train_step(
        model_cfg, tx, schedule, mesh, num_classes=len(run.data.classes) if num_classes is None else num_classes,
        micro_batches=micro_batches, weighted=run.train.weighted, **loss_options(run.train, seq_len),
    )
    return TrainStep(fn=fn, model_cfg=model_cfg, tx=tx, schedule=schedule, peak_lr=peak_lr, seq_len=seq_len,
                     micro_batches=micro_batches)


def make_train_step(
    model_cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    mesh: Mesh,
    *,
    num_classes: int,
    rules: Rules = LOGICAL_AXIS_RULES,
    donate: bool = True,
    **options: Any,
) -> StepFn:
    """jit(train_step) with the state's and batch's shardings fixed; the state is donated.
    `options` are train_step's keyword options (micro_batches, weighted, loss_normalization,
    fused_head, loss_chunk_length, skip_unsupervised_logits)."""
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    step_options = dict(model_cfg=model_cfg, tx=tx, schedule=schedule, num_classes=num_classes,
                        param_shardings=shardings["params"], **options)

    def step(state: TrainState, batch: Batch):
        with use_rules(mesh, rules):
            return train_step(state, batch, **step_options)

    return jax.jit(
        step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
