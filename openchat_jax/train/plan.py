"""What fits before you rent it: compile the train step ahead of time for a mesh of fake CPU
devices and report per-device memory, FLOPs per step, and step time at a stated MFU.

Nothing is allocated: the train state and the batch are `jax.ShapeDtypeStruct`s with their
shardings (the optimizer state from `jax.eval_shape(tx.init, ...)`), and the real jitted step
(`train.step.build_step`, the same micro-batch scan, remat policy and donation) is lowered and
compiled for them.

Where each number comes from:
- parameters, optimizer state, gradients, batch: analytic-exact, from shapes, dtypes and each
  leaf's sharding (`sharding.shard_shape`); gradients have the params' shapes and shardings in
  the accumulation dtype (the param dtype: the step accumulates into zeros_like(params)).
- XLA arguments / outputs / aliased / temporaries: `compiled.memory_analysis()` of the per-device
  program. These are XLA:CPU's figures, not the TPU's or GPU's: buffer assignment, fusion,
  scheduling and bf16 handling differ per backend, and the TPU compiler can rematerialise further
  when short of HBM. Treat them as an estimate, not a bound.
- FLOPs: the model formula (`train.flops`, 6N + attention, no remat) and XLA's HLO cost analysis
  of the same step. XLA counts a loop body once, so the scanned program cannot be counted
  directly; the count is taken on the lowered (unoptimised, whole-mesh) step with layers unrolled
  at 1 and 2 layers and micro_batches=1 (same rows per step), and extrapolated linearly in layers
  (every layer is identical). It includes the rematerialisation recompute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from openchat_jax.data.loader import BATCH_KEYS
from openchat_jax.config import resolve
from openchat_jax.errors import ConfigError
from openchat_jax.model import partitioning
from openchat_jax.model.config import LlamaConfig
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train import step as step_lib
from openchat_jax.train.config import RunConfig
from openchat_jax.train.flops import PEAK_FLOPS_BY_KIND, flops_per_token

GiB = 1024**3

# Llama-2's 32000 tokens + <|end_of_turn|> (docs/architecture.md): the vocabulary when the config leaves it
# to the dataset (model.vocab_size <= 0).
DEFAULT_VOCAB_SIZE = 32001
# The schedule's length does not change the compiled program; any positive count will do.
_PLACEHOLDER_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # jax's name for it: the model's kernels (LlamaConfig.platform)
    peak_flops: float  # dense bf16 FLOP/s per chip (one JAX device)
    hbm_bytes: int  # per chip
    usable_fraction: float  # of HBM that XLA may use in our launch setup
    note: str


# Peak FLOP/s: train/flops.py's table. HBM per chip (vendor pages, checked 2025):
#   TPU v4:  cloud.google.com/tpu/docs/v4 - 32 GiB HBM2 per chip (2 TensorCores shown to JAX as one
#            device; "v4-64" = 64 cores = 32 chips = 32 devices).
#   TPU v5e: cloud.google.com/tpu/docs/v5e - 16 GiB HBM2 per chip.
#   TPU v5p: cloud.google.com/tpu/docs/v5p - 95 GiB HBM2e per chip ("v5p-64" = 32 chips: v5p names
#            count TensorCores, 2 per chip).
#   H100:    NVIDIA H100 Tensor Core GPU datasheet, SXM5 - 80 GB HBM3. The launch scripts give XLA
#            90% of it (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9, launch/gpu_node.sh).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "tpu", PEAK_FLOPS_BY_KIND["TPU v4"], 32 * GiB, 1.0, "v4-N slices have N/2 chips (N counts TensorCores)"),
    "v5e": Chip("TPU v5e", "tpu", PEAK_FLOPS_BY_KIND["TPU v5e"], 16 * GiB, 1.0, "v5litepod-N slices have N chips"),
    "v5p": Chip("TPU v5p", "tpu", PEAK_FLOPS_BY_KIND["TPU v5p"], 95 * GiB, 1.0, "v5p-N slices have N/2 chips (N counts TensorCores)"),
    "h100": Chip("NVIDIA H100 SXM", "gpu", PEAK_FLOPS_BY_KIND["H100"], 80 * GiB, 0.9, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 in the launch scripts"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    # What was planned
    model: dict[str, Any]  # the LlamaConfig fields
    num_params: int
    mesh: dict[str, int]
    num_devices: int
    chip: str
    seq_len: int
    global_batch_size: int
    micro_batches: int
    notes: tuple[str, ...]
    # Per device, analytic (bytes)
    params_bytes: int
    opt_state_bytes: int
    grads_bytes: int
    batch_bytes: int
    # Per device, XLA:CPU memory_analysis (bytes); None when not compiled
    xla_argument_bytes: int | None
    xla_output_bytes: int | None
    xla_alias_bytes: int | None
    xla_temp_bytes: int | None
    # Whole step, all devices
    model_flops_per_step: float
    xla_flops_per_step: float | None
    # Timings of this planner run (seconds)
    lower_seconds: float
    compile_seconds: float | None
    mfu: float

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def rows_per_device_per_micro_batch(self) -> int:
        """Rows per data x fsdp shard (devices along `tensor` share their rows)."""
        return self.global_batch_size // self.micro_batches // (self.mesh["data"] * self.mesh["fsdp"])

    @property
    def chip_spec(self) -> Chip:
        return CHIPS[self.chip]

    @property
    def peak_bytes(self) -> int | None:
        """Arguments + temporaries + outputs that do not reuse (alias) a donated argument."""
        if self.xla_temp_bytes is None:
            return None
        return self.xla_argument_bytes + self.xla_temp_bytes + self.xla_output_bytes - self.xla_alias_bytes

    @property
    def budget_bytes(self) -> int:
        c = self.chip_spec
        return int(c.hbm_bytes * c.usable_fraction)

    @property
    def fits(self) -> bool | None:
        return None if self.peak_bytes is None else self.peak_bytes <= self.budget_bytes

    @property
    def step_seconds(self) -> float:
        return self.model_flops_per_step / (self.num_devices * self.chip_spec.peak_flops * self.mfu)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            tokens_per_step=self.tokens_per_step, peak_bytes=self.peak_bytes, budget_bytes=self.budget_bytes,
            fits=self.fits, step_seconds=self.step_seconds, tokens_per_second=self.tokens_per_second,
        )
        return out


def mesh_from_config(config: RunConfig) -> dict[str, int]:
    """The config's `mesh` section, which must be fully specified for planning (no -1)."""
    sizes = dataclasses.asdict(config.mesh)
    if any(v < 1 for v in sizes.values()):
        raise ConfigError(
            f"mesh {sizes} has a -1 (or invalid) axis: the planner needs the device count, pass --mesh fsdp=N"
        )
    return sizes


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds for a pytree of ShapeDtypeStructs with shardings (the largest
    shard; shards of an evenly divided array are all the same size)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(global_batch_size: int, seq_len: int, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The loader's batch (data/loader.py): [B, L] int32 except float32 weights, rows sharded."""
    sharding = mesh_lib.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((global_batch_size, seq_len), jnp.float32 if k == "weights" else jnp.int32, sharding=sharding)
        for k in BATCH_KEYS
    }


def model_config_for_plan(config: RunConfig | ml_collections.ConfigDict) -> tuple[LlamaConfig, list[str]]:
    """config.model as a LlamaConfig the CPU can compile, and notes on what was substituted."""
    config = resolve(config)
    notes = []
    model = dataclasses.asdict(config.model)
    if model["vocab_size"] <= 0:
        model["vocab_size"] = DEFAULT_VOCAB_SIZE
        notes.append(
            f"model.vocab_size <= 0 (taken from the dataset at train time): planned with {DEFAULT_VOCAB_SIZE} "
            "(Llama-2 + <|end_of_turn|>); override with --config.model.vocab_size=N"
        )
    if model["attention"] != "xla":
        kernel = "selects an accelerator kernel (splash on TPU, cudnn on GPU)" if model["attention"] == "auto" \
            else "is an accelerator kernel"
        notes.append(
            f"model.attention={model['attention']!r} {kernel} that XLA:CPU cannot compile: "
            "planned with 'xla', which materialises the [heads, L, L] scores of a layer: the temporaries "
            "include buffers the kernel does not need"
        )
        model["attention"] = "xla"
    if config.init_from:
        notes.append(
            f"init_from={config.init_from!r}: planned from config.model (the weights folder's model_config.json "
            "is not read); its shapes must match"
        )
    return LlamaConfig(**model), notes


def _lowered_flops(lowered: Any) -> float | None:
    try:
        cost = lowered.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def row_length(config: RunConfig) -> int:
    """The row length `train` would use with a dataset prepared at `data.max_length`."""
    return config.train.seq_len or config.data.max_length


def xla_flops_per_step(
    model_cfg: LlamaConfig, config: RunConfig, mesh: jax.sharding.Mesh, num_classes: int
) -> float | None:
    """XLA's HLO cost analysis of the whole step (all devices), extrapolated from unrolled 1- and
    2-layer versions at micro_batches=1 (see the module doc for why)."""
    B, L = config.train.global_batch_size, row_length(config)
    counts = []
    for layers in (1, 2):
        cfg = model_cfg.replace(num_layers=layers, scan_layers=False)
        step = step_lib.build_step(config, mesh, total_steps=_PLACEHOLDER_STEPS, model_cfg=cfg, seq_len=L,
                                   num_classes=num_classes, micro_batches=1)
        flops = _lowered_flops(step.fn.lower(step_lib.abstract_train_state(cfg, step.tx, mesh), abstract_batch(B, L, mesh)))
        if flops is None:
            return None
        counts.append(flops)
    per_layer = counts[1] - counts[0]
    return counts[0] + (model_cfg.num_layers - 1) * per_layer


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _collect_sharding_warnings() -> Iterator[list[str]]:
    """The mesh module warns each time it replicates a dimension that a mesh axis does not
    divide (once per shardings call, so several times per plan): gather them, once each, into
    the plan's notes instead."""
    logger = logging.getLogger(partitioning.__name__)
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def plan_step(
    config: RunConfig | ml_collections.ConfigDict,
    *,
    mesh_axes: Mapping[str, int] | None = None,
    chip: str = "v5p",
    mfu: float = 0.5,
    devices: Sequence[jax.Device] | None = None,
    compile: bool = True,
    count_xla_flops: bool = True,
) -> Plan:
    """Plan one train step of `config` on a mesh of `mesh_axes` (default: config.mesh) `chip`s.

    Uses the first prod(mesh) of `devices` (default jax.devices()); on a CPU host, fake them with
    XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported (the CLI does)."""
    config = resolve(config)
    with _collect_sharding_warnings() as warnings:
        plan = _plan_step(config, mesh_axes, chip, mfu, devices, compile, count_xla_flops)
    return dataclasses.replace(plan, notes=plan.notes + tuple(f"sharding: {w}" for w in warnings))


def _plan_step(
    config: RunConfig,
    mesh_axes: Mapping[str, int] | None,
    chip: str,
    mfu: float,
    devices: Sequence[jax.Device] | None,
    compile: bool,
    count_xla_flops: bool,
) -> Plan:
    if chip not in CHIPS:
        raise ConfigError(f"--chip {chip!r}: choose one of {sorted(CHIPS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    axes = dict(mesh_from_config(config) if mesh_axes is None else mesh_axes)
    n = math.prod(axes[a] for a in mesh_lib.MESH_AXES)
    available = list(jax.devices() if devices is None else devices)
    if len(available) < n:
        raise ConfigError(
            f"mesh {axes} needs {n} devices but jax has {len(available)}: run `openchat-jax plan` as a new process "
            f"(it sets XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax)"
        )
    mesh = mesh_lib.make_mesh(axes, available[:n])
    B, M = config.train.global_batch_size, config.train.micro_batches
    L = row_length(config)
    num_classes = len(config.data.classes)
    model_cfg, notes = model_config_for_plan(config)
    model_cfg = model_cfg.replace(platform=CHIPS[chip].platform)  # the chip's kernels, compiled by XLA:CPU

    step = step_lib.build_step(config, mesh, total_steps=_PLACEHOLDER_STEPS, model_cfg=model_cfg, seq_len=L)
    state = step_lib.abstract_train_state(model_cfg, step.tx, mesh)  # eval_shape: nothing allocated
    batch = abstract_batch(B, L, mesh)
    params_bytes = per_device_bytes(state["params"])
    opt_bytes = per_device_bytes(state["opt_state"])
    grads_bytes = params_bytes  # same shapes and shardings, accumulated in the param dtype

    t0 = time.perf_counter()
    lowered = step.fn.lower(state, batch)
    lower_s = time.perf_counter() - t0
    mem = None
    compile_s = None
    if compile:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is None:
            notes.append("XLA returned no memory analysis for this backend")
    xla_flops = xla_flops_per_step(model_cfg, config, mesh, num_classes) if count_xla_flops else None

    return Plan(
        model=dataclasses.asdict(model_cfg), num_params=model_cfg.num_params(), mesh=axes, num_devices=n, chip=chip,
        seq_len=L, global_batch_size=B, micro_batches=M, notes=tuple(notes),
        params_bytes=params_bytes, opt_state_bytes=opt_bytes, grads_bytes=grads_bytes,
        batch_bytes=per_device_bytes(batch),
        xla_argument_bytes=None if mem is None else int(mem.argument_size_in_bytes),
        xla_output_bytes=None if mem is None else int(mem.output_size_in_bytes),
        xla_alias_bytes=None if mem is None else int(mem.alias_size_in_bytes),
        xla_temp_bytes=None if mem is None else int(mem.temp_size_in_bytes),
        model_flops_per_step=flops_per_token(model_cfg, L) * B * L,
        xla_flops_per_step=xla_flops, lower_seconds=lower_s, compile_seconds=compile_s, mfu=mfu,
    )


CPU_CAVEAT = (
    "Memory from XLA:CPU's memory_analysis of the per-device program: buffer assignment, fusion, "
    "scheduling and bf16 handling differ on TPU/GPU, and their compilers can rematerialise further "
    "when short of memory, so treat temporaries (and the peak) as an estimate, not a bound. "
    "Parameters, optimizer state, gradients and batch are exact (shapes x dtypes / shards)."
)


def _gib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / GiB:.2f}" if x >= 0.01 * GiB else f"{x / GiB:.2e}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """Markdown: a header, the memory table with a verdict, the FLOPs/throughput table, notes."""
    m = plan.model
    chip = plan.chip_spec
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    rows_mb = plan.global_batch_size // plan.micro_batches
    lines = [
        f"**{_count(plan.num_params)} params** (embed {m['embed']}, mlp {m['mlp']}, {m['num_layers']} layers, "
        f"{m['num_heads']}/{m['num_kv_heads']} heads, vocab {m['vocab_size']}) on **{plan.num_devices} x {chip.name}** "
        f"(mesh {mesh})",
        "",
        f"- batch: {plan.global_batch_size} rows x {plan.seq_len} = {plan.tokens_per_step:,} tokens per step; "
        f"micro_batches {plan.micro_batches} ({rows_mb} rows each, {plan.rows_per_device_per_micro_batch} per "
        + ("device)" if plan.mesh["tensor"] == 1 else f"data x fsdp shard of {plan.mesh['tensor']} tensor-parallel devices)"),
        f"- remat_policy {m['remat_policy']}, scan_layers {m['scan_layers']}, attention {m['attention']}, "
        f"compute {m['dtype']}, params {m['param_dtype']}",
        "",
        "| per device | GiB | source |",
        "|---|---:|---|",
        f"| parameters | {_gib(plan.params_bytes)} | analytic: shapes x dtype / shards |",
        f"| optimizer state | {_gib(plan.opt_state_bytes)} | analytic: eval_shape(tx.init), sharded like the params |",
        f"| gradients | {_gib(plan.grads_bytes)} | analytic: params' shapes and shardings, {m['param_dtype']} (inside XLA temporaries) |",
        f"| batch | {_gib(plan.batch_bytes)} | analytic |",
        f"| XLA arguments | {_gib(plan.xla_argument_bytes)} | memory_analysis (XLA:CPU) |",
        f"| XLA outputs | {_gib(plan.xla_output_bytes)} | memory_analysis (XLA:CPU) |",
        f"| XLA outputs aliased to donated arguments | {_gib(plan.xla_alias_bytes)} | memory_analysis (XLA:CPU) |",
        f"| XLA temporaries | {_gib(plan.xla_temp_bytes)} | memory_analysis (XLA:CPU): gradients, activations, remat, gathers |",
        f"| **peak estimate** (arguments + temporaries + outputs - aliased) | **{_gib(plan.peak_bytes)}** | |",
        f"| {chip.name} memory available | {_gib(plan.budget_bytes)} | {chip.hbm_bytes / GiB:.0f} GiB HBM"
        + (f" x {chip.usable_fraction:.0%} ({chip.note})" if chip.usable_fraction < 1 else "") + " |",
        "",
    ]
    if plan.peak_bytes is None:
        lines.append("**Fit: not compiled** (memory analysis skipped), only analytic numbers above.")
    else:
        margin = plan.budget_bytes - plan.peak_bytes
        if plan.fits:
            lines.append(
                f"**FITS**: {margin / GiB:.2f} GiB ({margin / plan.budget_bytes:.0%} of {_gib(plan.budget_bytes)} GiB) to spare "
                "(by the XLA:CPU estimate)."
            )
        else:
            lines.append(
                f"**DOES NOT FIT**: the estimate needs {-margin / GiB:.2f} GiB more than the {_gib(plan.budget_bytes)} GiB "
                f"of a {chip.name} ({plan.peak_bytes / plan.budget_bytes:.0%}). More chips, more micro_batches "
                "or a stronger remat_policy lower it."
            )
    xla = plan.xla_flops_per_step
    lines += [
        "",
        "| per step | value | source |",
        "|---|---:|---|",
        f"| model FLOPs | {plan.model_flops_per_step:.3e} | train/flops.py: (6N + 12 x layers x L x heads x head_dim) x tokens, no remat |",
        f"| XLA FLOPs | {'n/a' if xla is None else f'{xla:.3e}'} | XLA HLO cost analysis of the step, layers unrolled and extrapolated; includes remat recompute"
        + ("" if xla is None else f" ({xla / plan.model_flops_per_step:.2f} x model)") + " |",
        f"| step time at {plan.mfu:.0%} MFU | {_duration(plan.step_seconds)} | model FLOPs / ({plan.num_devices} x {chip.peak_flops / 1e12:.0f} TFLOP/s x MFU) |",
        f"| tokens/s at {plan.mfu:.0%} MFU | {plan.tokens_per_second:,.0f} ({plan.tokens_per_second / plan.num_devices:,.0f} per chip) | |",
        "",
        f"- compile on this host: lower {plan.lower_seconds:.1f} s"
        + ("" if plan.compile_seconds is None else f", compile {plan.compile_seconds:.1f} s")
        + f" (XLA:CPU, {plan.num_devices} fake devices)",
    ]
    lines += [f"- note: {n}" for n in plan.notes]
    lines.append(f"- caveat: {CPU_CAVEAT}")
    return "\n".join(lines)
