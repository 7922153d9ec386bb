"""Decode benchmark: tokens/s of our jitted KV-cache generation against transformers' `generate`
(PyTorch, same weights via the HF export, same CPU), greedy, a fixed number of new tokens (no stop
token), end to end (prefill included), median over repeats after one warm-up run each. PyTorch is
timed at each thread count asked for (default: 1 and its default) and the fastest counts, so the
ratio is not flattered by thread oversubscription on a shared machine.

    python benchmarks/decode.py [--batch-sizes 1,16] [--prompt-len 64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from openchat_jax.infer.generate import generate_tokens
from openchat_jax.model.config import TINY, LlamaConfig
from openchat_jax.model.llama import init_params

LLAMA2_VOCAB_WITH_EOT = 32001  # the tiny model as trained on real text with the Llama-2 tokenizer


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hf_model(params, cfg: LlamaConfig, workdir: Path):
    import transformers

    from openchat_jax.model.checkpoint_io import save_params
    from openchat_jax.hf import export_hf

    save_params(str(workdir / "jax"), jax.device_get(params), cfg)
    export_hf(str(workdir / "jax"), str(workdir / "hf"))
    return transformers.LlamaForCausalLM.from_pretrained(str(workdir / "hf")).eval()


def bench_decode(
    *,
    batch_sizes: Sequence[int] = (1, 16),
    prompt_len: int = 64,
    new_tokens: int = 128,
    repeats: int = 3,
    cfg: LlamaConfig | None = None,
    seed: int = 0,
    torch_threads: Sequence[int] | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Print and return one row per batch size: JAX and transformers tokens/s and their ratio."""
    import torch

    cfg = cfg or TINY.replace(vocab_size=LLAMA2_VOCAB_WITH_EOT, max_position_embeddings=2048)
    default_threads = torch.get_num_threads()
    thread_counts = sorted(set(torch_threads or (1, default_threads)))
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = _hf_model(params, cfg, Path(tmp))
        print_fn(
            f"decode benchmark {datetime.date.today()}: {cfg.num_layers} layers, embed {cfg.embed}, vocab "
            f"{cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M params, {cfg.dtype}; prompt {prompt_len} tokens, "
            f"{new_tokens} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform} "
            f"({jax.device_count()} device(s)), torch {torch.__version__} (threads tried: {thread_counts})"
        )
        print_fn("| batch | JAX tokens/s | transformers tokens/s (torch threads) | ratio JAX/transformers | same tokens |")
        print_fn("|---:|---:|---:|---:|:---:|")
        for B in batch_sizes:
            prompts = rng.integers(3, cfg.vocab_size, (B, prompt_len)).tolist()
            jax_out: list = []

            def run_jax() -> None:
                jax_out[:] = generate_tokens(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=[],
                                             length_bucket=prompt_len)

            ids = torch.tensor(prompts)
            hf_out: list = []

            def run_hf() -> None:
                with torch.no_grad():
                    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            eos_token_id=None, pad_token_id=0)
                hf_out[:] = out[:, prompt_len:].tolist()

            t_jax = median_seconds(run_jax, repeats)
            t_hf, best_threads = float("inf"), 0
            for threads in thread_counts:
                torch.set_num_threads(threads)
                t = median_seconds(run_hf, repeats)
                if t < t_hf:
                    t_hf, best_threads = t, threads
            torch.set_num_threads(default_threads)
            same = [g.tokens for g in jax_out] == hf_out
            row = {"batch": B, "jax_tokens_per_s": B * new_tokens / t_jax,
                   "hf_tokens_per_s": B * new_tokens / t_hf, "torch_threads": best_threads, "same_tokens": same}
            row["ratio"] = row["jax_tokens_per_s"] / row["hf_tokens_per_s"]
            rows.append(row)
            print_fn(f"| {B} | {row['jax_tokens_per_s']:.0f} | {row['hf_tokens_per_s']:.0f} ({best_threads}) | "
                     f"{row['ratio']:.2f} | {'yes' if same else 'no'} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=LLAMA2_VOCAB_WITH_EOT)
    parser.add_argument("--torch-threads", help="comma-separated thread counts to try (default: 1 and torch's default)")
    args = parser.parse_args(argv)
    cfg = TINY.replace(vocab_size=args.vocab_size, max_position_embeddings=2048)
    bench_decode(batch_sizes=[int(b) for b in args.batch_sizes.split(",")], prompt_len=args.prompt_len,
                 new_tokens=args.new_tokens, repeats=args.repeats, cfg=cfg,
                 torch_threads=[int(t) for t in args.torch_threads.split(",")] if args.torch_threads else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
