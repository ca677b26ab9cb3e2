"""The Cosmos DiT's conditioning interface (docs/algorithm.md §7, §11, §13; docs/architecture.md "What a model
family provides", 4): the frozen text projection in front of the network, the unconditional context, and the one
"does this data fit the network" check. `config` is a `network.DiTConfig`.
"""

import jax
import jax.numpy as jnp


def project_text(text_proj: dict, text_bld: jnp.ndarray) -> jnp.ndarray:
    """The frozen text projection (docs/algorithm.md §11), the one used by training, prepare and generate: context
    (B, L, crossattn_emb_channels) = GELU_erf(text @ W + b) of raw text embeddings (B, L, Cin), in float32 at full
    precision (it runs once per batch, outside the network's compute dtype). text_proj = {"kernel", "bias"}."""
    kernel, bias = text_proj["kernel"], text_proj["bias"]
    if text_bld.ndim != 3 or text_bld.shape[-1] != kernel.shape[0]:
        raise ValueError(f"text embedding must be (B, L, {kernel.shape[0]}), got {text_bld.shape}")
    y = jnp.einsum(
        "bli,io->blo",
        text_bld.astype(jnp.float32),
        kernel.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jax.nn.gelu(y + bias.astype(jnp.float32), approximate=False)


def unconditional_context(text_proj: dict, shape_bld: tuple) -> jnp.ndarray:
    """The context of the unconditional (all-zero) text, GELU(b) in every token, broadcast to `shape_bld`
    (docs/algorithm.md §7, §13): the projection of zeros, so raw and projected data get the same one."""
    return jnp.broadcast_to(jax.nn.gelu(text_proj["bias"].astype(jnp.float32), approximate=False), shape_bld)


TEXT_KINDS = ("raw", "projected")


def text_kind(config, text_width: int, declared: str | None = None) -> str:
    """The kind of `text_width`-wide text for this network: "raw" (embeddings that the frozen projection maps to the
    context) or "projected" (the context itself, docs/algorithm.md §7, §13); `declared` is what the data says (a
    dataset's meta.json), None: told by the width (equal widths count as raw). ValueError naming the widths when
    the text does not fit."""
    if declared is not None and declared not in TEXT_KINDS:
        raise ValueError(f"text kind {declared!r}: use one of {TEXT_KINDS}")
    raw = config.crossattn_proj_in_channels
    widths = {"raw": raw, "projected": config.crossattn_emb_channels}
    for kind, width in widths.items():
        if width == text_width and declared in (None, kind):
            return kind
    takes = (
        f"{raw} (raw text-encoder embeddings, which its text projection maps to {widths['projected']}) or "
        if raw is not None
        else ""
    ) + f"{widths['projected']} (projected context)"
    said = f" {declared}" if declared else ""
    raise ValueError(
        f"the data's{said} text embeddings are {text_width} wide, but this teacher takes {takes}; write the data "
        "for this teacher (trigflow-prepare, or trigflow-data --net=...)."
    )


def check_data(config, latent_shape, text_width: int, declared_text_kind: str | None = None) -> str:
    """The one "does this data fit the network" check (trainer, dataset writer): ValueError unless records of
    (C, T, H, W) latents and `text_width`-wide text fit this network; returns the text kind (`text_kind`)."""
    c, t, h, w = tuple(latent_shape)
    pt, ps = config.patch_temporal, config.patch_spatial
    if c != config.in_channels or t % pt or h % ps or w % ps:
        raise ValueError(
            f"the data's latents are {tuple(latent_shape)}; the teacher needs {config.in_channels} channels and T, H, "
            f"W divisible by {pt}, {ps}, {ps} (videos whose sides are multiples of {8 * ps} pixels)."
        )
    return text_kind(config, text_width, declared_text_kind)
