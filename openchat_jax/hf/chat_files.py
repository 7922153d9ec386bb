"""Chat files for an exported HF folder, so transformers / vLLM / TGI talk to the model with our
template and stop where it stops:

  tokenizer files   the tokenizer with `<|end_of_turn|>`, saved so that AutoTokenizer runs the
                    tokenizer file's own pipeline (`data.tokenizer.save_tokenizer`); its eos_token is
                    `<|end_of_turn|>` (the token the model ends an answer with);
  tokenizer_config.json["chat_template"]
                    the data side's `render_chat_template(condition)` (one template implementation),
                    so `apply_chat_template(messages, add_generation_prompt=True)` gives the ids of
                    `build_prompt` for that condition (the expert one by default);
  generation_config.json
                    eos_token_id = [`<|end_of_turn|>`'s id, `</s>`'s id] (other fields are kept).
`convert jax-to-hf` calls `write_chat_files` after writing the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openchat_jax.data.template import DEFAULT_FAMILY, render_chat_template, template_family
from openchat_jax.data.tokenizer import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, save_tokenizer
from openchat_jax.errors import CheckpointError
from openchat_jax.model.checkpoint_io import read_json

GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers prefers it over tokenizer_config's entry


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_chat_files(out_dir: str | Path, tokenizer: Any, eot_id: int, condition: str,
                     family: str = DEFAULT_FAMILY) -> None:
    """Write the tokenizer, its chat template for `condition` (a template prefix such as "GPT4") in
    template `family`, and generation_config.json into `out_dir` (an HF model folder)."""
    out_dir = Path(out_dir)
    eot_token = template_family(family).eot_token
    if tokenizer.convert_tokens_to_ids(eot_token) != eot_id:
        raise CheckpointError(
            f"the tokenizer maps {eot_token} to {tokenizer.convert_tokens_to_ids(eot_token)}, not {eot_id}"
        )
    base_eos = tokenizer.eos_token_id
    save_tokenizer(tokenizer, out_dir)
    (out_dir / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)

    config = read_json(out_dir / TOKENIZER_CONFIG)
    config["chat_template"] = render_chat_template(condition, family)
    config["eos_token"] = eot_token
    _write_json(out_dir / TOKENIZER_CONFIG, config)
    if (out_dir / SPECIAL_TOKENS_MAP).is_file():
        special = read_json(out_dir / SPECIAL_TOKENS_MAP)
        special["eos_token"] = eot_token
        _write_json(out_dir / SPECIAL_TOKENS_MAP, special)

    gen_path = out_dir / GENERATION_CONFIG
    gen = read_json(gen_path) if gen_path.is_file() else {}
    gen["eos_token_id"] = stop_ids(eot_id, base_eos)
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = int(tokenizer.bos_token_id)
    _write_json(gen_path, gen)
    check_chat_template(out_dir, tokenizer, eot_id, condition, family)


def stop_ids(eot_id: int, eos_id: int | None) -> list[int]:
    """Generation ends at `<|end_of_turn|>`, and at the base model's EOS (`</s>`) if it has one."""
    return [int(eot_id)] + ([int(eos_id)] if eos_id is not None and eos_id != eot_id else [])


PROBE_SYSTEM = "You are a helpful assistant."
PROBE_MESSAGES = (
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "  I am fine,\tthank you. "},
    {"role": "user", "content": " What is 2 + 2?\n\n"},
    {"role": "assistant", "content": "\n4 \u00fcber \u65e5\u672c \U0001f600"},
    {"role": "user", "content": " "},
)


def check_chat_template(out_dir: str | Path, tokenizer: Any, eot_id: int, condition: str,
                        family: str = DEFAULT_FAMILY) -> None:
    """Reload the exported tokenizer; its chat template must give `build_prompt`'s ids for a
    probe conversation with and without a system message, else CheckpointError."""
    from transformers import AutoTokenizer

    from openchat_jax.data.template import build_prompt

    exported = AutoTokenizer.from_pretrained(str(out_dir))
    for system in ("", PROBE_SYSTEM):
        messages = ([{"role": "system", "content": system}] if system else []) + list(PROBE_MESSAGES)
        ours = build_prompt(tokenizer, eot_id, PROBE_MESSAGES, system, condition, family)
        theirs = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if list(theirs) != ours:
            raise CheckpointError(
                f"{out_dir}: the exported chat template does not reproduce the training template "
                f"(system={bool(system)}): apply_chat_template gives {exported.convert_ids_to_tokens(list(theirs))}, "
                f"build_prompt gives {exported.convert_ids_to_tokens(ours)}"
            )


def export_chat_files(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    class_name: str | None = None,
    condition_text: str | None = None,
    classes_from: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    template: str | None = None,
) -> str | None:
    """What `convert jax-to-hf` calls after writing the weights: the weights folder's tokenizer
    (or `tokenizer_path`) and the chosen class (default: the highest weight among the recorded
    classes) -> `write_chat_files`. Returns the condition written, or None when there is no
    tokenizer to write or the model has no `<|end_of_turn|>` row (a base model converted without
    --add-eot), in which case nothing is written."""
    from openchat_jax.data.tokenizer import load_tokenizer
    from openchat_jax.infer.classes import find_template, resolve_condition
    from openchat_jax.model import checkpoint_io

    if tokenizer_path is None:
        found = checkpoint_io.tokenizer_dir(str(ckpt_dir))
        if found is None:
            return None
        tokenizer_path = str(found)
    family = find_template(ckpt_dir, classes_from) if template is None else template
    tokenizer, eot_id = load_tokenizer(tokenizer_path, template_family(family).eot_token)
    if eot_id >= checkpoint_io.read_model_config(str(ckpt_dir)).vocab_size:
        return None
    conv_class = resolve_condition(ckpt_dir, class_name=class_name, condition_text=condition_text,
                                   classes_from=classes_from)
    write_chat_files(out_dir, tokenizer, eot_id, conv_class.condition, family)
    return conv_class.condition
