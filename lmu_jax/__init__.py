"""lmu_jax: scaling-law experiments on LMU, transformer, LSTM and related language models in JAX/Flax."""

__version__ = "0.1.0"
