"""Commands that print figures (docs/benchmarks.md records them). They run from a source checkout:
`python benchmarks/<name>.py`, or `openchat-jax bench train-step`, which loads benchmarks/train_step.py."""
