"""`convert hf-to-jax`: an HF Llama / Mistral folder -> our weights folder, leaf by leaf, so a 13B
model never needs two full copies in host memory. Tensors keep their dtype (float32, bfloat16 or
float16), so HF -> JAX -> HF is bit for bit."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from etils import epath

from openchat_jax.data.tokenizer import EOT_TOKEN
from openchat_jax.errors import CheckpointError
from openchat_jax.hf.checkpoint import HFCheckpoint
from openchat_jax.hf.tokenizer import TOKENIZER_FILES, find_token_id, write_tokenizer
from openchat_jax.model import checkpoint_io
from openchat_jax.model.config import LlamaConfig


def import_hf(hf_dir: str, out_dir: str, *, add_eot: bool = False, overwrite: bool = False) -> LlamaConfig:
    """HF Llama folder -> weights folder (see checkpoint_io). Returns the written model config."""
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.cfg
    src = Path(hf_dir)
    tokenizer_files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    existing_eot = find_token_id(src, EOT_TOKEN) if tokenizer_files else None
    if add_eot:
        if existing_eot is not None:
            raise CheckpointError(f"{src}: the tokenizer already has {EOT_TOKEN} (id {existing_eot}); drop --add-eot")
        eot_id: int | None = cfg.vocab_size
        cfg = cfg.replace(vocab_size=cfg.vocab_size + 1)
    else:
        eot_id = existing_eot
        if eot_id is not None and eot_id >= cfg.vocab_size:
            raise CheckpointError(
                f"{src}: tokenizer id {eot_id} of {EOT_TOKEN} is outside the embedding (vocab_size={cfg.vocab_size}); use --add-eot"
            )
    out = epath.Path(out_dir)
    if (out / checkpoint_io.PARAMS).exists() and not overwrite:
        raise CheckpointError(f"{out / checkpoint_io.PARAMS} already exists: choose another --out, or pass --overwrite to replace it")
    if any(f in tokenizer_files for f in ("tokenizer.json", "tokenizer.model")):
        with tempfile.TemporaryDirectory() as tmp:
            # Before the weights: a tokenizer that disagrees must fail before minutes of conversion.
            write_tokenizer(src, Path(tmp), eot_id, add_eot)
            (out / checkpoint_io.TOKENIZER).mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                epath.Path(f).copy(out / checkpoint_io.TOKENIZER / f.name, overwrite=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / checkpoint_io.HF_CONFIG).write_text(json.dumps(ckpt.hf_config, indent=2) + "\n")
    special = {k: ckpt.hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special["eot_token_id"] = eot_id
    # Leaf by leaf: each stacked leaf is built, written and dropped before the next.
    checkpoint_io.save_param_leaves(str(out), ckpt.leaves(add_eot=add_eot), cfg, special_tokens=special, overwrite=overwrite)
    return checkpoint_io.read_model_config(str(out))
