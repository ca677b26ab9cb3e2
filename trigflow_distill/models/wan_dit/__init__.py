"""The Wan2.1 DiT family (T2V 1.3B / 14B, I2V 14B): the network (`network`), its RoPE (`rope`), the release and
diffusers name maps and config inference (`names`) and torch-free safetensors loading (`checkpoint`).

Not yet a registered family (`models.FAMILIES`): its conditioning interface (`project_text`, `text_kind`, ...),
the CLIP image tower and the teacher cache are still to come (docs/models.md, "The Wan2.1 DiT"); the text
encoder is `models/umt5`."""

from trigflow_distill.models.wan_dit.network import (
    PRESETS,
    WanDiTConfig,
    get_preset,
    init_params,
    param_shapes,
    velocity,
)

__all__ = ["PRESETS", "WanDiTConfig", "get_preset", "init_params", "param_shapes", "velocity"]
