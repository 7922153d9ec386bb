"""Benchmark: time and peak host memory of `convert hf-to-jax` and `convert jax-to-hf`.

    python benchmarks/convert_memory.py --embed 1024 --mlp 2816 --layers 8 --dtype float32

Writes a random HF Llama checkpoint (no torch) into a temporary folder, runs each direction in its
own process (so peak RSS is that command's alone) and prints seconds, peak RSS and the model's
size. The claim it checks: peak RSS stays well under baseline + 2 x model size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def write_random_hf(folder: Path, *, vocab: int, embed: int, mlp: int, layers: int, heads: int, kv_heads: int,
                    dtype: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    head_dim = embed // heads

    def rand(*shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(np_dtype)

    total = 0
    top = {"model.embed_tokens.weight": rand(vocab, embed), "model.norm.weight": rand(embed), "lm_head.weight": rand(vocab, embed)}
    weight_map = {n: "model-top.safetensors" for n in top}
    save_file(top, str(folder / "model-top.safetensors"), metadata={"format": "pt"})
    total += sum(t.nbytes for t in top.values())
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "input_layernorm.weight": rand(embed), p + "post_attention_layernorm.weight": rand(embed),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, embed),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, embed),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, embed),
            p + "self_attn.o_proj.weight": rand(embed, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(mlp, embed), p + "mlp.up_proj.weight": rand(mlp, embed),
            p + "mlp.down_proj.weight": rand(embed, mlp),
        }
        save_file(tensors, str(folder / f"model-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update({n: f"model-{i}.safetensors" for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": embed,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": dtype,
    }))
    return total


def run_measured(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-shard-size", default="200MB")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_random_hf(root / "hf", vocab=args.vocab, embed=args.embed, mlp=args.mlp, layers=args.layers,
                               heads=args.heads, kv_heads=args.kv_heads, dtype=args.dtype)
        py = [sys.executable, "-c"]
        base_s, base_rss = run_measured(py + ["import openchat_jax.hf, openchat_jax.cli.convert"])
        cli = "import sys; from openchat_jax.cli import main; sys.exit(main(sys.argv[1:]))"
        to_jax = run_measured(py + [cli, "convert", "hf-to-jax", "--hf-dir", str(root / "hf"), "--out", str(root / "jax")])
        to_hf = run_measured(py + [cli, "convert", "jax-to-hf", "--ckpt", str(root / "jax"), "--out", str(root / "back"),
                                   "--max-shard-size", args.max_shard_size])
        largest_leaf = max(args.layers * 3 * args.mlp * args.embed, args.vocab * args.embed) * np.dtype(
            ml_dtypes.bfloat16 if args.dtype == "bfloat16" else args.dtype).itemsize
        mib = 2**20
        print(f"model {size / mib:.0f} MiB ({args.dtype}, {args.layers} layers, embed {args.embed}, mlp {args.mlp}, "
              f"vocab {args.vocab}); largest stacked leaf {largest_leaf / mib:.0f} MiB")
        print(f"baseline (imports only): {base_s:.1f} s, peak RSS {base_rss / mib:.0f} MiB")
        for name, (secs, rss) in (("hf-to-jax", to_jax), ("jax-to-hf", to_hf)):
            print(f"{name}: {secs:.1f} s, peak RSS {rss / mib:.0f} MiB = baseline + {(rss - base_rss) / size:.2f} x model")


if __name__ == "__main__":
    main()
