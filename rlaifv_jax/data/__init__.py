"""rlaifv_jax: RLAIF-V in JAX/Flax NNX."""
