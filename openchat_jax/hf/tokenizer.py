"""The source tokenizer's files on `convert hf-to-jax`: finding `<|end_of_turn|>`, and saving the
tokenizer with it added as the new embedding row."""

from __future__ import annotations

from pathlib import Path

from openchat_jax.data.tokenizer import EOT_TOKEN, load_tokenizer, read_tokenizer, save_tokenizer
from openchat_jax.errors import CheckpointError
from openchat_jax.model.checkpoint_io import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def find_token_id(tokenizer_dir: Path, token: str) -> int | None:
    """The id of an added token, from tokenizer.json or added_tokens.json (None if absent)."""
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        for added in read_json(tj).get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
    at = tokenizer_dir / "added_tokens.json"
    if at.is_file() and token in (mapping := read_json(at)):
        return int(mapping[token])
    return None


def write_tokenizer(src: Path, dst: Path, eot_id: int | None, add_eot: bool) -> None:
    """Save the source tokenizer (its own pipeline; see `data.tokenizer.save_tokenizer`) into `dst`,
    with <|end_of_turn|> registered as added special token `eot_id` when `add_eot`."""
    if not add_eot:
        save_tokenizer(read_tokenizer(src), dst)
        return
    tokenizer, ref_id = load_tokenizer(src)  # adds the token at the next free id
    if ref_id != eot_id:
        raise CheckpointError(
            f"{src}: the tokenizer would give {EOT_TOKEN} id {ref_id}, but the embedding's new row is {eot_id} "
            f"(the tokenizer has {len(tokenizer) - 1} tokens, config.json vocab_size={eot_id})"
        )
    save_tokenizer(tokenizer, dst)
    written, got_id = load_tokenizer(dst)
    probe = [f"Hello{EOT_TOKEN}world {EOT_TOKEN} GPT4 User: 2 + 2?"]
    if got_id != eot_id or written(probe).input_ids != tokenizer(probe).input_ids:
        raise CheckpointError(f"{src}: adding {EOT_TOKEN} to the tokenizer files changed how it tokenizes")
