"""The Wan2.1 VAE family (docs/algorithm.md §9, §10): videos <-> normalised latents.

`names` holds the architecture config, the native / diffusers name maps and the latent statistics; `network` the
pure encoder / decoder functions; `api` loading, `encode` / `decode` and the CLI (`python -m
trigflow_distill.models.wan_vae`). The package exports all three's public API.
"""

from trigflow_distill.models.wan_vae.api import DEFAULT_SOURCE, decode, encode, load, main
from trigflow_distill.models.wan_vae.names import (
    LATENT_MEAN,
    LATENT_STD,
    WanVAEConfig,
    check_frame_count,
    check_state_dict,
    decoder_plan,
    diffusers_names,
    diffusers_shapes_to_native,
    diffusers_to_native,
    encoder_plan,
    from_torch,
    infer_config,
    native_to_diffusers,
    param_shapes,
    to_torch,
)
from trigflow_distill.models.wan_vae.network import decode_pixels, encode_moments, init_params

__all__ = [
    "DEFAULT_SOURCE",
    "LATENT_MEAN",
    "LATENT_STD",
    "WanVAEConfig",
    "check_frame_count",
    "check_state_dict",
    "decode",
    "decode_pixels",
    "decoder_plan",
    "diffusers_names",
    "diffusers_shapes_to_native",
    "diffusers_to_native",
    "encode",
    "encode_moments",
    "encoder_plan",
    "from_torch",
    "infer_config",
    "init_params",
    "load",
    "main",
    "native_to_diffusers",
    "param_shapes",
    "to_torch",
]
