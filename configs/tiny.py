"""Model preset `tiny` with the default train/mesh/data sections (see openchat_jax/train/config.py).

    openchat-jax train --config configs/tiny.py --config.data.dataset_dir=DIR --config.workdir=RUN \
        [--config.init_from=WEIGHTS] [--config.key=value ...]
"""

import ml_collections

from openchat_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config("tiny")
    config.model.vocab_size = 0  # the prepared dataset's tokenizer size
    return config
