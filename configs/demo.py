"""The demo's config (`openchat-jax demo` uses it by default): the tiny Llama, the expert and the
sub-optimal class, the shared budget, and the task (`demo` section). It lives in the package
(openchat_jax/demo/config.py) so the demo also runs from an installed wheel.

    openchat-jax demo --config configs/demo.py --config.train.num_steps=1500
"""

from openchat_jax.demo.config import get_config  # noqa: F401
