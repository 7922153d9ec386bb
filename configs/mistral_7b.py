"""Mistral-7B-v0.1 (the base of openchat-3.5) for C-RLFT: the model as its config.json (GQA 32/8
heads, sliding window 4096), rows of 8192 tokens as the reference implementation's Mistral
configs, 24 rows = 196,608 tokens per step (~200k, as the paper), bf16 compute, float32 master
weights and AdamW state, full remat.

    openchat-jax convert hf-to-jax --hf-dir MISTRAL_7B_HF_DIR --out W --add-eot
    openchat-jax prepare --config configs/mistral_7b.py --config.data.files=[...]
    openchat-jax train --config configs/mistral_7b.py --config.init_from=W --config.workdir=RUN

With 8192-token rows the window binds: a query attends to its conversation's last 4096 keys only.
A micro-batch (global_batch_size / micro_batches rows) must split evenly over the mesh's data x
fsdp devices: 24 rows fit 8 or 24 chips; on 16 or 32 chips use global_batch_size=32.
"""

import ml_collections

from openchat_jax.train.config import accelerator_run_config


def get_config() -> ml_collections.ConfigDict:
    # "mistralai/Mistral-7B-v0.1" or a local tokenizer folder.
    config = accelerator_run_config("mistral_7b", max_length=8192, tokenizer="mistralai/Mistral-7B-v0.1", global_batch_size=24)
    # Mistral's 32000 tokens + <|end_of_turn|>; with init_from the stored model config wins.
    config.model.vocab_size = 32001
    config.data.template = "openchat_3.5"
    return config
