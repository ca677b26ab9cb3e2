"""The Cosmos Predict2.5 DiT in JAX (docs/algorithm.md §8) and its parameter-name mapping to PyTorch (state_dict)."""

from trigflow_distill.networks import wan_vae  # noqa: F401  (the Wan2.1 VAE, docs/algorithm.md §10)
from trigflow_distill.networks.cosmos_dit import (
    GUIDANCE_EMBEDDER,
    PRESETS,
    DiTConfig,
    add_guidance_embedder,
    get_preset,
    init_params,
    param_shapes,
    project_text,
    velocity,
)

__all__ = [
    "GUIDANCE_EMBEDDER",
    "PRESETS",
    "add_guidance_embedder",
    "DiTConfig",
    "get_preset",
    "init_params",
    "param_shapes",
    "project_text",
    "velocity",
]
