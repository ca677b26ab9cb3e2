"""The method's mathematics as pure functions (jax / optax / numpy only): TrigFlow time and preconditioning,
samplers, losses, optimizers and the recipe's shared constants (docs/algorithm.md §1-6)."""
