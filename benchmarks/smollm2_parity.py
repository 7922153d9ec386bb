"""SmolLM2-135M-Instruct through `convert hf-to-jax` against transformers on the same float32
weights (docs/real_model.md): per prompt, the logits' largest difference (absolute and relative to
the largest logit) and whether greedy answers (up to 32 tokens, stopping at <|im_end|>) agree,
with timings. HF_DIR comes from `python -m openchat_jax.hf.smollm2 --out HF_DIR`, JAX_DIR from
`openchat-jax convert hf-to-jax --hf-dir HF_DIR --out JAX_DIR`.

    python benchmarks/smollm2_parity.py --hf-dir HF_DIR --ckpt JAX_DIR
"""

from __future__ import annotations

import argparse
import copy
import time

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from openchat_jax.infer.generate import generate_tokens
from openchat_jax.model import checkpoint_io
from openchat_jax.model.llama import forward
from openchat_jax.hf.smollm2 import QUESTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    params, cfg = checkpoint_io.load_params(args.ckpt)
    cfg = cfg.replace(dtype="float32")
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"])
               for q in QUESTIONS]
    eos = tokenizer.eos_token_id

    start = time.perf_counter()
    ours = generate_tokens(params, cfg, prompts, max_new_tokens=args.new_tokens, stop_ids=[eos], length_bucket=16)
    ours_s = time.perf_counter() - start
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos)
    hf_s = 0.0
    for question, p, g in zip(QUESTIONS, prompts, ours):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits.numpy()
            start = time.perf_counter()
            theirs = model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist()
            hf_s += time.perf_counter() - start
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        logits = np.asarray(forward(params, cfg, jnp.asarray([p]), jnp.arange(len(p))[None], jnp.ones((1, len(p)), jnp.int32)).logits)
        diff = np.abs(logits - ref).max()
        print(f"{question!r}: {len(p)} prompt tokens; logits max |diff| {diff:.2e} (relative {diff / np.abs(ref).max():.2e}); "
              f"greedy {len(g.tokens)} tokens, {'equal to' if g.tokens == theirs else 'DIFFERENT from'} transformers'")
        print(f"    {tokenizer.decode(g.tokens)!r}")
    print(f"generation: ours {ours_s:.1f} s for the batch of {len(prompts)} (compile included); "
          f"transformers {hf_s:.1f} s one prompt at a time")


if __name__ == "__main__":
    main()
