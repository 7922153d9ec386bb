"""Model preset `llama2_70b` with the default train/mesh/data sections (see openchat_jax/train/config.py).

    openchat-jax train --config configs/llama2_70b.py --config.data.dataset_dir=DIR --config.workdir=RUN \
        [--config.init_from=WEIGHTS] [--config.key=value ...]
"""

import ml_collections

from openchat_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    return base_config("llama2_70b")
