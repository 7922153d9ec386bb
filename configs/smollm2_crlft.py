"""C-RLFT fine-tuning of SmolLM2-135M-Instruct (a real pretrained model) on this CPU.

    python -m openchat_jax.hf.smollm2 --out runs/real/smollm2_hf
    python benchmarks/real_model_data.py --hf-dir runs/real/smollm2_hf --out runs/real/data
    openchat-jax convert hf-to-jax --hf-dir runs/real/smollm2_hf --out runs/real/smollm2_jax --add-eot
    openchat-jax prepare --config configs/smollm2_crlft.py
    openchat-jax train --config configs/smollm2_crlft.py

The data (benchmarks/real_model_data.py) are OpenChat records whose "condition" is GPT4 (ShareGPT's
reply, class expert, weight 1.0) or GPT3 (SmolLM2's own greedy reply, class suboptimal, 0.1); a
label equal to a class's condition selects it. The paper's ablation variants are overrides of this
config, as in openchat_jax/demo/run.py (benchmarks/real_model.py runs all three):

    SFT, all data      --config.data.conditioned=False --config.train.weighted=False
    SFT, expert only   the same plus --config.data.classes="[{'name':'expert','condition':'GPT4','weight':1.0}]"
                       --config.data.default_class="''" (GPT3 records: counted skips)

The model's shape comes from init_from (the converted folder); only how it runs is set here.
"""

from pathlib import Path

import ml_collections

from openchat_jax.train.config import base_config

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "real"


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    config.seed = 0
    config.workdir = str(RUNS / "crlft")
    config.init_from = str(RUNS / "smollm2_jax")  # convert hf-to-jax --add-eot output
    config.model.update(
        dtype="bfloat16",  # compute; params stay float32. ~20% faster than float32 here (docs/real_model_crlft.md)
        remat_policy="none",  # memory is plentiful on the host
        scan_layers=True,  # 30 layers: unrolled compiles far longer on this CPU
    )

    data = config.data
    data.files = [str(RUNS / "data" / "train.jsonl")]
    data.label_field = "condition"
    data.classes = [
        {"name": "expert", "condition": "GPT4", "weight": 1.0},
        {"name": "suboptimal", "condition": "GPT3", "weight": 0.1},
    ]
    data.label_map = {}
    data.default_class = ""  # a record with another condition is a counted skip
    data.tokenizer = str(RUNS / "smollm2_jax" / "tokenizer")
    data.dataset_dir = str(RUNS / "prepared" / "conditioned")
    data.max_length = 384  # prompt <= 64 + reply <= 192 tokens + template: a row holds 1-3 conversations
    data.num_workers = 1

    train = config.train
    # 1 row per step: 200 steps of each of the three methods fit 90 CPU-minutes on this 2-core CPU
    # (~5 s per step; 4 rows take ~16 s: docs/real_model_crlft.md, "Budget arithmetic").
    train.global_batch_size = 1
    train.num_steps = 200
    # A pretrained 135M model: a fine-tuning lr, not the from-scratch one. "auto" would give
    # 3e-4 * sqrt(384 / 4e6) = 2.9e-6 at 1 x 384 tokens per step, too small to move in 200 steps.
    train.lr = 5e-5
    train.warmup_ratio = 0.05
    train.loss_chunk_length = 128
    train.log_every = 1
    train.tensorboard = False
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.checkpoint.save_every = 0  # only the final weights
    return config
