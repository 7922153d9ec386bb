"""Data pipeline benchmark on the real ShareGPT export with the Llama-2 tokenizer.

    python benchmarks/data_pipeline.py [--config configs/data_sharegpt.py] [--out /tmp/openchat_bench]

For each sequence length L (default 4096 and 2048): `prepare` with data.max_length = L (wall time,
CPU time of this process and its workers, machine load), then the packing of one epoch into rows
of L: the share of row slots holding real tokens (rows only, and with the last global batch
filled up with empty rows at the given tokens per step), and the loader's speed over some batches.
Finally the exported tokenizer and chat template vs the tokenizer file, on real conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from openchat_jax.config import load_config


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_length(config_path: str, seq_len: int, out: Path, tokens_per_step: int, workers: int) -> dict:
    from openchat_jax.data.loader import make_loader
    from openchat_jax.data.prepare import prepare

    dataset_dir = out / f"sharegpt_L{seq_len}"
    config = load_config(config_path, [f"--config.data.max_length={seq_len}",
                                       f"--config.data.dataset_dir={dataset_dir}",
                                       f"--config.data.num_workers={workers}"])
    load_before = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    report = prepare(config.data, overwrite=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    rows_per_batch = max(1, tokens_per_step // seq_len)
    loader = make_loader(dataset_dir, global_batch_size=rows_per_batch, seq_len=seq_len, seed=0, num_epochs=1)
    real = int(loader.lengths.sum())
    rows = loader.rows_per_epoch
    t1 = time.perf_counter()
    n_batches = min(30, loader.batches_per_epoch)
    nonpad = 0
    for _, batch in zip(range(n_batches), loader):
        nonpad += int(np.count_nonzero(batch["segment_ids"]))
    loader_s = (time.perf_counter() - t1) / n_batches
    return {
        "seq_len": seq_len,
        "prepare_wall_s": round(wall, 1),
        "prepare_cpu_s": round(cpu, 1),
        "load_avg_1min_before": round(load_before, 1),
        "workers": workers or os.cpu_count(),
        "input_records": report["input_records"],
        "examples": report["examples"],
        "skipped": report["skipped"],
        "skipped_by_kind": report["skipped_by_kind"],
        "tokens": real,
        "supervised_tokens": report["totals"]["supervised_tokens"],
        "rows": rows,
        "lower_bound_rows": -(-real // seq_len),
        "packing_efficiency_rows": round(real / (rows * seq_len), 5),
        "rows_per_global_batch": rows_per_batch,
        "batches_per_epoch": loader.batches_per_epoch,
        "packing_efficiency_with_batch_padding": round(
            real / (loader.batches_per_epoch * rows_per_batch * seq_len), 5),
        "first_batches_nonpad_share": round(nonpad / (n_batches * rows_per_batch * seq_len), 5),
        "loader_s_per_batch": round(loader_s, 4),
    }


def chat_template_agreement(config_path: str, limit: int) -> dict:
    """The exported folder (`write_chat_files`, loaded by AutoTokenizer) against the tokenizer file
    itself: per message, AutoTokenizer's ids vs `tokenizers.Tokenizer.from_file` on the message; per
    conversation (up to its last user message), `apply_chat_template` and `build_prompt` vs the
    template assembled from the file's piecewise ids. AutoTokenizer on the source folder is counted
    too (transformers rebuilds Llama's pipeline)."""
    import tempfile

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from openchat_jax.data.config import validate
    from openchat_jax.data.readers import read_conversations
    from openchat_jax.data.template import build_prompt
    from openchat_jax.data.tokenizer import load_tokenizer, tokenizer_folder
    from openchat_jax.hf.chat_files import write_chat_files

    spec = validate(load_config(config_path).data)
    folder = tokenizer_folder(spec.tokenizer)
    file = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def enc(text: str) -> list[int]:
        return file.encode(text, add_special_tokens=False).ids

    tokenizer, eot = load_tokenizer(folder)
    bos = tokenizer.bos_token_id
    convs = read_conversations(spec).conversations[:limit]
    texts = [m.content for c in convs for m in c.messages] + [c.system for c in convs if c.system]
    expected = [enc(t) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        write_chat_files(tmp, tokenizer, eot, "GPT4")
        exported = AutoTokenizer.from_pretrained(tmp)
        rebuilt = AutoTokenizer.from_pretrained(str(folder))
        message_same = sum(list(exported(t, add_special_tokens=False)["input_ids"]) == e for t, e in zip(texts, expected))
        rebuilt_same = sum(list(rebuilt(t, add_special_tokens=False)["input_ids"]) == e for t, e in zip(texts, expected))
        same = built_same = special_text = 0
        for conv in convs:
            history = list(conv.messages[:-1])
            msgs = [{"role": m.role, "content": m.content} for m in history]
            ref = [bos] + ((enc(conv.system) + [eot]) if conv.system else [])
            for m in msgs:
                ref += enc("GPT4 " + ("User:" if m["role"] == "user" else "Assistant:")) + enc(m["content"]) + [eot]
            ref += enc("GPT4 Assistant:")
            built_same += build_prompt(tokenizer, eot, history, conv.system, "GPT4") == ref
            full = ([{"role": "system", "content": conv.system}] if conv.system else []) + msgs
            hf = list(exported.apply_chat_template(full, add_generation_prompt=True, tokenize=True, return_dict=False))
            if hf == ref:
                same += 1
            elif any(s in m["content"] for m in full for s in ("<s>", "</s>", "<unk>", "<|end_of_turn|>")):
                special_text += 1  # the one known difference: HF parses special-token text in messages
    return {"conversations": len(convs), "identical_ids": same, "differ_special_token_text": special_text,
            "differ_other": len(convs) - same - special_text, "build_prompt_identical": built_same,
            "messages": len(texts), "export_messages_identical": message_same,
            "source_autotokenizer_messages_identical": rebuilt_same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/data_sharegpt.py")
    parser.add_argument("--out", default="/tmp/openchat_bench")
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 2048], help="none: only the template check")
    parser.add_argument("--tokens-per-step", type=int, default=196608, help="global batch = this // L rows")
    parser.add_argument("--workers", type=int, default=0, help="tokenization processes (0 = CPU count)")
    parser.add_argument("--template-check", type=int, default=2000, help="conversations (0 = skip)")
    args = parser.parse_args()
    out = Path(args.out)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "lengths": []}
    for seq_len in args.lengths:
        r = bench_length(args.config, seq_len, out, args.tokens_per_step, args.workers)
        results["lengths"].append(r)
        print(json.dumps(r), flush=True)
    if args.template_check:
        results["chat_template"] = chat_template_agreement(args.config, args.template_check)
        print(json.dumps(results["chat_template"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
