"""The Cosmos Predict2.5 DiT family (docs/algorithm.md §8): the network (`network`), its attention and RoPE, the
PyTorch / diffusers name maps (`names`), checkpoint conversion (`convert`) and the converted-teacher cache
(`teacher_cache`). The package exports the network's API and its conditioning interface (`conditioning`)."""

from trigflow_distill.models.cosmos_dit.conditioning import (
    TEXT_KINDS,
    check_data,
    project_text,
    text_kind,
    unconditional_context,
)
from trigflow_distill.models.cosmos_dit.network import (
    GUIDANCE_EMBEDDER,
    PRESETS,
    DiTConfig,
    add_guidance_embedder,
    get_preset,
    init_params,
    param_shapes,
    velocity,
)

__all__ = [
    "GUIDANCE_EMBEDDER",
    "PRESETS",
    "TEXT_KINDS",
    "add_guidance_embedder",
    "check_data",
    "DiTConfig",
    "get_preset",
    "init_params",
    "param_shapes",
    "project_text",
    "text_kind",
    "unconditional_context",
    "velocity",
]
