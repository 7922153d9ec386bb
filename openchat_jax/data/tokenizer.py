"""Load a tokenizer exactly as its files define it, and make sure `<|end_of_turn|>` is a special token.

A folder with `tokenizer.json` is run through that file's own pipeline (`tokenizers.Tokenizer.from_file`,
wrapped in transformers' `PreTrainedTokenizerFast` for the special-token bookkeeping), never through
`AutoTokenizer`, which for some classes rebuilds the pipeline (transformers 5 turns Llama-2's
Prepend("▁") + Replace normalizer into a Metaspace pre-tokenizer: "  Now" -> [29871, 2567] instead
of the file's [259, 2567]). A folder with only `tokenizer.model` encodes with SentencePiece itself.

`save_tokenizer` writes a folder that `AutoTokenizer.from_pretrained` loads without a rebuild
(`tokenizer_config.json` names `PreTrainedTokenizerFast`, or `SentencePieceBackend` for a
SentencePiece model), and checks that it does.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from openchat_jax.errors import ConfigError

EOT_TOKEN = "<|end_of_turn|>"
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
HUB_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS)
# The class names a saved tokenizer_config.json carries, so AutoTokenizer loads the files as they are.
FILE_PIPELINE_CLASS = "PreTrainedTokenizerFast"
SENTENCEPIECE_CLASS = "SentencePieceBackend"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The parts of tokenizer.json that decide the ids; the loaded tokenizer must keep them as written.
PIPELINE_KEYS = ("normalizer", "pre_tokenizer", "model")
HUB_TIMEOUT_S = 3.0


def load_tokenizer(path_or_hub_name: str | Path, eot_token: str = EOT_TOKEN):
    """Returns `(tokenizer, eot_id)`.

    `path_or_hub_name` is a local folder (tokenizer.json, or tokenizer.model alone) or a hub name.
    `<|end_of_turn|>` is added as a special token when missing (it then gets the next free id:
    32000 for Llama-2); the model side must size its embedding table to `len(tokenizer)`. Another
    `eot_token` (a template family's, e.g. Llama-3's `<|eot_id|>`) must already be in the tokenizer.
    """
    name = str(path_or_hub_name)
    tokenizer = read_tokenizer(name)
    if eot_token not in tokenizer.get_vocab():
        if eot_token != EOT_TOKEN:
            raise ConfigError(f"tokenizer {name!r} has no {eot_token} token, which the template ends a turn with")
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)], special_tokens=True)
    eot_id = tokenizer.convert_tokens_to_ids(eot_token)
    if not isinstance(eot_id, int) or eot_id == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer {name!r}: could not register {eot_token}")
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"tokenizer {name!r} has no BOS token; the template starts with <s>")
    return tokenizer, int(eot_id)


def read_tokenizer(path_or_hub_name: str | Path):
    """The tokenizer exactly as its files define it (no token added)."""
    name = str(path_or_hub_name)
    folder = tokenizer_folder(name)
    if (folder / TOKENIZER_JSON).is_file():
        return _from_tokenizer_json(folder, name)
    return _from_sentencepiece(folder, name)


def is_local_path(name: str) -> bool:
    """A path, not a hub name: never looked up on the hub."""
    return name.startswith((".", "~", "/", os.sep)) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def tokenizer_folder(name: str) -> Path:
    """The local folder for a tokenizer path or hub name; a one-line ConfigError when there is none."""
    if not name.strip():
        raise ConfigError("no tokenizer given (a folder with tokenizer.json or tokenizer.model, or a hub name)")
    if is_local_path(name):
        folder = Path(name).expanduser()
        if not folder.exists():
            raise ConfigError(f"tokenizer folder {name!r} does not exist")
        if not folder.is_dir():
            raise ConfigError(f"tokenizer path {name!r} is not a folder")
    else:
        folder = _from_hub(name)
    if not any((folder / f).is_file() for f in (TOKENIZER_JSON, SENTENCEPIECE_MODEL)):
        raise ConfigError(f"tokenizer folder {name!r} holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}")
    return folder


def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _from_hub(name: str) -> Path:
    """The tokenizer files of hub repo `name` (from the local cache when offline); fails in seconds,
    without the hub client's retries, when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_reachable()
    try:
        return Path(snapshot_download(name, allow_patterns=list(HUB_FILES), local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes the same one-line error
        why = "the hub is unreachable and it is not in the local cache" if offline else \
            (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"tokenizer {name!r} is not a local folder and not on the hub: {why}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    return value if isinstance(value, dict) else {}


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json, else special_tokens_map.json."""
    found: dict[str, str] = {}
    for source in (_read_json(folder / SPECIAL_TOKENS_MAP), _read_json(folder / TOKENIZER_CONFIG)):
        for key in SPECIAL_KEYS:
            value = source.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def _from_tokenizer_json(folder: Path, name: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = folder / TOKENIZER_JSON
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust error text is the useful part
        raise ConfigError(f"{path}: cannot read the tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    written = json.loads(backend.to_str())  # the file as `tokenizers` reads it
    config = _read_json(folder / TOKENIZER_CONFIG)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **_special_tokens(folder),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        model_max_length=int(config.get("model_max_length", 1 << 30)),
    )
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    changed = [k for k in PIPELINE_KEYS if loaded.get(k) != written.get(k)]
    if changed:
        raise ConfigError(f"tokenizer {name!r}: loading changed its {changed} (the file's pipeline must be used as written)")
    return tokenizer


def sentencepiece_tokenizer_class():
    """transformers' SentencePiece-backed tokenizer, decoding with SentencePiece itself (its generic
    decode would print byte-fallback pieces as "<0x0A>")."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SentencePieceTokenizer(SentencePieceBackend):
        def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
            ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
            base = self.sp_model.get_piece_size()
            parts: list[str] = []
            run: list[int] = []
            for i in ids:
                if i < base and i not in self._added_tokens_decoder:
                    run.append(int(i))
                    continue
                if run:
                    parts.append(self.sp_model.decode(run))
                    run = []
                if not (skip_special_tokens and i in self.all_special_ids):
                    parts.append(self.convert_ids_to_tokens(int(i)))
            if run:
                parts.append(self.sp_model.decode(run))
            return "".join(parts)

    return SentencePieceTokenizer


def _from_sentencepiece(folder: Path, name: str):
    import sentencepiece as spm

    path = folder / SENTENCEPIECE_MODEL
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: cannot read the SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    own = {key: sp.id_to_piece(i) for key, i in
           (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
           if i >= 0}
    # legacy=True: transformers leaves SentencePiece's own dummy-prefix handling alone.
    tokenizer = sentencepiece_tokenizer_class()(vocab_file=str(path), legacy=True, **{**own, **_special_tokens(folder)})
    base = sp.get_piece_size()
    added = {str(v.get("content")): int(k) for k, v in _read_json(folder / TOKENIZER_CONFIG).get("added_tokens_decoder", {}).items()
             if int(k) >= base and isinstance(v, dict)}
    added.update(_read_json(folder / ADDED_TOKENS))
    if added:
        from tokenizers import AddedToken

        for token, token_id in sorted(added.items(), key=lambda kv: kv[1]):
            if token in tokenizer.get_vocab():
                continue
            if token_id != len(tokenizer):
                raise ConfigError(f"{folder / ADDED_TOKENS}: {token!r} has id {token_id}, the next free id is {len(tokenizer)}")
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def is_sentencepiece(tokenizer: Any) -> bool:
    return getattr(tokenizer, "sp_model", None) is not None


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> Path:
    """Write `tokenizer` (from `load_tokenizer`) to `out_dir` so that `AutoTokenizer.from_pretrained`
    loads the same pipeline, and check on a probe text that it does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    config_path = out_dir / TOKENIZER_CONFIG
    config = _read_json(config_path)
    if is_sentencepiece(tokenizer):
        config.update(tokenizer_class=SENTENCEPIECE_CLASS, legacy=True)  # legacy: SentencePiece's own dummy prefix
    else:
        config["tokenizer_class"] = FILE_PIPELINE_CLASS
        config.pop("legacy", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    check_saved_tokenizer(tokenizer, out_dir)
    return out_dir


PROBE_TEXTS = ("  Now", " Paris.", " ", "Hello, world!\n\tindented  ", "naïve 日本 😀", "x<s>y</s>z")


def check_saved_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """`AutoTokenizer.from_pretrained(folder)` must encode like `tokenizer`, else ConfigError."""
    from transformers import AutoTokenizer

    from openchat_jax.data.template import piece_encoder

    saved = AutoTokenizer.from_pretrained(str(folder))
    ours = piece_encoder(tokenizer)(list(PROBE_TEXTS))
    for text, expected in zip(PROBE_TEXTS, ours):
        got = saved(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if list(got) != expected:
            raise ConfigError(f"{folder}: AutoTokenizer encodes {text!r} as {list(got)}, the tokenizer file as {expected}")
