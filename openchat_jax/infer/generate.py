"""KV-cache generation for a batch of token prompts of different lengths.

Layout: prompts are LEFT-padded to a common length P (rounded up to `length_bucket` so a few
shapes cover every batch and recompiles stay rare). Pads carry segment id 0, real tokens segment
id 1, and positions count from 0 at each prompt's first real token, so attention never sees a pad
(`forward` only lets a query see slots with its own segment id). The cache has P + N slots.

  prefill:  the model on tokens[:, :P-1] writes slots [0, P-1); its logits are unused and jit drops
            them, so a long prompt never materialises [B, P, V] logits.
  step i:   feed one token per row at slot P-1+i (i = 0 feeds the last prompt token), position
            len_b - 1 + i; sample the next token from the logits.
The steps run in one jitted `lax.while_loop` that ends when every row has produced a stop token
(`<|end_of_turn|>`, EOS) or its budget: min(max_new_tokens, context - prompt length).

On a mesh, pass `mesh` and the train side's logical-axis `rules`: params are placed by their
logical axes, the batch (padded to a multiple of the batch sharding) and the cache by
("batch", ...), and the model's activation constraints apply while tracing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openchat_jax.errors import DataError
from openchat_jax.infer.sampling import SamplingConfig, sample
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import Params, forward, init_cache, param_shardings
from openchat_jax.model.partitioning import Rules, logical_to_spec, use_rules

MAX_STOP_IDS = 8


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token was produced) or "length" (budget or context reached)


@dataclasses.dataclass(frozen=True)
class _MeshRules:
    mesh: Mesh
    rules: tuple


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "return_logits", "mesh_rules")
)
def _decode(
    params: Params,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    limits_B: jax.Array,
    stop_ids_S: jax.Array,
    key: jax.Array,
    *,
    cfg: LlamaConfig,
    max_new_tokens: int,
    sampling: SamplingConfig,
    return_logits: bool,
    mesh_rules: _MeshRules | None,
):
    if mesh_rules is None:
        return _decode_body(params, tokens_BxP, lengths_B, limits_B, stop_ids_S, key, cfg, max_new_tokens,
                            sampling, return_logits)
    with use_rules(mesh_rules.mesh, mesh_rules.rules):
        outputs = _decode_body(params, tokens_BxP, lengths_B, limits_B, stop_ids_S, key, cfg, max_new_tokens,
                               sampling, return_logits)
    # Replicated results, so every process (multi-host) can read all rows.
    replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), outputs)


def _decode_body(params, tokens_BxP, lengths_B, limits_B, stop_ids_S, key, cfg, max_new_tokens, sampling,
                 return_logits):
    B, P = tokens_BxP.shape
    N = max_new_tokens
    slots_P = jnp.arange(P)
    pad_P_B = P - lengths_B
    real_BxP = slots_P[None, :] >= pad_P_B[:, None]
    segment_ids_BxP = real_BxP.astype(jnp.int32)
    positions_BxP = jnp.maximum(slots_P[None, :] - pad_P_B[:, None], 0)

    cache = init_cache(cfg, B, P + N)
    if P > 1:
        cache = forward(params, cfg, tokens_BxP[:, :-1], positions_BxP[:, :-1], segment_ids_BxP[:, :-1],
                        cache=cache, cache_index=0, head=False).cache

    out_BxN = jnp.full((B, N), -1, jnp.int32)
    logits_BxNxV = jnp.zeros((B, N, cfg.vocab_size), jnp.float32) if return_logits else None
    ones_Bx1 = jnp.ones((B, 1), jnp.int32)

    def cond(state):
        i, _, _, done_B, _, _ = state
        return (i < N) & ~jnp.all(done_B)

    def body(state):
        i, cache, token_B, done_B, out_BxN, logits_BxNxV = state
        logits_Bx1xV, _, cache, _ = forward(
            params, cfg, token_B[:, None], (lengths_B - 1 + i)[:, None], ones_Bx1, cache=cache, cache_index=P - 1 + i
        )
        logits_BxV = logits_Bx1xV[:, 0]
        new_B = sample(logits_BxV, jax.random.fold_in(key, i), sampling)
        out_BxN = out_BxN.at[:, i].set(jnp.where(done_B, -1, new_B))
        if return_logits:
            logits_BxNxV = logits_BxNxV.at[:, i].set(logits_BxV)
        done_B = done_B | jnp.isin(new_B, stop_ids_S) | (i + 1 >= limits_B)
        return i + 1, cache, new_B, done_B, out_BxN, logits_BxNxV

    state = (jnp.int32(0), cache, tokens_BxP[:, -1], limits_B <= 0, out_BxN, logits_BxNxV)
    _, _, _, _, out_BxN, logits_BxNxV = jax.lax.while_loop(cond, body, state)
    return out_BxN, logits_BxNxV


def shard_params(params: Params, cfg: LlamaConfig, mesh: Mesh, rules: Rules) -> Params:
    """Place params as the train side does, unless they already live on `mesh` (e.g. restored
    straight into the train shardings by `load_chat_model`)."""
    on_mesh = all(
        isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        for x in jax.tree.leaves(params)
    )
    return params if on_mesh else jax.device_put(params, param_shardings(cfg, mesh, rules))


def _batch_multiple(mesh: Mesh | None, rules: Rules | None) -> int:
    if mesh is None or rules is None:
        return 1
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    if spec is None:
        return 1
    names = (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[n] for n in names)


def generate_tokens(
    params: Params,
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    context: int | None = None,
    length_bucket: int = 64,
    batch_bucket: bool = True,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    return_logits: bool = False,
) -> list[Generation] | tuple[list[Generation], np.ndarray]:
    """Generate up to `max_new_tokens` for each prompt (lists of ids, e.g. from build_prompt).

    `context` (default cfg.max_position_embeddings) bounds prompt + answer: a prompt with no room
    for one new token is a DataError. `key` is needed unless sampling is greedy. With
    `return_logits`, also returns the float32 logits each step saw, [len(prompts), N, V].
    Shapes are bucketed so few programs get compiled: the prompt length up to a multiple of
    `length_bucket`, the batch (with `batch_bucket`) up to a power of two.
    """
    if not prompts:
        return ([], np.zeros((0, max_new_tokens, cfg.vocab_size), np.float32)) if return_logits else []
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if key is None:
        if not sampling.greedy:
            raise DataError("sampling with temperature > 0 needs a PRNG key")
        key = jax.random.key(0)
    context = cfg.max_position_embeddings if context is None else context
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise DataError(f"prompt {i} is empty")
        if n >= context:
            raise DataError(f"prompt {i} has {n} tokens; the context is {context}, leaving no room to generate")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise DataError(f"prompt {i} holds token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")

    B = 1 << (len(prompts) - 1).bit_length() if batch_bucket else len(prompts)
    B = _round_up(B, _batch_multiple(mesh, rules))
    P = _round_up(max(lengths), length_bucket)
    tokens_BxP = np.full((B, P), pad_id, np.int32)
    lengths_B = np.ones((B,), np.int32)  # extra rows (batch sharding) hold one pad token, budget 0
    limits_B = np.zeros((B,), np.int32)
    for b, p in enumerate(prompts):
        tokens_BxP[b, P - len(p):] = p
        lengths_B[b] = len(p)
        limits_B[b] = min(max_new_tokens, context - len(p))

    # Stop ids are data, not part of the compiled program: padded with -1 (never a token).
    if len(stop_ids) > MAX_STOP_IDS:
        raise DataError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    stop_ids_S = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_ids_S[: len(stop_ids)] = list(stop_ids)

    mesh_rules = None
    inputs: tuple[Any, ...] = (tokens_BxP, lengths_B, limits_B)
    if mesh is not None and rules is not None:
        mesh_rules = _MeshRules(mesh, tuple(rules))
        params = shard_params(params, cfg, mesh, rules)
        inputs = (
            jax.device_put(tokens_BxP, NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))),
            *(jax.device_put(x, NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh))) for x in inputs[1:]),
        )
    out_BxN, logits_BxNxV = _decode(
        params, *inputs, stop_ids_S, key, cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling,
        return_logits=return_logits, mesh_rules=mesh_rules,
    )
    out_BxN = np.asarray(out_BxN)
    stops = set(int(s) for s in stop_ids)
    results = []
    for b in range(len(prompts)):
        row = [int(t) for t in out_BxN[b] if t >= 0]
        if row and row[-1] in stops:
            results.append(Generation(row[:-1], "stop"))
        else:
            results.append(Generation(row, "length"))
    if return_logits:
        return results, np.asarray(logits_BxNxV)[: len(prompts)]
    return results
