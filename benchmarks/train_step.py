"""`openchat-jax bench train-step` (this file, run from a source checkout): our jitted train step against transformers + torch.optim.AdamW
on the same model, batch and optimizer step, on this machine's CPU.

1. A matmul peak: the best FLOP/s of a chained n x n matmul in the model's compute dtype (JAX),
   accumulated in float32 as the model's matmuls are.
2. Both steps are compiled / warmed up, then timed in alternating rounds (JAX steps, torch steps,
   JAX, ...) so that load from other processes hits both alike; medians are reported, and the
   matmul peak is re-measured after each round (MFU uses the best one). Each side's first
   `settle_steps` steps of a round are run but not timed: the first step after the other
   framework ran pays for its thread pool and caches (docs/benchmarks.md, `--settle-steps`).
3. Work per step is the same on both sides: B rows of L tokens, one conversation per row (HF has
   no packing), weighted CE sum(w * CE) / sum(w), backward, global-norm clip 1.0, AdamW update.
MFU uses the FLOPs formula of openchat_jax.train.flops (model FLOPs, not counting remat). Our
loss computes no logits for tokens of weight 0 (train.skip_unsupervised_logits) where torch computes
them all, so the JAX side also reports the share of the peak in FLOPs it executed: the formula
less the LM head's FLOPs for the positions it skipped.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from openchat_jax.config import resolve
from openchat_jax.errors import ConfigError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.train import flops as flops_lib
from openchat_jax.train import mesh as mesh_lib
from openchat_jax.train.config import RunConfig, TrainConfig
from openchat_jax.train.step import build_step, init_train_state


def bench_batch(rng: np.random.Generator, batch_size: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Unpacked rows (one conversation each, no pad), ~60% of targets supervised, classes 1.0/0.1."""
    shape = (batch_size, seq_len)
    tokens = rng.integers(1, vocab_size, shape, dtype=np.int32)
    targets = np.concatenate([tokens[:, 1:], rng.integers(1, vocab_size, (batch_size, 1), dtype=np.int32)], axis=1)
    class_ids = np.repeat(rng.integers(0, 2, (batch_size, 1), dtype=np.int32), seq_len, axis=1)
    weights = np.where(rng.random(shape) < 0.6, np.where(class_ids == 0, 1.0, 0.1), 0.0).astype(np.float32)
    return {
        "tokens": tokens, "targets": targets, "weights": weights,
        "segment_ids": np.ones(shape, np.int32), "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
        "class_ids": class_ids,
    }


class JaxStep:
    """The run config's train step (`build_step`, as `train` builds it) on `batch` (two classes),
    initialised from `run.seed`; `model_cfg` replaces `run.model`."""

    def __init__(self, run: RunConfig, batch: dict, *, model_cfg: LlamaConfig | None = None):
        B, L = batch["tokens"].shape
        if B != run.train.global_batch_size:
            raise ConfigError(f"a batch of {B} rows for train.global_batch_size={run.train.global_batch_size}")
        self.mesh = mesh_lib.make_mesh(dataclasses.asdict(run.mesh))
        step = build_step(run, self.mesh, total_steps=1000, model_cfg=model_cfg, seq_len=L, num_classes=2)
        self.state = init_train_state(step.model_cfg, step.tx, self.mesh, run.seed)
        self.batch = mesh_lib.global_batch(batch, self.mesh)
        t0 = time.perf_counter()
        self.compiled = step.fn.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t0

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        self.last_loss = loss
        self.lm_head_tokens = float(metrics["lm_head_tokens"])
        return time.perf_counter() - t0


class TorchStep:
    """transformers LlamaForCausalLM + torch.optim.AdamW, same shapes and hyperparameters."""

    def __init__(self, model_cfg: LlamaConfig, train_cfg: TrainConfig, batch: dict, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        hf_cfg = transformers.LlamaConfig(
            vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.embed, intermediate_size=model_cfg.mlp,
            num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
            num_key_value_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
            rms_norm_eps=model_cfg.rms_norm_eps, max_position_embeddings=max(model_cfg.max_position_embeddings, batch["tokens"].shape[1]),
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
            attn_implementation="sdpa", use_cache=False,
        )
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_cfg.dtype]
        self.model = transformers.LlamaForCausalLM(hf_cfg).float().train()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(train_cfg.b1, train_cfg.b2), eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        )
        self.grad_clip = train_cfg.grad_clip
        self.tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        self.positions = torch.from_numpy(batch["positions"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64))
        self.weights = torch.from_numpy(batch["weights"])

    def __call__(self) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(input_ids=self.tokens, position_ids=self.positions).logits
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten(), reduction="none")
        loss = (self.weights.flatten() * ce).sum() / self.weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())
        return time.perf_counter() - t0


def bench_train_step(
    config: RunConfig | ml_collections.ConfigDict,
    *,
    rounds: int = 3,
    steps_per_round: int = 3,
    settle_steps: int = 1,
    torch_compare: bool = True,
    matmul_size: int = 2048,
    report: Any = print,
) -> dict[str, Any]:
    config = resolve(config)
    model_cfg = config.model
    if rounds < 1 or steps_per_round < 1 or settle_steps < 0:
        raise ConfigError(f"bench needs rounds >= 1, steps per round >= 1 and settle steps >= 0; got {rounds}, "
                          f"{steps_per_round}, {settle_steps}")
    if model_cfg.vocab_size <= 0:
        raise ConfigError("bench needs model.vocab_size > 0 (no dataset is read)")
    B, L = config.train.global_batch_size, config.data.max_length
    device = jax.devices()[0]
    threads = os.cpu_count() or 1
    report(f"device: {device.device_kind} x{len(jax.devices())} ({device.platform}); torch threads: {threads}")
    report(f"model: {model_cfg.num_params() / 1e6:.1f}M params ({flops_lib.matmul_params(model_cfg) / 1e6:.1f}M in matmuls), "
           f"dtype {model_cfg.dtype}, scan_layers={model_cfg.scan_layers}, remat={model_cfg.remat_policy}; batch {B} x {L}")

    peak = flops_lib.measure_matmul_peak(model_cfg.dtype, n=matmul_size, device=device)
    report(f"matmul peak ({model_cfg.dtype}, {matmul_size}^3): {peak / 1e9:.1f} GFLOP/s")
    fpt = flops_lib.flops_per_token(model_cfg, L)
    batch = bench_batch(np.random.default_rng(config.seed), B, L, model_cfg.vocab_size)

    jax_step = JaxStep(config, batch)
    report(f"jax: compiled in {jax_step.compile_seconds:.1f} s")
    jax_step()  # warm-up (first execution)
    torch_step = None
    if torch_compare:
        torch_step = TorchStep(model_cfg, config.train, batch, threads)
        torch_step()  # warm-up
    jax_times: list[float] = []
    torch_times: list[float] = []
    peaks = [peak]
    def timed(step: Any) -> list[float]:
        return [step() for _ in range(settle_steps + steps_per_round)][settle_steps:]

    for _ in range(rounds):
        jax_times += timed(jax_step)
        if torch_step is not None:
            torch_times += timed(torch_step)
        peaks.append(flops_lib.measure_matmul_peak(model_cfg.dtype, n=matmul_size, device=device))
    # Other processes may share the CPU: the matmul peak is re-measured after every round and MFU
    # is taken against the best of them (conservative).
    peak = max(peaks)
    report(f"timed steps: {steps_per_round} per round and side, after {settle_steps} untimed")
    report(f"matmul peak re-measured per round: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s; using the best")

    tokens = B * L
    result: dict[str, Any] = {
        "matmul_peak_flops": peak, "matmul_peaks": peaks, "flops_per_token": fpt, "tokens_per_step": tokens,
        "settle_steps": settle_steps, "jax_step_seconds": statistics.median(jax_times), "jax_step_times": jax_times,
    }
    result["jax_tokens_per_second"] = tokens / result["jax_step_seconds"]
    result["jax_mfu"] = result["jax_tokens_per_second"] * fpt / peak
    skipped = tokens - jax_step.lm_head_tokens
    result["jax_lm_head_tokens"] = jax_step.lm_head_tokens
    result["jax_executed_fraction_of_peak"] = (
        result["jax_tokens_per_second"] * (fpt - skipped / tokens * flops_lib.lm_head_flops_per_token(model_cfg)) / peak)
    report(f"jax   step: median {result['jax_step_seconds']:.3f} s (min {min(jax_times):.3f}), "
           f"{result['jax_tokens_per_second']:.0f} tokens/s, {100 * result['jax_mfu']:.1f}% of matmul peak")
    if skipped:
        report(f"      the loss computed logits for {jax_step.lm_head_tokens:.0f} of {tokens} positions (the rest have "
               f"weight 0): FLOPs executed {100 * result['jax_executed_fraction_of_peak']:.1f}% of matmul peak")
    if torch_step is not None:
        result["torch_step_seconds"] = statistics.median(torch_times)
        result["torch_step_times"] = torch_times
        result["torch_tokens_per_second"] = tokens / result["torch_step_seconds"]
        result["torch_mfu"] = result["torch_tokens_per_second"] * fpt / peak
        result["speedup_vs_torch"] = result["torch_step_seconds"] / result["jax_step_seconds"]
        report(f"torch step: median {result['torch_step_seconds']:.3f} s (min {min(torch_times):.3f}), "
               f"{result['torch_tokens_per_second']:.0f} tokens/s, {100 * result['torch_mfu']:.1f}% of matmul peak")
        report(f"jax / torch speed: {result['speedup_vs_torch']:.2f}x")
    return result
