"""The paper's run (OpenChat-13B, C-RLFT on Llama-2-13B): sequence length 4096, ~200k tokens per
step, 5 epochs, AdamW(0.9, 0.95, eps 1e-5, wd 0.1), clip 1.0, 5% warmup then cosine to 10% of the
peak, peak lr = 3e-4 * sqrt(tokens per step / 4e6) ("auto": 6.6e-5 here), bf16 compute, float32
master weights and optimizer state, classes GPT-4 (weight 1.0) / GPT-3.5 (0.1).

    openchat-jax convert hf-to-jax --hf-dir LLAMA2_13B_HF_DIR --out W --add-eot
    openchat-jax prepare --config configs/llama2_13b_openchat.py --config.data.files=[...]
    openchat-jax train --config configs/llama2_13b_openchat.py --config.init_from=W --config.workdir=RUN

48 rows x 4096 = 196,608 tokens per step. A micro-batch (global_batch_size / micro_batches rows)
must split evenly over the mesh's data x fsdp devices: 48 rows fit 8, 16, 24 or 48 chips; on 32
chips use global_batch_size=64 (262k tokens, lr "auto" follows).
"""

import ml_collections

from openchat_jax.train.config import accelerator_run_config


def get_config() -> ml_collections.ConfigDict:
    # "meta-llama/Llama-2-13b-hf" or a local tokenizer folder.
    config = accelerator_run_config("llama2_13b", max_length=4096, tokenizer="meta-llama/Llama-2-13b-hf",
                                    global_batch_size=48)
    # Llama-2's 32000 tokens + <|end_of_turn|>; with init_from the stored model config wins.
    config.model.vocab_size = 32001
    config.data.label_field = "model"  # ShareGPT exports: "Model: GPT-4" -> gpt4, else gpt3 (paper classes)

    config.train.epochs = 5
    config.train.warmup_ratio = 0.05
    config.train.end_lr_ratio = 0.1
    config.train.b1, config.train.b2, config.train.eps = 0.9, 0.95, 1e-5
    config.train.weight_decay = 0.1
    config.train.grad_clip = 1.0

    config.checkpoint.save_every = 500
    return config
