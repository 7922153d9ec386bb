"""Synthetic packed batches with the loader's layout, for the train step and loop tests."""

from __future__ import annotations

import numpy as np


def packed_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    class_weights: tuple[float, ...] = (1.0, 0.1),
    *,
    max_segments: int = 3,
    pad_fraction: float = 0.1,
    supervised_fraction: float = 0.6,
) -> dict[str, np.ndarray]:
    """Rows packed with up to `max_segments` conversations each plus a pad tail. Within a
    conversation `targets[t] = tokens[t + 1]` (the last token's target is a pad id with weight 0),
    positions restart at 0, about `supervised_fraction` of tokens carry their class's weight."""
    shape = (batch_size, seq_len)
    tokens = rng.integers(1, vocab_size, shape, dtype=np.int32)
    targets = np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    class_ids = np.full(shape, -1, np.int32)
    for b in range(batch_size):
        used = seq_len - int(round(seq_len * pad_fraction * rng.random()))
        cuts = np.sort(rng.choice(np.arange(2, used - 1), size=min(max_segments - 1, max(used - 3, 0)), replace=False)) if used > 4 else np.array([], int)
        bounds = [0, *[int(c) for c in cuts], used]
        for seg, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            if end - start < 2:
                continue
            cls = int(rng.integers(len(class_weights)))
            n = end - start
            segment_ids[b, start:end] = seg
            positions[b, start:end] = np.arange(n)
            class_ids[b, start:end] = cls
            targets[b, start : end - 1] = tokens[b, start + 1 : end]
            supervised = rng.random(n - 1) < supervised_fraction
            supervised[-1] = True  # at least one supervised token per conversation
            weights[b, start : end - 1] = np.where(supervised, class_weights[cls], 0.0)
        tokens[b, used:] = 0
    return {
        "tokens": tokens, "targets": targets, "weights": weights,
        "segment_ids": segment_ids, "positions": positions, "class_ids": class_ids,
    }
