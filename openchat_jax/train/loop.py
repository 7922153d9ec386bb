"""The train loop: config -> mesh, data, state -> steps -> logs -> final weights.

    run = build_run(config)              # everything derived from the config, before any step
    result = train(config)               # build_run + initial/restored state + loop + final save

Seams for checkpoint/resume and preemption (see `Checkpointing`): `train(config, checkpointer=...,
stop=...)` restores the newest checkpoint through `checkpointer.restore_latest(abstract_state,
loader)` (the state; the loader's state is set in place) before the first step, saves when
`checkpointer.due(step)` and at the end (and when stopped), and polls `bool(stop)` between steps
(a SIGTERM flag) as well as `checkpointer.reached_preemption(step)` (multi-host: every process
stops at the same step). `make_checkpointer(config)` builds the real one from `config.checkpoint`
(the CLI always does). Checkpoints that failed to restore are renamed `<step>.damaged`; every
process saves and restores its own loader's state.

Like nanodo, the loop dispatches step n+1 before it fetches step n's metrics, so the host never
stalls the device queue for logging.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from openchat_jax.data.loader import BATCH_KEYS
from openchat_jax.config import resolve
from openchat_jax.errors import ConfigError, DataError, OpenChatError
from openchat_jax.model.checkpoint_io import MODEL_CONFIG
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import param_shardings
from openchat_jax.train import flops as flops_lib
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train import run_info
from openchat_jax.train.config import RunConfig
from openchat_jax.train.metrics import MetricsWriter, ProgressBar, named_scalars
from openchat_jax.train.step import (
    StepFn, TrainState, abstract_train_state, build_step, check_batch, init_train_state, loss_options,
)

log = logging.getLogger(__name__)

FINAL_DIR = "final"
CLASSES_FILE = "classes.json"
# Model fields that describe how to run, not the weights: a config may change them on top of init_from.
RUNTIME_MODEL_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention", "init_std")


class Restored(Protocol):
    step: int
    state: Any


class Checkpointing(Protocol):
    """What the loop needs from a checkpointer (openchat_jax.train.checkpointing.Checkpointer).
    An optional `reached_preemption(step) -> bool` is polled every step too: True on every
    process at the same step once any process got a preemption notice (multi-host SIGTERM)."""

    def restore_latest(self, abstract_state: Any, loader: Any) -> Restored | None: ...
    def due(self, step: int) -> bool: ...
    def save(self, step: int, state: Any, loader: Any) -> None: ...
    def close(self) -> None: ...


def make_checkpointer(config: RunConfig | ml_collections.ConfigDict) -> Any:
    """The run's Checkpointer from `config.checkpoint` (dir "" = WORKDIR/checkpoints;
    save_every 0 = save only at the end of the run and when stopped)."""
    from openchat_jax.train.checkpointing import Checkpointer

    config = resolve(config)
    ckpt = config.checkpoint
    directory = ckpt.dir or (str(Path(config.workdir) / "checkpoints") if config.workdir else "")
    if not directory:
        raise ConfigError("checkpoint.dir and workdir are both empty: give --config.workdir=DIR")
    save_every = ckpt.save_every or 2**62  # never due; the end-of-run / stop save still happens
    return Checkpointer(str(Path(directory).absolute()), save_every=save_every, keep=ckpt.keep,
                        async_save=ckpt.async_save)


def _set_aside_damaged(checkpointer: Any, skipped: Sequence[tuple[int, str]]) -> None:
    """Rename the checkpoints that failed to restore to `<step>.damaged` (kept for a post-mortem,
    no longer listed), so the run can save those steps again."""
    directory = getattr(checkpointer, "directory", None)
    if not skipped or directory is None:
        return
    from etils import epath
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        for bad_step, _ in skipped:
            src = epath.Path(directory) / str(bad_step)
            dst = epath.Path(directory) / f"{bad_step}.damaged"
            if dst.exists():
                dst.rmtree()
            if src.exists():
                src.rename(dst)
                log.warning("set aside the damaged checkpoint %s as %s", src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("openchat_jax: damaged checkpoints set aside")
    if hasattr(checkpointer, "all_steps"):
        checkpointer.all_steps()  # reloads the step list


def _preempted(checkpointer: Any, step: int) -> bool:
    reached = getattr(checkpointer, "reached_preemption", None)
    return bool(reached is not None and reached(step))


@dataclasses.dataclass
class Run:
    config: RunConfig
    model_cfg: LlamaConfig
    mesh: Mesh
    loader: Any  # openchat_jax.data.loader.PackedLoader (or any iterator of local batches)
    dataset_info: dict[str, Any]
    class_names: list[str]
    seq_len: int
    global_batch_size: int
    total_steps: int
    tx: Any
    schedule: Any
    peak_lr: float
    step_fn: StepFn
    flops_per_token: float
    peak_flops: float | None  # all devices together; None = unknown (no MFU)
    seq_len_source: str = "data.max_length"  # where seq_len came from, for the startup summary
    batches_per_epoch: int = 0  # 0 = unknown (no epoch in the metrics)
    eval_hook: Any = None  # train.evaluation.EvalHook when train.eval_every > 0

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def abstract_state(self) -> TrainState:
        return abstract_train_state(self.model_cfg, self.tx, self.mesh)


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    steps_done: int  # global step reached
    stopped: bool  # True when stopped by a signal before total_steps
    history: list[dict[str, float]]  # the logged scalars, one dict per logged step
    final_dir: str | None
    start_step: int = 0  # the step this call started from (restored checkpoint, or 0)
    already_finished: bool = False  # the run had reached its last step and written final/ before this call
    eval_history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # eval/* scalars per eval


def resolve_model_config(config: RunConfig, dataset_info: Mapping[str, Any]) -> LlamaConfig:
    """The model: from `init_from`'s model_config.json (runtime fields from the config), else from
    `config.model`; `model.vocab_size <= 0` means the dataset's vocabulary size."""
    model = config.model
    if config.init_from:
        from openchat_jax.model.checkpoint_io import read_model_config

        stored = read_model_config(config.init_from)
        cfg = stored.replace(**{k: getattr(model, k) for k in RUNTIME_MODEL_FIELDS}, param_dtype=model.param_dtype)
    else:
        cfg = model if model.vocab_size > 0 else model.replace(vocab_size=int(dataset_info["vocab_size"]))
    vocab = int(dataset_info.get("vocab_size", 0))
    if cfg.vocab_size < vocab:
        raise ConfigError(
            f"model vocab_size {cfg.vocab_size} < the dataset's tokenizer vocabulary {vocab} "
            f"({'init_from ' + config.init_from if config.init_from else 'model.vocab_size'}); "
            "set model.vocab_size=0 to take it from the dataset"
        )
    return cfg


def _peak_flops(config: RunConfig, model_cfg: LlamaConfig, mesh: Mesh) -> float | None:
    devices = list(mesh.devices.flat)
    if config.train.peak_flops_per_device > 0:
        return float(config.train.peak_flops_per_device) * len(devices)
    known = flops_lib.peak_flops_from_device_kind(devices[0])
    if known is not None:
        return known * len(devices)
    if devices[0].platform == "cpu":
        # Host devices share the same cores: one measurement is the whole host's peak.
        return flops_lib.measure_matmul_peak(model_cfg.dtype, n=1024, repeats=3, device=devices[0])
    return None


def build_run(
    config: RunConfig | ml_collections.ConfigDict,
    *,
    loader: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> Run:
    """Validate the config and build mesh, loader, model config, optimizer and the jitted step.
    `loader`: anything with the PackedLoader interface (`info`, `batches_per_epoch`, and a
    grain.DatasetIterator's iteration and get_state/set_state, which checkpoints save); default:
    make_loader over `data.dataset_dir`."""
    config = resolve(config)
    mesh = mesh_lib.make_mesh(dataclasses.asdict(config.mesh), devices)
    check_batch(config.train, mesh)  # before reading any data
    B = config.train.global_batch_size
    if loader is None:
        if not config.data.dataset_dir:
            raise ConfigError("data.dataset_dir is empty: run `openchat-jax prepare` and point it at the output")
        from openchat_jax.data.prepare import load_dataset_info

        info = load_dataset_info(config.data.dataset_dir)
    else:
        info = dict(loader.info)
    _check_dataset_matches(config, info)
    seq_len, seq_len_source = row_length(config, info)
    if loader is None:
        from openchat_jax.data.loader import make_loader

        # Endless: the loop stops at total_steps; batch k is batch k % batches_per_epoch of epoch
        # k // batches_per_epoch either way.
        loader = make_loader(config.data.dataset_dir, global_batch_size=B, seq_len=seq_len, seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count(), num_epochs=None)
        info = dict(loader.info)
    total_steps = config.train.num_steps if config.train.num_steps > 0 else config.train.epochs * loader.batches_per_epoch
    class_names = [c["name"] for c in info["classes"]]
    model_cfg = resolve_model_config(config, info)
    if seq_len > model_cfg.max_position_embeddings:
        where = f"init_from {config.init_from}" if config.init_from else "model.max_position_embeddings"
        raise ConfigError(
            f"rows of {seq_len} tokens ({seq_len_source}) are longer than the model's max_position_embeddings="
            f"{model_cfg.max_position_embeddings} ({where}); set train.seq_len <= {model_cfg.max_position_embeddings} "
            f"or prepare the data with data.max_length <= {model_cfg.max_position_embeddings}"
        )
    step = build_step(config, mesh, total_steps=total_steps, model_cfg=model_cfg, seq_len=seq_len,
                      num_classes=len(class_names))
    from openchat_jax.train.evaluation import make_eval_hook

    eval_hook = make_eval_hook(config, info, model_cfg, mesh, total_steps,
                               loss_options(config.train, seq_len)["loss_chunk_length"])
    return Run(
        config=config, model_cfg=model_cfg, mesh=mesh, loader=loader, dataset_info=info, class_names=class_names,
        seq_len=seq_len, global_batch_size=B, total_steps=total_steps, tx=step.tx, schedule=step.schedule,
        peak_lr=step.peak_lr, step_fn=step.fn, flops_per_token=flops_lib.flops_per_token(model_cfg, seq_len),
        peak_flops=_peak_flops(config, model_cfg, mesh), seq_len_source=seq_len_source,
        batches_per_epoch=int(getattr(loader, "batches_per_epoch", 0) or 0), eval_hook=eval_hook,
    )


def row_length(config: RunConfig, info: Mapping[str, Any]) -> tuple[int, str]:
    """Tokens per packed row, and where that number comes from: `train.seq_len` when set (an
    explicit override), else the max_length the dataset was prepared with, else (a loader that
    records none) `data.max_length`."""
    explicit = config.train.seq_len
    prepared = info.get("max_length")
    if explicit:
        if prepared is not None and explicit != prepared:
            return explicit, f"train.seq_len; the dataset was prepared with max_length={prepared}"
        return explicit, "train.seq_len"
    if prepared is not None:
        return int(prepared), "the dataset's max_length"
    return int(config.data.max_length), "data.max_length"


def _check_dataset_matches(config: RunConfig, info: Mapping[str, Any]) -> None:
    prepared = info.get("conditioned")
    if prepared is not None and bool(prepared) != bool(config.train.conditioned):
        raise ConfigError(
            f"train.conditioned={config.train.conditioned} but {config.data.dataset_dir or 'the dataset'} was "
            f"prepared with data.conditioned={prepared}; prepare it again with "
            f"--config.data.conditioned={config.train.conditioned} (templates are applied at prepare time)"
        )
    if not info.get("classes"):
        raise DataError(f"{config.data.dataset_dir}: dataset_info.json lists no classes")


def initial_state(run: Run) -> TrainState:
    """Random init from `seed`, or the `init_from` weights restored straight into their shardings."""
    config = run.config
    if config.init_from:
        from openchat_jax.model.checkpoint_io import load_params

        shardings = param_shardings(run.model_cfg, run.mesh)
        params, _ = load_params(config.init_from, shardings, dtype=run.model_cfg.weight_dtype)
        return init_train_state(run.model_cfg, run.tx, run.mesh, config.seed, params=params)
    return init_train_state(run.model_cfg, run.tx, run.mesh, config.seed)


class _Meter:
    """Turns fetched step metrics into logged scalars: throughput, MFU, error checks."""

    def __init__(self, run: Run):
        self.run = run
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_time: float | None = None
        self.start_time = time.perf_counter()

    def __call__(self, step: int, raw: Mapping[str, np.ndarray], now: float, steps_since: int) -> dict[str, float]:
        run = self.run
        scalars = named_scalars(raw, run.class_names)
        if scalars["weight_sum"] == 0.0:
            raise DataError(
                f"step {step}: the global batch has no supervised token (every weight is 0); "
                "check the class weights and the dataset (see report.json)"
            )
        if scalars["nonfinite"]:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: loss or gradient not finite (loss=%s); update skipped", step, scalars["loss"])
            limit = run.config.train.max_nonfinite_in_a_row
            if limit and self.nonfinite_in_a_row >= limit:
                raise OpenChatError(
                    f"step {step}: {self.nonfinite_in_a_row} non-finite steps in a row "
                    f"(train.max_nonfinite_in_a_row={limit}); stopping"
                )
        else:
            self.nonfinite_in_a_row = 0
        scalars["nonfinite_total"] = float(self.nonfinite_total)
        if run.batches_per_epoch:
            scalars["epoch"] = step / run.batches_per_epoch  # epochs completed, fractional
        scalars["wall_time"] = time.time()
        scalars["elapsed_seconds"] = now - self.start_time
        if self.last_time is not None and steps_since > 0:
            seconds = (now - self.last_time) / steps_since
            scalars["step_seconds"] = seconds
            # Real (non-pad) tokens of this step; the slots include padding and set the compute.
            if "tokens" in scalars:
                scalars["tokens_per_second"] = scalars["tokens"] / seconds
            scalars["slots_per_second"] = run.tokens_per_step / seconds
            if run.peak_flops:
                scalars["mfu"] = scalars["slots_per_second"] * run.flops_per_token / run.peak_flops
        self.last_time = now
        return scalars


def train(
    config: RunConfig | ml_collections.ConfigDict,
    *,
    run: Run | None = None,
    checkpointer: Checkpointing | None = None,
    stop: Any = None,
    save_final: bool = True,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """`say` receives the startup and closing summaries line by line (default: this module's
    logger at INFO, which `openchat-jax train` shows); only process 0 says anything."""
    run = build_run(config) if run is None else run
    config = run.config
    workdir = Path(config.workdir) if config.workdir else None
    if workdir is None:
        raise ConfigError("workdir is empty: give --config.workdir=DIR for logs and the final weights")
    primary = jax.process_index() == 0
    say = say or log.info

    def tell(line: str) -> None:
        if primary:
            say(line)

    if checkpointer is not None and hasattr(checkpointer, "custom_metadata"):
        checkpointer.custom_metadata = classes_record(run.dataset_info)  # saved with every checkpoint
    restored = checkpointer.restore_latest(run.abstract_state(), run.loader) if checkpointer is not None else None
    start = int(restored.step) if restored is not None else 0
    record = run_info.run_record(run)
    if restored is not None:
        try:
            changes = run_info.check_resume(config.workdir, record, start,
                                            allow_changed=config.train.allow_changed_resume)
        except ConfigError:
            checkpointer.close()
            raise
        for line in changes:
            log.warning(line)
        final_path = epath.Path(config.workdir) / FINAL_DIR
        if start >= run.total_steps and (final_path / MODEL_CONFIG).exists():
            checkpointer.close()
            tell(f"already finished at step {start}; final/ is at {final_path} (left as it is)")
            return TrainResult(state=restored.state, steps_done=start, stopped=False, history=[],
                               final_dir=str(final_path), start_step=start, already_finished=True)
    if jax.process_count() > 1:
        # Every process compares with the recorded config.json before process 0 overwrites it.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("openchat_jax: config.json compared")
    if primary:
        run_info.write_record(config.workdir, record)
    paths = run_info.run_paths(config.workdir, tensorboard=config.train.tensorboard,
                               checkpoints=getattr(checkpointer, "directory", None))
    for line in run_info.startup_summary(run, paths, start):
        tell(line)
    t0 = time.perf_counter()

    if restored is not None:
        state = restored.state
        _set_aside_damaged(checkpointer, getattr(restored, "skipped", ()))
        log.info("resumed from step %d", start)
    else:
        state = initial_state(run)
    if start >= run.total_steps:
        log.info("step %d of %d was reached before: writing the final weights", start, run.total_steps)

    writer = MetricsWriter(workdir, enabled=primary, tensorboard=config.train.tensorboard)
    bar = ProgressBar(run.total_steps, initial=start, enabled=primary and config.train.progress)
    meter = _Meter(run)
    history: list[dict[str, float]] = []
    eval_history: list[dict[str, float]] = []
    log_every = max(1, int(config.train.log_every))
    batches: Iterator = iter(run.loader)
    pending: tuple[int, Any] | None = None
    last_fetched = start
    last_saved = start  # a restored step is already saved
    stopped = False
    step = start

    def fetch(pending: tuple[int, Any]) -> None:
        nonlocal last_fetched
        n, metrics = pending
        raw = jax.device_get(metrics)
        now = time.perf_counter()
        scalars = meter(n, raw, now, n - last_fetched)
        bar.update(n - last_fetched, scalars)
        last_fetched = n
        if n % log_every == 0 or n == run.total_steps:
            writer.write(n, scalars)
            history.append({"step": n, **scalars})

    try:
        while step < run.total_steps:
            if (stop is not None and bool(stop)) or _preempted(checkpointer, step):
                stopped = True
                log.warning("stop requested: saving and leaving at step %d", step)
                break
            try:
                local = next(batches)
            except StopIteration:
                raise DataError(f"the loader ran out of batches at step {step} of {run.total_steps}") from None
            state, metrics = run.step_fn(state, mesh_lib.global_batch(local, run.mesh, BATCH_KEYS))
            step += 1
            if pending is not None:
                fetch(pending)  # step n-1's metrics, while step n runs
            pending = (step, metrics)
            if step == start + 1:
                # The first step includes compilation: fetch it now, so throughput is timed from here.
                fetch(pending)
                pending = None
            if run.eval_hook is not None and run.eval_hook.due(step):
                eval_history.append(run.eval_hook(step, state["params"], writer))
            if checkpointer is not None and checkpointer.due(step) and step < run.total_steps:
                checkpointer.save(step, state, run.loader)
                last_saved = step
        if pending is not None:
            fetch(pending)
            pending = None
        if checkpointer is not None and step > last_saved:  # a stop right after a periodic save: saved
            checkpointer.save(step, state, run.loader)
    finally:
        bar.close()
        writer.close()
        if checkpointer is not None:
            checkpointer.close()

    final_dir = None
    if save_final and not stopped and step >= run.total_steps:
        final_dir = str(workdir / FINAL_DIR)
        save_final_weights(run, state, final_dir)
    for line in run_info.closing_summary(step=step, total_steps=run.total_steps, start=start, stopped=stopped,
                                         seconds=time.perf_counter() - t0, last=history[-1] if history else None,
                                         final_dir=final_dir, paths=paths):
        tell(line)
    return TrainResult(state=state, steps_done=step, stopped=stopped, history=history, final_dir=final_dir,
                       start_step=start, eval_history=eval_history)


def save_final_weights(run: Run, state: TrainState, out_dir: str) -> None:
    """The params in the weights-folder format (`convert jax-to-hf`, generation), with the special
    token ids, the tokenizer (with <|end_of_turn|>) and classes.json (the classes and the inference
    condition) so the folder is self-contained."""
    from openchat_jax.model.checkpoint_io import save_params

    info = run.dataset_info
    config = run.config
    tokenizer = None
    tokenizer_src = info.get("tokenizer") or config.data.tokenizer
    if tokenizer_src:
        from openchat_jax.data.tokenizer import load_tokenizer

        tokenizer, _ = load_tokenizer(tokenizer_src)
    special = {
        "bos_token_id": info.get("bos_id"),
        "eos_token_id": None if tokenizer is None else tokenizer.eos_token_id,
        "pad_token_id": info.get("pad_id"),
        "eot_token_id": info.get("eot_id"),
    }
    save_params(
        out_dir, state["params"], run.model_cfg, special_tokens=special,
        copy_assets_from=config.init_from or None, overwrite=True,
    )
    if jax.process_index() == 0:
        if tokenizer is not None and not (Path(out_dir) / "tokenizer").exists():
            from openchat_jax.data.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, Path(out_dir) / "tokenizer")
        record = classes_record(info)
        if record is not None:
            (Path(out_dir) / CLASSES_FILE).write_text(json.dumps(record, indent=1) + "\n")


def classes_record(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The classes and the inference condition of a prepared dataset, as the weights record them
    (`final/classes.json`, each checkpoint's custom metadata); openchat_jax.infer.classes reads it.
    None when the loader's info does not say (a loader not built from a prepared dataset)."""
    keys = ("name", "condition", "weight")
    if not all(k in c for c in info.get("classes", ()) for k in keys):
        return None
    classes = [{k: c[k] for k in keys} for c in info["classes"]]
    record: dict[str, Any] = {"classes": classes}
    for key in ("inference_condition", "template"):
        if info.get(key) is not None:
            record[key] = info[key]
    return record
