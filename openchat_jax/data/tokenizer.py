"""Load a Llama-style tokenizer and make sure `<|end_of_turn|>` is a special token."""

from __future__ import annotations

from pathlib import Path

from openchat_jax.errors import ConfigError

EOT_TOKEN = "<|end_of_turn|>"


def load_tokenizer(path_or_hub_name: str | Path):
    """Returns `(tokenizer, eot_id)`.

    `path_or_hub_name` is a local folder (tokenizer.json / tokenizer.model + tokenizer_config.json)
    or a hub name. `<|end_of_turn|>` is added as a special token when missing (it then gets the
    next free id: 32000 for Llama-2); the model side must size its embedding table to
    `len(tokenizer)`.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_hub_name))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load tokenizer {str(path_or_hub_name)!r}: {first}") from None
    if EOT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)], special_tokens=True)
    eot_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    if not isinstance(eot_id, int) or eot_id == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer {str(path_or_hub_name)!r}: could not register {EOT_TOKEN}")
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"tokenizer {str(path_or_hub_name)!r} has no BOS token; the template starts with <s>")
    return tokenizer, int(eot_id)
