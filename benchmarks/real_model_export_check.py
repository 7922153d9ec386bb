"""A fine-tuned model exported with `openchat-jax convert jax-to-hf`, back in transformers: it loads,
its chat template renders the same ids as `openchat-jax generate` (the answers file's prompts go
through transformers' `apply_chat_template`), greedy generation with the export's own
generation_config stops at the end of a turn, and the tokens equal those `openchat-jax generate`
wrote for the same prompts.

    openchat-jax convert jax-to-hf --ckpt runs/real/crlft/final --out runs/real/crlft_hf
    python benchmarks/real_model_export_check.py --hf-dir runs/real/crlft_hf \
        --answers runs/real/crlft/answers.jsonl --prompts runs/real/data/heldout_prompts.jsonl -n 5

Prints one line per prompt and a summary; exits 1 if any answer differs or any generation did not
stop at an end-of-turn id.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, required=True, help="convert jax-to-hf output")
    parser.add_argument("--answers", type=Path, required=True, help="openchat-jax generate output for the same model")
    parser.add_argument("--prompts", type=Path, required=True, help="the prompts file generate read")
    parser.add_argument("-n", type=int, default=5, help="prompts to check")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="as given to generate")
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    config = model.generation_config
    stop_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    print(f"{args.hf_dir}: {type(model).__name__}, {type(tokenizer).__name__}, eos_token_id {stop_ids} "
          f"({tokenizer.convert_ids_to_tokens(stop_ids)})")
    answers = {a.get("id", a.get("question_id")): a for a in read_jsonl(args.answers)}
    prompts = read_jsonl(args.prompts)[: args.n]
    ok = True
    for record in prompts:
        answer = answers[record["id"]]
        ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=stop_ids[0])[0, len(ids):].tolist()
        seconds = time.perf_counter() - start
        stopped = bool(out) and out[-1] in stop_ids
        text = tokenizer.decode([t for t in out if t not in stop_ids])
        same_prompt = len(ids) == answer["prompt_tokens"][-1]
        same_text = text.strip() == answer["answers"][-1].strip()
        same_stop = stopped == (answer["finish_reasons"][-1] == "stop")
        ok &= same_prompt and same_text and same_stop
        print(f"{record['id']}: {len(ids)} prompt ids ({'same as' if same_prompt else 'DIFFERENT from'} generate's "
              f"{answer['prompt_tokens'][-1]}), {len(out)} new in {seconds:.1f} s, "
              f"{'stopped at ' + tokenizer.convert_ids_to_tokens(out[-1]) if stopped else 'hit max_new_tokens'} "
              f"(generate: {answer['finish_reasons'][-1]}, {answer['new_tokens'][-1]} new); "
              f"text {'equal to' if same_text else 'DIFFERENT from'} generate's")
        print(f"    {text[:160]!r}")
    print("all equal" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
