"""Chat files for an exported HF folder, so transformers / vLLM / TGI talk to the model with our
template and stop where it stops:

  tokenizer files   the tokenizer with `<|end_of_turn|>`; its eos_token is `<|end_of_turn|>` (the
                    token the model ends an answer with; the template never uses `</s>`);
  tokenizer_config.json["chat_template"]
                    the data side's `render_chat_template(condition)` (one template implementation),
                    so `apply_chat_template(messages, add_generation_prompt=True)` gives the ids of
                    `build_prompt` for that condition (the expert one by default);
  generation_config.json
                    eos_token_id = `<|end_of_turn|>`'s id (other fields already there are kept).
`convert jax-to-hf` calls `write_chat_files` after writing the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openchat_jax.data.template import render_chat_template
from openchat_jax.data.tokenizer import EOT_TOKEN
from openchat_jax.errors import CheckpointError

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers prefers it over tokenizer_config's entry
TOKENIZER_FLAGS = ("legacy", "add_bos_token", "add_eos_token", "add_prefix_space")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_chat_files(out_dir: str | Path, tokenizer: Any, eot_id: int, condition: str) -> None:
    """Write the tokenizer, its chat template for `condition` (a template prefix such as "GPT4")
    and generation_config.json into `out_dir` (an HF model folder)."""
    out_dir = Path(out_dir)
    if tokenizer.convert_tokens_to_ids(EOT_TOKEN) != eot_id:
        raise CheckpointError(
            f"the tokenizer maps {EOT_TOKEN} to {tokenizer.convert_tokens_to_ids(EOT_TOKEN)}, not {eot_id}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    (out_dir / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)

    config = _read_json(out_dir / TOKENIZER_CONFIG)
    # transformers 5 rebuilds a Llama tokenizer's pre-tokenizer from these flags on load but does not
    # save `legacy`; without it a reload stops putting "▁" after special tokens (ids change).
    for flag in TOKENIZER_FLAGS:
        value = getattr(tokenizer, flag, None)
        if isinstance(value, bool) and flag not in config:
            config[flag] = value
    config["chat_template"] = render_chat_template(condition)
    config["eos_token"] = EOT_TOKEN
    _write_json(out_dir / TOKENIZER_CONFIG, config)
    if (out_dir / SPECIAL_TOKENS_MAP).is_file():
        special = _read_json(out_dir / SPECIAL_TOKENS_MAP)
        special["eos_token"] = EOT_TOKEN
        _write_json(out_dir / SPECIAL_TOKENS_MAP, special)

    gen_path = out_dir / GENERATION_CONFIG
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    gen["eos_token_id"] = int(eot_id)
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = int(tokenizer.bos_token_id)
    _write_json(gen_path, gen)
