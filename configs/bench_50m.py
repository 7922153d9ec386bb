"""~52M-parameter Llama (6 layers, 512 wide, 32000-token vocabulary) at L=512 for
`openchat-jax bench train-step` on CPU (results in docs/benchmarks.md, section "Train step").

    openchat-jax bench train-step --config configs/bench_50m.py
"""

import ml_collections

from openchat_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    config.model.update(
        vocab_size=32000, embed=512, mlp=1408, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=64,
        max_position_embeddings=2048,
        # float32 runs at full speed on every CPU; on CPUs with AMX-BF16 (Intel Sapphire Rapids and
        # later) --config.model.dtype=bfloat16 is faster (docs/benchmarks.md, "Train step").
        dtype="float32",
        remat_policy="none",  # memory is plentiful on the host: no recomputation
        # Unrolled: XLA:CPU fuses the layer scan's slicing of saved activations into the weight
        # gradients' transposes (strided copies); 6 unrolled layers still compile quickly.
        scan_layers=False,
    )
    config.data.max_length = 512
    config.train.global_batch_size = 8
    config.train.micro_batches = 1
    config.train.loss_chunk_length = 64  # fastest of 32/64/128/256 on the 2-core Intel CPU (docs/benchmarks.md)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return config
