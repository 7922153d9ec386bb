"""Meta-Llama-3-8B (the base of openchat-3.6) for C-RLFT: the model as its config.json (GQA 32/8
heads, vocab 128256, rope theta 5e5), rows of 8192 tokens (its context), 24 rows = 196,608 tokens
per step (~200k, as the paper), bf16 compute, float32 master weights and AdamW state, full remat.
openchat-3.6 ends a turn with Llama-3's own <|eot_id|>, so the vocabulary stays 128256.

    openchat-jax convert hf-to-jax --hf-dir LLAMA3_8B_HF_DIR --out W
    openchat-jax prepare --config configs/llama3_8b.py --config.data.files=[...]
    openchat-jax train --config configs/llama3_8b.py --config.init_from=W --config.workdir=RUN

Llama-3.1-8B differs only by its rope scaling (type llama3, factor 8, context 131072), which
`convert hf-to-jax` reads from its config.json. A micro-batch must split evenly over the mesh's
data x fsdp devices: 24 rows fit 8 or 24 chips; on 16 or 32 chips use global_batch_size=32.
"""

import ml_collections

from openchat_jax.train.config import accelerator_run_config


def get_config() -> ml_collections.ConfigDict:
    # "meta-llama/Meta-Llama-3-8B" or a local tokenizer folder.
    config = accelerator_run_config("llama3_8b", max_length=8192, tokenizer="meta-llama/Meta-Llama-3-8B", global_batch_size=24)
    config.data.template = "openchat_3.6"
    return config
