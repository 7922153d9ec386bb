"""The tensor map between HF checkpoints (transformers' LlamaForCausalLM / MistralForCausalLM
layout, safetensors) and our params: names, shapes, dtypes and layout, both ways.

Weight mapping (HF [out, in] matrices; ours [in, ...out] with layers stacked on axis 0):
  model.embed_tokens.weight [V, E]          -> embed [V, E]
  layers.i.input_layernorm.weight [E]       -> blocks.attn_norm[i]
  layers.i.self_attn.q_proj.weight [H*D, E] -> blocks.wq[i] = W.T.reshape(E, H, D)   (k, v: K heads)
  layers.i.self_attn.o_proj.weight [E, H*D] -> blocks.wo[i] = W.T.reshape(H, D, E)
  layers.i.post_attention_layernorm.weight  -> blocks.mlp_norm[i]
  layers.i.mlp.{gate,up}_proj.weight [M, E] -> blocks.w_{gate,up}[i] = W.T
  layers.i.mlp.down_proj.weight [E, M]      -> blocks.w_down[i] = W.T
  model.norm.weight [E]                     -> final_norm
  lm_head.weight [V, E]                     -> lm_head = W.T   (neither, with tie_word_embeddings)
"""

from __future__ import annotations

from typing import Iterator

import ml_dtypes
import numpy as np

from openchat_jax.model import checkpoint_io
from openchat_jax.model.config import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}

LeafPath = tuple[str, ...]
# HF per-layer name suffix -> our stacked leaf under `blocks`, in HF's usual order.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}


def hf_shape(leaf: str, cfg: LlamaConfig) -> tuple[int, ...]:
    """The HF tensor shape of one layer's (or a top-level) leaf."""
    E, H, K, D, M, V = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp, cfg.vocab_size
    return {
        "embed": (V, E), "final_norm": (E,), "lm_head": (V, E), "attn_norm": (E,), "mlp_norm": (E,),
        "wq": (H * D, E), "wk": (K * D, E), "wv": (K * D, E), "wo": (E, H * D),
        "w_gate": (M, E), "w_up": (M, E), "w_down": (E, M),
    }[leaf]


def to_jax(leaf: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """One HF tensor in our layout (see the module docstring)."""
    E, H, K, D = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if leaf == "wq":
        return w.T.reshape(E, H, D)
    if leaf in ("wk", "wv"):
        return w.T.reshape(E, K, D)
    if leaf == "wo":
        return w.T.reshape(H, D, E)
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    return w


def to_hf(leaf: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """One leaf (one layer of a stacked leaf) in HF's layout, contiguous for safetensors."""
    E = cfg.embed
    if leaf in ("wq", "wk", "wv"):
        w = w.reshape(E, -1).T
    elif leaf == "wo":
        w = w.reshape(-1, E).T
    elif leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        w = w.T
    return np.ascontiguousarray(w)


def hf_tensor_names(cfg: LlamaConfig) -> Iterator[tuple[str, LeafPath, int | None]]:
    """(HF name, our leaf path, layer index or None) for every tensor, leaf by leaf in param_specs order."""
    for path in checkpoint_io.expected_shapes(cfg):
        if path[0] == "blocks":
            suffix = next(s for s, leaf in _LAYER_NAMES.items() if leaf == path[1])
            for i in range(cfg.num_layers):
                yield f"model.layers.{i}.{suffix}", path, i
        else:
            yield next(n for n, leaf in _TOP_NAMES.items() if leaf == path[0]), path, None
