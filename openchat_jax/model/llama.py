"""Llama-2 in Flax NNX, read top to bottom: `Llama.__call__` is the forward.

`Llama` embeds the tokens, runs `Blocks` (every decoder layer's weights stacked on a leading
`layers` axis, run as one `lax.scan` over them: compile time independent of depth), applies the
final norm and the LM head. Each weight is an nnx.Param whose `logical_axes` metadata names its
axes; `param_shardings` reads the shardings off that metadata through the rules table
(model/partitioning.py). Numerics follow transformers' LlamaForCausalLM: RMSNorm in float32, rotary
embeddings in the rotate-half convention (with its linear / llama3 frequency scaling), grouped-query
attention (with Mistral's sliding window), SwiGLU MLP, an LM head of its own or tied to the
embedding. The few operations whose best form depends on the platform come from `kernels_for`:
plain ones on TPUs and GPUs, model/cpu.py on the CPU.

The train step and generation keep the weights as a plain dict at the jit boundary
(`init_params`, checkpoints, optimizer state) and call the module through `forward`, which merges
the dict into a `Llama` and calls it. Weight layout (Ly layers, E embed, H heads, K kv_heads,
D head_dim, M mlp, V vocab):
  embed [V, E]; blocks.{attn_norm, mlp_norm} [Ly, E]; blocks.wq [Ly, E, H, D];
  blocks.{wk, wv} [Ly, E, K, D]; blocks.wo [Ly, H, D, E]; blocks.{w_gate, w_up} [Ly, E, M];
  blocks.w_down [Ly, M, E]; final_norm [E]; lm_head [E, V] (absent with tie_embeddings).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from openchat_jax.model import cpu, precision
from openchat_jax.model.attention import AttendFn, get_backend, resolve_backend
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.partitioning import LOGICAL_AXIS_RULES, Rules, constrain, shardings_from_metadata

Params = dict[str, Any]
Cache = dict[str, jax.Array]


def param_specs(cfg: LlamaConfig) -> dict[str, Any]:
    """name -> (shape, logical axes, initialiser name): the weight layout `Llama` is built from."""
    Ly, E, H, K, D, M, V = (
        cfg.num_layers, cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp, cfg.vocab_size,
    )
    specs = {
        "embed": ((V, E), ("vocab", "embed"), "normal"),
        "blocks": {
            "attn_norm": ((Ly, E), ("layers", "embed"), "ones"),
            "wq": ((Ly, E, H, D), ("layers", "embed", "heads", "head_dim"), "normal"),
            "wk": ((Ly, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wv": ((Ly, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wo": ((Ly, H, D, E), ("layers", "heads", "head_dim", "embed"), "normal"),
            "mlp_norm": ((Ly, E), ("layers", "embed"), "ones"),
            "w_gate": ((Ly, E, M), ("layers", "embed", "mlp"), "normal"),
            "w_up": ((Ly, E, M), ("layers", "embed", "mlp"), "normal"),
            "w_down": ((Ly, M, E), ("layers", "mlp", "embed"), "normal"),
        },
        "final_norm": ((E,), ("embed",), "ones"),
        "lm_head": ((E, V), ("embed", "vocab"), "normal"),
    }
    if cfg.tie_embeddings:
        del specs["lm_head"]
    return specs


def _param(spec: tuple, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Param:
    shape, axes, init = spec
    if init == "ones":
        value = jnp.ones(shape, cfg.weight_dtype)
    else:
        value = cfg.init_std * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
    return nnx.Param(value, logical_axes=axes)


class LlamaOutput(NamedTuple):
    logits: jax.Array | None  # [B, L, V] float32; None with head=False
    hidden: jax.Array  # the final-normed hidden states [B, L, E], compute dtype
    cache: Cache | None  # the cache with this call's keys and values written, when one was passed
    layer_outputs: jax.Array | None  # each layer's output [Ly, B, L, E] (before the final norm), on request


class _Attention(NamedTuple):
    """What every layer's attention shares in one call."""
    attend: AttendFn
    sin_BxLxD: jax.Array
    cos_BxLxD: jax.Array
    q_segment_ids_BxL: jax.Array
    kv_segment_ids_BxS: jax.Array
    q_offset: jax.Array | int
    sliding_window: int


class Blocks(nnx.Module):
    """The decoder layers: pre-norm attention and SwiGLU MLP, each weight stacked over layers."""

    def __init__(self, cfg: LlamaConfig, kernels: Any, *, rngs: nnx.Rngs):
        self.cfg, self.kernels = cfg, kernels
        for name, spec in param_specs(cfg)["blocks"].items():
            setattr(self, name, _param(spec, cfg, rngs))

    def layer(self, p: Params, x_BxLxE: jax.Array, attention: _Attention,
              kv: tuple[jax.Array, jax.Array] | None, i: jax.Array | int, cache_index: jax.Array | int):
        """One layer with its weights `p` (this module's weights at layer i); with a cache `kv`
        (all layers' keys and values), writes its new keys and values at slot cache_index."""
        cfg, dense = self.cfg, self.kernels.dense
        h = rms_norm(x_BxLxE, p["attn_norm"], cfg.rms_norm_eps)
        q_BxLxHxD = checkpoint_name(dense("ble,ehd->blhd", h, p["wq"]), "query_proj")
        k_BxLxKxD = checkpoint_name(dense("ble,ekd->blkd", h, p["wk"]), "key_proj")
        v_BxLxKxD = checkpoint_name(dense("ble,ekd->blkd", h, p["wv"]), "value_proj")
        q_BxLxHxD = constrain(apply_rope(q_BxLxHxD, attention.sin_BxLxD, attention.cos_BxLxD),
                              ("batch", "length", "heads", "head_dim"))
        k_BxLxKxD = constrain(apply_rope(k_BxLxKxD, attention.sin_BxLxD, attention.cos_BxLxD),
                              ("batch", "length", "kv_heads", "head_dim"))
        if kv is None:
            k_all, v_all, new_kv = k_BxLxKxD, v_BxLxKxD, None
        else:
            new_kv = tuple(self.kernels.write_cache(c, new_BxLxKxD, i, cache_index)
                           for c, new_BxLxKxD in zip(kv, (k_BxLxKxD, v_BxLxKxD)))
            k_all, v_all = (self.kernels.read_cache(c, i) for c in new_kv)
        attn_BxLxHxD = attention.attend(q_BxLxHxD, k_all, v_all, attention.q_segment_ids_BxL,
                                        attention.kv_segment_ids_BxS, attention.q_offset,
                                        sliding_window=attention.sliding_window)
        attn_BxLxHxD = checkpoint_name(attn_BxLxHxD, "attention_out")
        x_BxLxE = x_BxLxE + dense("blhd,hde->ble", attn_BxLxHxD, p["wo"])
        h = rms_norm(x_BxLxE, p["mlp_norm"], cfg.rms_norm_eps)
        gate_BxLxM = checkpoint_name(dense("ble,em->blm", h, p["w_gate"]), "mlp_gate")
        up_BxLxM = checkpoint_name(dense("ble,em->blm", h, p["w_up"]), "mlp_up")
        hidden_BxLxM = constrain(jax.nn.silu(gate_BxLxM) * up_BxLxM, ("batch", "length", "mlp"))
        x_BxLxE = x_BxLxE + dense("blm,me->ble", hidden_BxLxM, p["w_down"])
        return constrain(x_BxLxE, ("batch", "length", "embed")), new_kv

    def __call__(self, x_BxLxE: jax.Array, attention: _Attention, kv: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int = 0, layer_outputs: bool = False):
        """(output [B, L, E], the new (keys, values) or None, each layer's output or None). With a
        cache, the whole (keys, values) pair travels through the layers as a carry and each layer
        writes only its new slots (in place), instead of copying the cache every decode step."""
        cfg = self.cfg
        stacked = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        layer = _remat(functools.partial(self.layer, attention=attention, cache_index=cache_index),
                       cfg.remat_policy, cfg.scan_layers)
        if cfg.scan_layers:
            def body(carry, xs):
                x, kv = carry
                p, i = xs
                x, new_kv = layer(p, x, kv=kv, i=i)
                return (x, new_kv), (x if layer_outputs else None)

            (x_BxLxE, kv), outputs = jax.lax.scan(body, (x_BxLxE, kv), (stacked, jnp.arange(cfg.num_layers)))
            return x_BxLxE, kv, outputs
        outputs = []
        for i in range(cfg.num_layers):
            x_BxLxE, kv = layer(jax.tree.map(lambda a: a[i], stacked), x_BxLxE, kv=kv, i=i)
            outputs.append(x_BxLxE)
        return x_BxLxE, kv, (jnp.stack(outputs) if layer_outputs else None)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernels = kernels_for(cfg)
        specs = param_specs(cfg)
        self.embed = _param(specs["embed"], cfg, rngs)
        self.blocks = Blocks(cfg, self.kernels, rngs=rngs)
        self.final_norm = _param(specs["final_norm"], cfg, rngs)
        if "lm_head" in specs:
            self.lm_head = _param(specs["lm_head"], cfg, rngs)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        *,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        head: bool = True,
        layer_outputs: bool = False,
    ) -> LlamaOutput:
        """Logits [B, L, V] in float32 (with `head=False` only the final-normed hidden states
        [B, L, E], for a loss that applies the LM head itself).

        With `cache` (`init_cache`), the new keys/values are written at slots [cache_index,
        cache_index + L) and the queries attend to every slot written so far."""
        cfg, kernels = self.cfg, self.kernels
        x_BxLxE = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(cfg.compute_dtype)
        x_BxLxE = constrain(x_BxLxE, ("batch", "length", "embed"))
        # Training and scoring may hold any position of the context; decoding holds a few.
        num_positions = max(tokens_BxL.shape[1], cfg.max_position_embeddings) if cache is None else None
        sin_BxLxD, cos_BxLxD = kernels.rope_tables(positions_BxL, rope_frequencies(cfg), num_positions)
        if cache is None:
            kv_segment_ids_BxS, kv = segment_ids_BxL, None
        else:
            kv_segment_ids_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL, (0, cache_index))
            kv = (cache["k"], cache["v"])
        attention = _Attention(
            attend=kernels.attention(resolve_backend(cfg.attention, cfg.resolved_platform)),
            sin_BxLxD=sin_BxLxD, cos_BxLxD=cos_BxLxD, q_segment_ids_BxL=segment_ids_BxL,
            kv_segment_ids_BxS=kv_segment_ids_BxS, q_offset=0 if cache is None else cache_index,
            sliding_window=cfg.sliding_window,
        )
        x_BxLxE, kv, outputs = self.blocks(x_BxLxE, attention, kv, cache_index, layer_outputs)
        x_BxLxE = rms_norm(x_BxLxE, self.final_norm[...], cfg.rms_norm_eps)
        logits = lm_head(x_BxLxE, self.head_weight().astype(cfg.compute_dtype)) if head else None
        new_cache = None if cache is None else {"k": kv[0], "v": kv[1], "segment_ids": kv_segment_ids_BxS}
        return LlamaOutput(logits, x_BxLxE, new_cache, outputs)

    def head_weight(self) -> jax.Array:
        """The LM head [E, V]: its own weight, or with tied embeddings the embedding table
        transposed (its gradient then flows into `embed`)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: LlamaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """`Llama(cfg)`'s graph and its parameters as shapes with their metadata; nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))


def bind(params: Params, cfg: LlamaConfig) -> Llama:
    """The `Llama` holding `params` (a plain dict in the `param_specs` layout)."""
    return nnx.merge(abstract_model(cfg)[0], params)


def forward(params: Params, cfg: LlamaConfig, tokens_BxL: jax.Array, positions_BxL: jax.Array,
            segment_ids_BxL: jax.Array, *, cache: Cache | None = None, cache_index: jax.Array | int = 0,
            head: bool = True, layer_outputs: bool = False) -> LlamaOutput:
    """`Llama.__call__` on a plain dict of weights."""
    return bind(params, cfg)(tokens_BxL, positions_BxL, segment_ids_BxL, cache=cache, cache_index=cache_index,
                             head=head, layer_outputs=layer_outputs)


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random parameters as a plain dict (call under jit with out_shardings to create them sharded)."""
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))


def param_shapes(cfg: LlamaConfig) -> Params:
    """ShapeDtypeStructs in the params' layout."""
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_model(cfg)[1]))


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Params:
    """A NamedSharding for each weight, from its Param's `logical_axes` through `rules`."""
    return shardings_from_metadata(abstract_model(cfg)[1], mesh, rules)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * normed).astype(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies [D / 2], float32, as transformers computes them for
    cfg.rope_type (`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
    `_compute_llama3_parameters`), operation for operation in float32: equal up to a few ulps
    (tests/test_model_parity.py checks 1e-6 relative)."""
    D = cfg.head_dim
    # The power in float64, rounded once: within an ulp of torch's (numpy's float32 pow is not).
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / D).astype(np.float64)).astype(np.float32)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_context = cfg.rope_original_max_position_embeddings
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled)
    return inv_freq


class PlainKernels:
    """The operations whose fastest form depends on the platform, as TPUs and GPUs take them: the
    weight matmuls' mixed precision (model/precision.py), everything else plain and autodiffed.
    model/cpu.py has XLA:CPU's versions under the same names."""

    dense = staticmethod(precision.dense)

    @staticmethod
    def rope_tables(positions_BxL: jax.Array, inv_freq_D2: np.ndarray,
                    num_positions: int | None) -> tuple[jax.Array, jax.Array]:
        """sin and cos [B, L, D] of the rotary angles (`inv_freq_D2` from `rope_frequencies`);
        `num_positions` (how many positions the call may hold) is for cpu.rope_tables' table."""
        freqs_BxLxD2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_D2, jnp.float32)
        angles_BxLxD = jnp.concatenate([freqs_BxLxD2, freqs_BxLxD2], axis=-1)
        return jnp.sin(angles_BxLxD), jnp.cos(angles_BxLxD)

    @staticmethod
    def attention(name: str) -> AttendFn:
        return get_backend(name)

    CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")

    @staticmethod
    def write_cache(cache_LyxBxSxKxD: jax.Array, new_BxLxKxD: jax.Array, layer: jax.Array | int,
                    index: jax.Array | int) -> jax.Array:
        return jax.lax.dynamic_update_slice(cache_LyxBxSxKxD, new_BxLxKxD[None].astype(cache_LyxBxSxKxD.dtype),
                                            (layer, 0, index, 0, 0))

    @staticmethod
    def read_cache(cache_LyxBxSxKxD: jax.Array, layer: jax.Array | int) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(cache_LyxBxSxKxD, layer, keepdims=False)


def kernels_for(cfg: LlamaConfig) -> Any:
    """model/cpu.py on the CPU, PlainKernels on TPUs and GPUs (by `cfg.platform`)."""
    return cpu if cfg.resolved_platform == "cpu" else PlainKernels


def apply_rope(x_BxLxHxD: jax.Array, sin_BxLxD: jax.Array, cos_BxLxD: jax.Array) -> jax.Array:
    """HF's rotate-half convention: x * cos + rotate_half(x) * sin, computed in float32."""
    x = x_BxLxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BxLxD[:, :, None, :] + rotated * sin_BxLxD[:, :, None, :]
    return out.astype(x_BxLxHxD.dtype)


def _remat(fn, policy: str, scanned: bool):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "minimal": jax.checkpoint_policies.save_only_these_names(
            "query_proj", "key_proj", "value_proj", "attention_out", "mlp_gate", "mlp_up"
        ),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=not scanned)


def lm_head(x_BxLxE: jax.Array, lm_head_ExV: jax.Array) -> jax.Array:
    """Logits [B, L, V], accumulated and returned in float32."""
    logits_BxLxV = jnp.einsum("ble,ev->blv", x_BxLxE, lm_head_ExV, preferred_element_type=jnp.float32)
    return constrain(logits_BxLxV, ("batch", "length", "vocab"))


def init_cache(cfg: LlamaConfig, batch: int, max_length: int, dtype: Any = None) -> Cache:
    """An empty KV cache: slots hold segment id 0 until written, so they are never attended to.
    Keys and values are [layers, B, S, K, D] (head-major [layers, B, K, S, D] on the CPU,
    model/cpu.py), sharded by their logical axes when rules are active."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    axes = kernels_for(cfg).CACHE_AXES
    sizes = {"layers": cfg.num_layers, "batch": batch, "kv_heads": cfg.num_kv_heads, "length": max_length,
             "head_dim": cfg.head_dim}
    shape = tuple(sizes[a] for a in axes)
    return {
        "k": constrain(jnp.zeros(shape, dtype), axes),
        "v": constrain(jnp.zeros(shape, dtype), axes),
        "segment_ids": constrain(jnp.zeros((batch, max_length), jnp.int32), ("batch", "length")),
    }


