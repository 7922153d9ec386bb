"""What a run tells its user, and what it records: the startup and closing summaries, and
WORKDIR/config.json (the config the run started with, plus the values it resolved to).

config.json loads back as a config (`openchat_jax.config.load_config_file`, or `--config
WORKDIR/config.json`); its `resolved` section (row length, steps, peak lr, the dataset's size) is
recomputed by every run and dropped when loading. A run that resumes from a checkpoint compares
the settings that decide its trajectory with the file and refuses a change unless
`train.allow_changed_resume`.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Mapping

from etils import epath

from openchat_jax.errors import ConfigError
from openchat_jax.train.config import RESOLVED_SECTION as RESOLVED
from openchat_jax.train.metrics import METRICS_FILE, TB_DIR

if TYPE_CHECKING:
    from openchat_jax.train.loop import Run

CONFIG_FILE = "config.json"
# train.* fields that change how a run executes or reports, not the updates it makes.
NOT_TRAJECTORY = frozenset({
    "train.log_every", "train.progress", "train.tensorboard", "train.peak_flops_per_device",
    "train.max_nonfinite_in_a_row", "train.allow_changed_resume", "train.micro_batches", "train.fused_head_loss",
    "train.loss_chunk_length", "train.skip_unsupervised_logits", "train.eval_every",
})
TRAJECTORY_PREFIXES = ("train.", f"{RESOLVED}.")
TRAJECTORY_FIELDS = frozenset({"seed", "init_from", "data.dataset_dir"})


def run_record(run: "Run") -> dict[str, Any]:
    """The config as plain values plus what it resolved to: the content of config.json."""
    info = run.dataset_info
    resolved = {
        "seq_len": run.seq_len,
        "total_steps": run.total_steps,
        "batches_per_epoch": run.batches_per_epoch,
        "tokens_per_step": run.tokens_per_step,
        "peak_lr": run.peak_lr,
        "dataset": {k: info.get(k) for k in ("num_examples", "total_tokens", "max_length", "vocab_size")},
    }
    return {**run.config.to_dict(), RESOLVED: resolved}


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _decides_trajectory(key: str) -> bool:
    if key in NOT_TRAJECTORY:
        return False
    return key in TRAJECTORY_FIELDS or key.startswith(TRAJECTORY_PREFIXES)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for each trajectory setting that differs."""
    old, new = _flat(json.loads(json.dumps(saved, default=str))), _flat(json.loads(json.dumps(current, default=str)))
    keys = sorted(k for k in set(old) | set(new) if _decides_trajectory(k))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def config_path(workdir: str) -> epath.Path:
    return epath.Path(workdir) / CONFIG_FILE


def write_record(workdir: str, record: Mapping[str, Any]) -> None:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def check_resume(workdir: str, record: Mapping[str, Any], step: int, *, allow_changed: bool) -> list[str]:
    """Compare a resumed run's settings with config.json; raise ConfigError on a change unless
    `allow_changed`. Returns lines to log (the changes allowed, or a missing file)."""
    path = config_path(workdir)
    if not path.exists():
        return [f"resuming at step {step}: {path} is missing, so the settings cannot be compared; writing it now"]
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's recorded config ({e}); move it away to resume") from None
    changes = changed_settings(saved, record)
    if not changes:
        return []
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    if not allow_changed:
        raise ConfigError(
            f"resuming {workdir} at step {step} with settings that change the run ({listed}; recorded in {path}): "
            "run with the recorded settings, use a new workdir, or pass --config.train.allow_changed_resume=True"
        )
    return [f"resuming at step {step} with changed settings (train.allow_changed_resume): {listed}"]


def _sci(x: float) -> str:
    return f"{x:.3g}"


def startup_summary(run: "Run", paths: Mapping[str, str | None], start: int) -> list[str]:
    """Lines printed before the first step: model, data, steps, batch, lr, mesh and every path."""
    config, cfg, info = run.config, run.model_cfg, run.dataset_info
    train = config.train
    init = f"init_from {config.init_from}" if config.init_from else f"random init (seed {config.seed})"
    lines = [
        f"model: {cfg.num_params() / 1e6:,.2f}M parameters ({cfg.num_layers} layers, embed {cfg.embed}, "
        f"vocab {cfg.vocab_size}), {init}, compute {cfg.dtype}",
    ]
    data = f"data: {config.data.dataset_dir or 'loader'}"
    if info.get("num_examples") is not None:
        data += f": {info['num_examples']:,} conversations, {info.get('total_tokens', 0):,} tokens"
    override = "" if run.seq_len_source.startswith("train.seq_len") else "; train.seq_len overrides"
    lines.append(f"{data}; rows of {run.seq_len} tokens ({run.seq_len_source}{override})")
    if run.batches_per_epoch:
        epochs = run.total_steps / run.batches_per_epoch
        how = "train.num_steps" if train.num_steps > 0 else "train.epochs"
        steps = f"{run.total_steps:,} steps = {epochs:.3g} epochs of {run.batches_per_epoch:,} batches ({how})"
    else:
        steps = f"{run.total_steps:,} steps"
    lines.append(f"steps: {steps}; " + (f"resuming at step {start}" if start else "starting at step 0"))
    tokens = f"batch: {run.global_batch_size} rows x {run.seq_len} = {run.tokens_per_step:,} token slots per step"
    if train.micro_batches > 1:
        tokens += f" in {train.micro_batches} micro-batches"
    total_tokens, rows_per_epoch = info.get("total_tokens"), getattr(run.loader, "rows_per_epoch", None)
    if total_tokens and rows_per_epoch:
        fill = total_tokens / (rows_per_epoch * run.seq_len)
        tokens += f" (~{fill * run.tokens_per_step:,.0f} real tokens, {100 * fill:.1f}% of the slots)"
    lines.append(tokens)
    lr = train.lr
    auto = isinstance(lr, str) and lr.strip().lower() == "auto"
    source = f'lr "auto" = 3e-4 * sqrt({run.tokens_per_step:,} / 4e6)' if auto else "train.lr"
    warmup = int(round(run.total_steps * train.warmup_ratio))
    lines.append(f"lr: peak {_sci(run.peak_lr)} ({source}); {warmup} warmup steps, then cosine to "
                 f"{_sci(run.peak_lr * train.end_lr_ratio)}")
    devices = list(run.mesh.devices.flat)
    axes = " ".join(f"{k}={v}" for k, v in run.mesh.shape.items())
    lines.append(f"mesh: {axes} over {len(devices)} {devices[0].platform} device(s)")
    lines += _paths(paths)
    return lines


def _paths(paths: Mapping[str, str | None]) -> list[str]:
    labels = {"metrics": "logs/metrics", "tensorboard": "TensorBoard", "checkpoints": "checkpoints",
              "final": "final weights", "config": "config"}
    return [f"{labels[k]}: {paths[k] or 'off'}" for k in labels if k in paths]


def run_paths(workdir: str, *, tensorboard: bool, checkpoints: str | None) -> dict[str, str | None]:
    root = epath.Path(workdir)
    return {
        "metrics": str(root / METRICS_FILE),
        "tensorboard": f"{root / TB_DIR} (tensorboard --logdir {root / TB_DIR})" if tensorboard else None,
        "checkpoints": checkpoints,
        "final": str(root / "final"),
        "config": str(root / CONFIG_FILE),
    }


def closing_summary(*, step: int, total_steps: int, start: int, stopped: bool, seconds: float,
                    last: Mapping[str, float] | None, final_dir: str | None,
                    paths: Mapping[str, str | None]) -> list[str]:
    ran = step - start
    if stopped:
        head = (f"stopped at step {step} of {total_steps} after {ran} steps in {seconds:.0f} s; "
                "run the same command to resume from the checkpoint")
    else:
        head = f"finished: step {step} of {total_steps} ({ran} steps in {seconds:.0f} s)"
    if last and "loss" in last and math.isfinite(last["loss"]):
        head += f"; last loss {last['loss']:.4f}"
    out = dict(paths)
    out["final"] = final_dir or "not written (the run did not reach its last step)"
    return [head, *_paths(out)]
