"""The Cosmos Predict2.5 DiT in JAX (docs/algorithm.md §8) and its parameter-name mapping to PyTorch (state_dict)."""

from trigflow_distill.networks import wan_vae  # noqa: F401  (the Wan2.1 VAE, docs/algorithm.md §10)
from trigflow_distill.networks.cosmos_dit import (
    PRESETS,
    DiTConfig,
    get_preset,
    init_params,
    param_shapes,
    project_text,
    velocity,
)

__all__ = ["PRESETS", "DiTConfig", "get_preset", "init_params", "param_shapes", "project_text", "velocity"]
