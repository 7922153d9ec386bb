"""The full run config: sections model, data, train, mesh, checkpoint, plus workdir/init_from/seed.

Config files in configs/ start from `base_config(<model preset>)` and change fields; any field can
be overridden on the command line (`--config.train.lr=1e-4`).

The two ablation switches of the paper (Table 2):
  train.weighted=False     every supervised token gets weight 1.0 (applied in the train step)
  train.conditioned=False  every class uses the plain template. This is the same field as
                           `data.conditioned` (one ml_collections reference; setting either sets
                           both): templates are applied when the dataset is prepared, so `prepare`
                           honours it and `train` refuses a dataset prepared the other way.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import ml_collections

from openchat_jax.config import at_least, build_section, greater_than, in_range, one_of
from openchat_jax.data.config import DataConfig, data_defaults, validate
from openchat_jax.errors import ConfigError
from openchat_jax.model.config import PRESETS, LlamaConfig
from openchat_jax.train.loss import LOSS_NORMALIZATIONS
from openchat_jax.train.optimizer import peak_learning_rate


def train_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Rows per optimizer step, over all processes and micro-batches.
        "global_batch_size": 8,
        # Tokens per packed row. 0 = the prepared dataset's max_length (dataset_info.json); another
        # value is an explicit override, named in the startup summary.
        "seq_len": 0,
        # Gradient accumulation: the step's batch is split into this many micro-batches.
        "micro_batches": 1,
        "epochs": 5,
        # > 0: run exactly this many steps (the schedule spans them; data repeats as needed).
        # 0: epochs * batches per epoch of the prepared dataset.
        "num_steps": 0,
        # "auto" = 3e-4 * sqrt(tokens per step / 4e6), or a number (float or text); any type allowed.
        "lr": ml_collections.FieldReference("auto", field_type=object),
        "warmup_ratio": 0.05,
        "end_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-5,
        "weight_decay": 0.1,
        "decay_norms": True,  # False: no weight decay on RMSNorm scales
        "decay_embeddings": True,  # False: no weight decay on embed / lm_head
        "grad_clip": 1.0,
        "weighted": True,
        # "token": loss = sum_t w_t CE_t / sum_t w_t over the step's supervised tokens (a long reply
        # counts more). "message": each message's weights are divided by its token count, so each
        # reply counts by its weight whatever its length (OpenChat's --per-sequence-loss). Chosen at
        # train time: the prepared data is the same either way.
        "loss_normalization": "token",
        # The LM head applied inside the loss, whose logits gradient is formed in the forward pass
        # (no [B, L, V] logits kept for the backward); False = plain autodiff of logits -> loss.
        "fused_head_loss": True,
        # > 0: the fused head loss walks each row in chunks of at most this many positions (the
        # largest divisor of the row length not above it), bounding its [B, chunk, V] temporaries;
        # 0 = whole rows. (docs/benchmarks.md compares chunk lengths.)
        "loss_chunk_length": 512,
        # The fused head loss (with chunks) computes no logits for tokens of weight 0 (prompts,
        # padding): each batch shard's tokens go supervised-first and the chunks past the last
        # supervised token are skipped. Same loss and gradients either way.
        "skip_unsupervised_logits": True,
        # (set in base_config: a reference to data.conditioned)
        "log_every": 1,
        "progress": True,
        # Peak FLOP/s per device for MFU; 0 = known accelerator table, or measured on CPU.
        "peak_flops_per_device": 0.0,
        # Stop the run after this many non-finite (skipped) steps in a row; 0 = never.
        "max_nonfinite_in_a_row": 10,
        "tensorboard": True,
        # A run resumed from a checkpoint under settings that change its trajectory (lr, schedule,
        # steps, batch, seed, data; compared with WORKDIR/config.json) is refused unless True, which
        # logs what changed.
        "allow_changed_resume": False,
        # > 0: every this many steps and at the last step, score the prepared held-out split
        # (data.eval_fraction / data.eval_files) per class, under its own and the expert condition
        # (train/evaluation.py); written to metrics.jsonl and TensorBoard as eval/*. 0 = off.
        "eval_every": 0,
    })


def checkpoint_defaults() -> ml_collections.ConfigDict:
    # `train` builds a Checkpointer from this (loop.make_checkpointer) and resumes from the newest
    # checkpoint that restores; a damaged one is reported and the one before it is used.
    return ml_collections.ConfigDict({
        "dir": "",  # "" = WORKDIR/checkpoints
        "save_every": 500,  # steps; 0 = only at the end of the run and when stopped (SIGTERM)
        "keep": 3,
        "async_save": True,
    })


def mesh_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})


def base_config(model_preset: str = "tiny") -> ml_collections.ConfigDict:
    if model_preset not in PRESETS:
        raise ConfigError(f"unknown model preset {model_preset!r}; known: {sorted(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.workdir = ""
    # A weights folder (save_params / `convert hf-to-jax` output) to start from; "" = random init.
    config.init_from = ""
    config.model = PRESETS[model_preset].to_config_dict()
    config.data = data_defaults()
    config.train = train_defaults()
    config.train.conditioned = config.data.get_ref("conditioned")
    config.mesh = mesh_defaults()
    config.checkpoint = checkpoint_defaults()
    return config



def accelerator_run_config(model_preset: str, *, max_length: int, tokenizer: str,
                           global_batch_size: int) -> ml_collections.ConfigDict:
    """`base_config` as the paper-scale configs run it on accelerators: bf16 compute over float32
    master weights and AdamW state, full remat, scanned layers, lr "auto", fsdp over every device."""
    config = base_config(model_preset)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.data.max_length = max_length
    config.data.tokenizer = tokenizer
    config.train.global_batch_size = global_batch_size
    config.train.micro_batches = 1
    config.train.lr = "auto"
    config.train.log_every = 10
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return config

# The section of WORKDIR/config.json that holds what the run resolved (row length, steps, peak lr):
# recorded by `train`, not part of the config.
RESOLVED_SECTION = "resolved"


def run_config_from_dict(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A run config saved as plain values (WORKDIR/config.json) rebuilt on `base_config`: each
    section's fields replace the defaults (a field the defaults lack is kept as saved), so typed
    fields and the `train.conditioned` reference behave as in a config file."""
    config = base_config()
    for name, value in values.items():
        if name == RESOLVED_SECTION:
            continue
        section = config.get(name)
        if isinstance(section, ml_collections.ConfigDict) and isinstance(value, Mapping):
            if name == "train" and "conditioned" in value:
                value = {k: v for k, v in value.items() if k != "conditioned"}  # set through data.conditioned
            for key, field_value in value.items():
                _set_saved(section, key, field_value, f"{name}.{key}")
        else:
            _set_saved(config, name, value, name)
    return config


def _set_saved(section: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """ConfigDict refuses a value of another type than the default's with a TypeError."""
    try:
        section[key] = value
    except TypeError:
        expected = type(section[key]).__name__
        raise ConfigError(f"{where} takes a value of type {expected}, got {value!r}") from None


# -- the typed sections (openchat_jax.config.resolve builds them; the defaults above document them) --

@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = field(metadata=at_least(1))
    seq_len: int = field(metadata=at_least(0))
    micro_batches: int = field(metadata=at_least(1))
    epochs: int = field(metadata=at_least(0))
    num_steps: int = field(metadata=at_least(0))
    lr: str | float
    warmup_ratio: float = field(metadata=in_range(0, 1))
    end_lr_ratio: float = field(metadata=in_range(0, 1))
    b1: float = field(metadata=in_range(0, 1, high_open=True))
    b2: float = field(metadata=in_range(0, 1, high_open=True))
    eps: float = field(metadata=at_least(0))
    weight_decay: float = field(metadata=at_least(0))
    decay_norms: bool
    decay_embeddings: bool
    grad_clip: float = field(metadata=greater_than(0))
    weighted: bool
    loss_normalization: str = field(metadata=one_of(LOSS_NORMALIZATIONS))
    fused_head_loss: bool
    loss_chunk_length: int = field(metadata=at_least(0))
    skip_unsupervised_logits: bool
    conditioned: bool
    log_every: int
    progress: bool
    peak_flops_per_device: float = field(metadata=at_least(0))
    max_nonfinite_in_a_row: int = field(metadata=at_least(0))
    tensorboard: bool
    allow_changed_resume: bool
    eval_every: int = field(metadata=at_least(0))


_MESH_SIZE = {"rule": (lambda v: v >= 1 or v == -1, "a positive int or -1 (the remaining devices)")}


@dataclass(frozen=True)
class MeshConfig:
    data: int = field(metadata=_MESH_SIZE)
    fsdp: int = field(metadata=_MESH_SIZE)
    tensor: int = field(metadata=_MESH_SIZE)


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str
    save_every: int = field(metadata=at_least(0))
    keep: int
    async_save: bool


@dataclass(frozen=True)
class RunConfig:
    """A run config, typed and checked: what `train`, `plan` and `bench` read."""

    seed: int
    workdir: str
    init_from: str
    model: LlamaConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    demo: Mapping[str, Any] | None = None  # the demo's task (openchat_jax.demo.tasks checks it)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as config.json records them."""
        out = dataclasses.asdict(self)
        if out["demo"] is None:
            del out["demo"]
        return out


def resolve_run_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> RunConfig:
    """The checks that tie fields together, after each field's own (`build_section`)."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    sections = {name: kind for name, kind in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(kind)}
    for name in sections:
        if name not in values:
            raise ConfigError(f"the config has no {name!r} section (a run config starts from "
                              "openchat_jax.train.config.base_config)")
    every_field = [f"{name}.{f.name}" for name, kind in sections.items() for f in dataclasses.fields(kind)]
    run = build_section(RunConfig, values, "", elsewhere=every_field)
    train = run.train
    if train.global_batch_size % train.micro_batches:
        raise ConfigError(f"train.micro_batches={train.micro_batches} must divide "
                          f"train.global_batch_size={train.global_batch_size}")
    if train.epochs < 1 and train.num_steps < 1:
        raise ConfigError("train.epochs must be >= 1 (or set train.num_steps > 0)")
    peak_learning_rate(train.lr, 1)  # "auto" or a finite number > 0
    sizes = dataclasses.asdict(run.mesh)
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {sizes}")
    validate(run.data, need_files=False)  # classes, label map, default class
    return run
