"""openchat-jax: C-RLFT fine-tuning of Llama-2 in JAX/Flax."""

__version__ = "0.1.0"
