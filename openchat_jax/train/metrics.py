"""Metrics out of the step: named scalars, JSONL + TensorBoard files, and a progress bar.

Files in WORKDIR (written by process 0 only):
  metrics.jsonl   one JSON object per logged step: {"step": n, "epoch": ..., "loss": ...,
                  "class/gpt4/loss": ..., "wall_time": unix seconds, "elapsed_seconds": since the start
                  of this process's run, "tokens_per_second": non-pad tokens, "slots_per_second":
                  token slots including padding (what MFU counts)}
  tb/             TensorBoard event files (tensorboardX, no TensorFlow needed)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PER_CLASS = {"class_loss": "loss", "class_accuracy": "accuracy", "class_tokens": "tokens"}


def named_scalars(raw: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, float]:
    """Step outputs (host arrays) -> flat {name: float}; per-class vectors become
    `class/<name>/{loss,accuracy,tokens}`. A class with no token in the step has no loss/accuracy
    entry (rather than a misleading 0)."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key in PER_CLASS:
            continue
        out[key] = float(np.asarray(value))
    tokens = np.asarray(raw.get("class_tokens", np.zeros(len(class_names))))
    for key, short in PER_CLASS.items():
        if key not in raw:
            continue
        values = np.asarray(raw[key])
        for c, name in enumerate(class_names):
            if short != "tokens" and tokens[c] == 0:
                continue
            out[f"class/{name}/{short}"] = float(values[c])
    return out


def _json_value(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no nan/inf


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / TB_DIR))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **{k: _json_value(v) for k, v in scalars.items()}}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOG_REFRESH_SECONDS = 30.0


class ProgressBar:
    """tqdm bar showing loss, tokens/s and MFU; silent when disabled."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            # Redirected to a log file (pods, CI, `> log`), every refresh would be kept: refresh
            # rarely there; the full per-step record is metrics.jsonl.
            interactive = sys.stderr.isatty()
            self._bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.1 if interactive else LOG_REFRESH_SECONDS,
            )

    def update(self, n: int, scalars: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{scalars.get('loss', float('nan')):.4f}"}
        if "tokens_per_second" in scalars:
            post["tok/s"] = f"{scalars['tokens_per_second']:.0f}"
        if "mfu" in scalars:
            post["mfu"] = f"{100 * scalars['mfu']:.1f}%"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
