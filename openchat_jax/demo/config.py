"""The demo's config: the tiny Llama, the two data classes, the budget, and the task (`demo` section).

`configs/demo.py` returns this config; it lives in the package so `openchat-jax demo` runs from an
installed wheel too. Override any field on the command line: `--config.train.num_steps=300`,
`--config.demo.num_train=2000`.
"""

from __future__ import annotations

import ml_collections

from openchat_jax.demo import tasks
from openchat_jax.train.config import base_config

EXPERT_CLASS = {"name": tasks.EXPERT, "condition": "GPT4", "weight": 1.0}
SUBOPTIMAL_CLASS = {"name": tasks.SUBOPTIMAL, "condition": "GPT3", "weight": 0.1}


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    # 4 layers, 128 wide, 4 heads of 32 (2 kv heads), float32 on the CPU; the vocabulary is the
    # demo tokenizer's (taken from the prepared dataset).
    config.model.vocab_size = 0
    config.model.max_position_embeddings = 128

    data = config.data
    data.label_field = tasks.LABEL_FIELD
    # Labels equal class names, so no label_map is needed; a label no class claims is skipped.
    data.classes = [dict(EXPERT_CLASS), dict(SUBOPTIMAL_CLASS)]
    data.label_map = {}
    data.default_class = ""
    data.max_length = 128  # packing row length; a conversation is ~30 tokens
    data.num_workers = 1  # a few thousand short conversations: worker processes cost more than they save

    train = config.train
    train.global_batch_size = 8  # rows of 128 tokens: ~35 conversations per step
    train.num_steps = 1000  # the same for every variant and seed (the ablation's "same budget")
    train.lr = 2e-3
    train.log_every = 10
    train.tensorboard = False
    train.progress = True

    config.demo = ml_collections.ConfigDict({
        "num_train": 1500,  # ~150 expert conversations: too few to learn the task from alone
        "num_test": 200,
        "min_length": 8,  # digits per question
        "max_length": 8,
        "expert_fraction": 0.1,
        "slip_rate": 0.7,
        # Two mistakes (docs/demo.md, "The task"): one the condition tells apart easily (the order),
        # one that contradicts the expert in shared weights (the counts), which the 0.1 weight damps.
        "slip": "descending+drop_repeats",
        "slip_digit": -1,
        "max_new_tokens": 16,  # answers: "▁" + max_length digits + <|end_of_turn|>
        "generate_batch_size": 64,
    })
    return config
