"""Two-tower retrieval in JAX / Flax NNX."""
