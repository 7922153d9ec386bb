"""The accelerator check: one command on one GPU or TPU host, under 10 minutes.

1. Attention: the platform's kernel (`auto`: cuDNN on GPU, splash on TPU) against the `xla`
   backend on packed rows, forward and backward (gradients of q, k and v): max abs and relative
   error, and time per call.
2. Train step: tokens/s and MFU of a 1B-shaped Llama (the `bench train-step` machinery:
   `benchmarks/train_step.py` `JaxStep` on a synthetic batch, `train.flops` for the FLOPs and the chip's peak).
3. Decode: tokens/s of our KV-cache generation against transformers' `generate` on the same
   device, greedy, same weights (torch on CUDA; skipped with a message when torch has no CUDA,
   and on TPU).

    python benchmarks/accelerator_check.py [--json FILE]
    python benchmarks/accelerator_check.py --tiny     # on CPU in seconds: the same code at toy sizes

On CPU there is no attention kernel: the cuDNN backend runs through JAX's XLA implementation of
the same call (OPENCHAT_CUDNN_IMPLEMENTATION=xla), which checks its masks and layouts, the peak
FLOP/s is a measured matmul's, and transformers runs on the CPU too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's benchmarks package

from benchmarks.decode import median_seconds  # noqa: E402
from benchmarks.train_step import JaxStep, bench_batch  # noqa: E402
from openchat_jax.config import resolve  # noqa: E402
from openchat_jax.infer.generate import generate_tokens  # noqa: E402
from openchat_jax.model.attention import get_backend, resolve_backend, xla_attention  # noqa: E402
from openchat_jax.model.config import TINY, LlamaConfig  # noqa: E402
from openchat_jax.model.llama import init_params  # noqa: E402
from openchat_jax.train import flops as flops_lib  # noqa: E402
from openchat_jax.train.config import base_config  # noqa: E402

# TinyLlama-1.1B's shape (Llama-2 architecture, grouped-query attention).
ONE_B = LlamaConfig(vocab_size=32000, embed=2048, mlp=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                    head_dim=64, max_position_embeddings=4096, dtype="bfloat16", remat_policy="dots")


@dataclasses.dataclass(frozen=True)
class Sizes:
    attention: tuple[int, int, int, int, int]  # B, L, H, K, D
    train_model: LlamaConfig
    train_batch: tuple[int, int]  # B, L
    train_steps: int
    decode_model: LlamaConfig
    decode_batch: int
    prompt_len: int
    new_tokens: int
    repeats: int


FULL = Sizes(attention=(4, 4096, 32, 4, 64), train_model=ONE_B, train_batch=(8, 2048), train_steps=5,
             decode_model=ONE_B, decode_batch=16, prompt_len=128, new_tokens=128, repeats=3)
SMALL = TINY.replace(num_layers=1, embed=64, mlp=128, head_dim=16, vocab_size=128, scan_layers=False)
TINY_SIZES = Sizes(attention=(2, 128, 4, 2, 32), train_model=SMALL, train_batch=(8, 32), train_steps=2,
                   decode_model=SMALL, decode_batch=2, prompt_len=8, new_tokens=4, repeats=1)


def _packed_segments(B: int, L: int) -> np.ndarray:
    """Each row: three conversations of unequal length, then padding (segment 0)."""
    seg = np.zeros((B, L), np.int32)
    cuts = [0, 2 * L // 5, 3 * L // 4, 15 * L // 16]
    for i in range(3):
        seg[:, cuts[i]:cuts[i + 1]] = i + 1
    return seg


def _errors(got: Any, ref: Any) -> dict[str, float]:
    got, ref = (np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(t)]) for t in (got, ref))
    max_abs = float(np.max(np.abs(got - ref)))
    return {"max_abs": max_abs, "max_rel": max_abs / float(np.max(np.abs(ref)))}


def check_attention(sizes: Sizes, report: Callable[[str], None]) -> dict[str, Any]:
    B, L, H, K, D = sizes.attention
    name = resolve_backend("auto")
    if name == "xla":
        name = "cudnn"
        os.environ.setdefault("OPENCHAT_CUDNN_IMPLEMENTATION", "xla")
        report("attention: no kernel on this platform; cudnn's call runs through JAX's XLA implementation")
    attend = get_backend(name)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, heads, D)), jnp.bfloat16) for heads in (H, K, K))
    seg = jnp.asarray(_packed_segments(B, L))
    real = (seg != 0)[:, :, None, None]
    cotangent = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32) * real  # no gradient from padding

    def forward(fn):
        return jax.jit(lambda q, k, v: fn(q, k, v, seg, seg))

    def backward(fn):
        return jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v, seg, seg).astype(jnp.float32) * cotangent).sum(),
                                argnums=(0, 1, 2)))

    out = {"backend": name, "shape_BxLxHxKxD": [B, L, H, K, D], "dtype": "bfloat16"}
    for part, make in (("forward", forward), ("backward", backward)):
        kernel, ref = make(attend), make(xla_attention)
        got, want = kernel(q, k, v), ref(q, k, v)
        if part == "forward":
            got, want = got * real, want * real
        errors = _errors(got, want)
        times = {which: median_seconds(lambda fn=fn: jax.block_until_ready(fn(q, k, v)), sizes.repeats)
                 for which, fn in ((name, kernel), ("xla", ref))}
        out[part] = {**errors, "seconds": times}
        report(f"attention {part}: {name} vs xla: max abs {errors['max_abs']:.2e}, max rel {errors['max_rel']:.2e}; "
               f"{1e3 * times[name]:.2f} ms vs {1e3 * times['xla']:.2f} ms")
    return out


def check_train_step(sizes: Sizes, report: Callable[[str], None]) -> dict[str, Any]:
    cfg = sizes.train_model
    B, L = sizes.train_batch
    run = base_config()
    run.train.global_batch_size = B
    batch = bench_batch(np.random.default_rng(0), B, L, cfg.vocab_size)
    step = JaxStep(resolve(run), batch, model_cfg=cfg)
    step()  # first execution
    seconds = statistics.median(step() for _ in range(sizes.train_steps))
    device = jax.devices()[0]
    known = flops_lib.peak_flops_from_device_kind(device)
    # Fake CPU devices share the host's cores: the host's measured peak counts once.
    peak = known * jax.device_count() if known else flops_lib.measure_matmul_peak(cfg.dtype, n=512 if B * L < 4096 else 2048)
    tokens_per_second = B * L / seconds
    mfu = tokens_per_second * flops_lib.flops_per_token(cfg, L) / peak
    report(f"train step: {cfg.num_params() / 1e6:.1f}M params, batch {B} x {L}, {cfg.dtype}, attention "
           f"{resolve_backend(cfg.attention)}, remat {cfg.remat_policy}: compiled in {step.compile_seconds:.1f} s, "
           f"median {seconds:.3f} s, {tokens_per_second:.0f} tokens/s, MFU {100 * mfu:.1f}% of "
           f"{peak / 1e12:.3g} TFLOP/s ({'datasheet' if known else 'measured matmul'}); loss {step.last_loss:.4f}")
    return {"params": cfg.num_params(), "batch": [B, L], "compile_seconds": step.compile_seconds,
            "step_seconds": seconds, "tokens_per_second": tokens_per_second, "mfu": mfu, "peak_flops": peak,
            "peak_from": "datasheet" if known else "measured matmul", "loss": step.last_loss}


def _torch_device(report: Callable[[str], None]) -> str | None:
    platform = jax.devices()[0].platform
    if platform == "cpu":
        return "cpu"
    if platform == "gpu":
        import torch

        if torch.cuda.is_available():
            return "cuda"
        report(f"decode: transformers skipped: torch {torch.__version__} has no CUDA (a CPU build?)")
        return None
    report(f"decode: transformers skipped: torch does not run on {platform}")
    return None


def _hf_model(params: Any, cfg: LlamaConfig, workdir: Path, device: str):
    import torch
    import transformers

    from openchat_jax.model.checkpoint_io import save_params
    from openchat_jax.hf import export_hf

    save_params(str(workdir / "jax"), jax.device_get(params), cfg)
    export_hf(str(workdir / "jax"), str(workdir / "hf"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    return transformers.LlamaForCausalLM.from_pretrained(str(workdir / "hf"), dtype=dtype).to(device).eval()


def check_decode(sizes: Sizes, report: Callable[[str], None]) -> dict[str, Any]:
    cfg, B, P, N = sizes.decode_model, sizes.decode_batch, sizes.prompt_len, sizes.new_tokens
    params = init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P)).tolist()
    ours: list = []

    def run_jax() -> None:
        ours[:] = generate_tokens(params, cfg, prompts, max_new_tokens=N, stop_ids=[], length_bucket=P)

    out: dict[str, Any] = {"batch": B, "prompt_len": P, "new_tokens": N, "dtype": cfg.dtype,
                           "jax_tokens_per_second": B * N / median_seconds(run_jax, sizes.repeats)}
    line = f"decode: batch {B}, prompt {P}, {N} new tokens, {cfg.dtype}: ours {out['jax_tokens_per_second']:.0f} tokens/s"
    device = _torch_device(report)
    if device is not None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            hf_model = _hf_model(params, cfg, Path(tmp), device)
            ids = torch.tensor(prompts, device=device)
            theirs: list = []

            def run_hf() -> None:
                with torch.no_grad():
                    generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0)
                theirs[:] = generated[:, P:].tolist()  # .tolist() waits for the device

            out["hf_device"] = device
            out["hf_tokens_per_second"] = B * N / median_seconds(run_hf, sizes.repeats)
        out["ratio"] = out["jax_tokens_per_second"] / out["hf_tokens_per_second"]
        out["same_tokens"] = [g.tokens for g in ours] == theirs
        line += (f", transformers on torch {device} {out['hf_tokens_per_second']:.0f} tokens/s "
                 f"(ratio {out['ratio']:.2f}), same tokens: {'yes' if out['same_tokens'] else 'no'}")
    report(line)
    return out


def _report(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (runs on CPU in seconds)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON to FILE")
    args = parser.parse_args(argv)
    sizes = TINY_SIZES if args.tiny else FULL
    device = jax.devices()[0]
    print(f"accelerator check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
          f"{device.device_kind} x{jax.device_count()} ({device.platform}), jax {jax.__version__}"
          f"{', tiny sizes' if args.tiny else ''}", flush=True)
    report = _report
    result: dict[str, Any] = {"device": device.device_kind, "platform": device.platform,
                              "device_count": jax.device_count(), "tiny": args.tiny, "seconds": {}}
    for part, check in (("attention", check_attention), ("train_step", check_train_step), ("decode", check_decode)):
        start = time.perf_counter()
        result[part] = check(sizes, report)
        result["seconds"][part] = time.perf_counter() - start
    print(f"done in {sum(result['seconds'].values()):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if math.isfinite(result["train_step"]["loss"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
