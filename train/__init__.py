"""The application: a Flax LLaMA pre-trained with golore_jax, sharded with jax.jit."""
