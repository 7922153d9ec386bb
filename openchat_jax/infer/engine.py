"""Conversations in, answers out: the template (the data side's, the same as training), the token
generator, and the tokenizer, composed. Used by `openchat-jax generate`, `chat` and the demo."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh

from openchat_jax.data.template import DEFAULT_FAMILY, TemplateBuilder
from openchat_jax.errors import CheckpointError, DataError
from openchat_jax.infer.generate import generate_tokens
from openchat_jax.infer.sampling import SamplingConfig
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import Params, param_shardings
from openchat_jax.model.partitioning import Rules


@dataclasses.dataclass
class ChatModel:
    params: Params
    cfg: LlamaConfig
    tokenizer: Any
    eot_id: int
    mesh: Mesh | None = None
    rules: Rules | None = None
    template_family: str = DEFAULT_FAMILY

    def __post_init__(self) -> None:
        self.template = TemplateBuilder(self.tokenizer, self.eot_id, self.template_family)
        if len(self.tokenizer) > self.cfg.vocab_size:
            raise CheckpointError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {self.cfg.vocab_size}"
                " (was the checkpoint converted with --add-eot?)"
            )

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return (self.eot_id,) if eos is None or eos == self.eot_id else (self.eot_id, int(eos))


@dataclasses.dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    truncated: int  # prompt tokens dropped to fit the context (0 unless truncation was asked for)


def load_chat_model(
    ckpt_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    template: str | None = None,
) -> ChatModel:
    """Weights from a weights folder (`convert hf-to-jax` output or training's final folder); the
    tokenizer from `tokenizer_path` or the folder's `tokenizer/`. On a mesh the params are restored
    straight into the train side's shardings. `dtype` (e.g. "float32") replaces the compute dtype
    that model_config.json records; the weights stay as stored. `template`: the template family
    (default: the one the folder's classes.json records, else openchat_v3.2)."""
    from openchat_jax.data.template import template_family
    from openchat_jax.data.tokenizer import load_tokenizer
    from openchat_jax.infer.classes import find_template
    from openchat_jax.model import checkpoint_io

    ckpt_dir = str(ckpt_dir)
    template = find_template(ckpt_dir) if template is None else template
    if tokenizer_path is None:
        found = checkpoint_io.tokenizer_dir(ckpt_dir)
        if found is None:
            raise CheckpointError(f"{ckpt_dir}: no tokenizer/ folder; pass --tokenizer PATH")
        tokenizer_path = str(found)
    tokenizer, eot_id = load_tokenizer(tokenizer_path, template_family(template).eot_token)
    recorded = checkpoint_io.read_special_tokens(ckpt_dir).get("eot_token_id")
    if recorded is not None and recorded != eot_id:
        raise CheckpointError(
            f"{ckpt_dir}: special_tokens.json says <|end_of_turn|> is id {recorded}, the tokenizer at "
            f"{tokenizer_path} says {eot_id}"
        )
    if mesh is not None and rules is not None:
        cfg = checkpoint_io.read_model_config(ckpt_dir)
        params, cfg = checkpoint_io.load_params(ckpt_dir, param_shardings(cfg, mesh, rules))
    else:
        params, cfg = checkpoint_io.load_params(ckpt_dir)
        params = jax.device_put(params)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return ChatModel(params, cfg, tokenizer, eot_id, mesh, rules, template)


def prompt_ids(
    model: ChatModel,
    messages: Sequence[Mapping[str, str]],
    system: str | None,
    condition: str,
    *,
    max_new_tokens: int,
    context: int,
    truncate: bool,
    where: str = "prompt",
) -> tuple[list[int], int]:
    """Template ids for `messages` (ending with a user message) and how many tokens were dropped.

    A prompt that leaves no room for one new token is a DataError unless `truncate`; truncation
    keeps `<s>` and the newest tokens, leaving room for all `max_new_tokens`."""
    ids = model.template.build_prompt(messages, system or "", condition)
    if len(ids) < context:
        return ids, 0
    if not truncate:
        raise DataError(
            f"{where}: the prompt has {len(ids)} tokens and the context is {context}, leaving no room for an "
            "answer (ask for truncation: --truncate)"
        )
    keep = context - max_new_tokens - 1  # tokens kept after <s>
    if keep < 1:
        raise DataError(f"{where}: max_new_tokens={max_new_tokens} leaves no room for a prompt in context {context} "
                        "(lower --max-new-tokens or raise --context)")
    return ids[:1] + ids[len(ids) - keep:], len(ids) - 1 - keep


def answer(
    model: ChatModel,
    conversations: Sequence[tuple[Sequence[Mapping[str, str]], str | None]],
    condition: str,
    *,
    max_new_tokens: int = 512,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    context: int | None = None,
    truncate: bool = False,
    batch_size: int = 16,
    wheres: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Answer]:
    """One assistant answer for each (messages, system); messages end with the user's turn."""
    context = model.cfg.max_position_embeddings if context is None else context
    key = jax.random.key(0) if key is None else key
    built = [
        prompt_ids(model, msgs, system, condition, max_new_tokens=max_new_tokens, context=context,
                   truncate=truncate, where=wheres[i] if wheres else f"prompt {i}")
        for i, (msgs, system) in enumerate(conversations)
    ]
    answers: list[Answer] = []
    for start in range(0, len(built), batch_size):
        chunk = built[start:start + batch_size]
        gens = generate_tokens(
            model.params, model.cfg, [ids for ids, _ in chunk], max_new_tokens=max_new_tokens,
            stop_ids=model.stop_ids, sampling=sampling, key=jax.random.fold_in(key, start), context=context,
            mesh=model.mesh, rules=model.rules,
        )
        for (ids, dropped), g in zip(chunk, gens):
            text = model.template.message_text(model.tokenizer.decode(g.tokens, skip_special_tokens=True))
            answers.append(Answer(text, g.tokens, g.finish_reason, len(ids), dropped))
        if on_batch is not None:
            on_batch(len(chunk))
    return answers

