"""A teacher/student/critic network seen as a Video2World TrigFlow denoiser x0 = D(x_tau, tau)
(docs/algorithm.md §1, §7).

Every network call of the algorithm (student, teacher, critic) goes through `denoise`: the TrigFlow
coefficients turn the velocity network into an x0 predictor, and the first N latent frames of each sample
are replaced by the ground truth (input side and output side) with their own small timestep.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from trigflow_distill.core import trigflow
from trigflow_distill.models import cosmos_dit

# Conditional frames are presented to the net at sigma = 1e-4 (docs/algorithm.md §7, `replace_gt_timesteps`).
TAU_COND = math.atan(1e-4)


def sample_num_cond_frames(key, batch_size: int, probs: Sequence[float]):
    """Number of conditional latent frames per sample, N ~ Categorical(probs) over {0, 1, ...}: (B,) int32."""
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    return jax.random.categorical(key, logits, shape=(batch_size,)).astype(jnp.int32)


def cond_mask(num_cond_b, x_bcthw_shape):
    """Mask (B,1,T,H,W) that is 1 on the first num_cond_b[i] frames of sample i."""
    _, _, t, h, w = x_bcthw_shape
    frame_is_cond_bt = jnp.arange(t)[None, :] < num_cond_b[:, None]
    mask = frame_is_cond_bt.astype(jnp.float32)[:, None, :, None, None]
    return jnp.broadcast_to(mask, (num_cond_b.shape[0], 1, t, h, w))


def denoise(
    net_config,
    params,
    x_tau_bcthw,
    tau_b,
    context_bld,
    gt_bcthw,
    mask_b1thw,
    *,
    scaling="rectified_flow",
    sigma_data=1.0,
    replace_gt_timesteps=True,
    padding_mask_b1hw=None,
    mesh=None,
    guidance_b=None,
):
    """x0 prediction of a velocity/denoiser network at TrigFlow time tau_b (B,), with GT conditional frames.

    `padding_mask_b1hw`: 1 on padded pixels, (B or 1, 1, H_px, W_px) at pixel or (B or 1, 1, H, W) at latent
    resolution; the network resizes it (nearest) to the latent grid and takes it as an input channel
    (docs/algorithm.md §7). None means zeros (no padding).
    `context_bld` is what `cosmos_dit.velocity` takes: the projected context when `params` has no
    `crossattn_proj` (the trainer projects once per batch), the raw embedding otherwise. `mesh`: passed to
    `cosmos_dit.velocity` (sequence-sharded activations when it has a `seq` axis of size > 1). `guidance_b`: the CFG
    scale (B,) a guidance-conditioned student takes (docs/algorithm.md §15); None for every other network.
    """
    tau = tau_b.astype(jnp.float32)[:, None, None, None, None]
    c_skip, c_out, c_in, c_noise = trigflow.coefficients(tau, scaling, sigma_data)
    x_tau = x_tau_bcthw.astype(jnp.float32)
    gt = gt_bcthw.astype(jnp.float32)
    net_in = mask_b1thw * gt / sigma_data + (1.0 - mask_b1thw) * c_in * x_tau

    t_frames = x_tau.shape[2]
    c_noise_bt = jnp.broadcast_to(rearrange(c_noise, "b 1 1 1 1 -> b 1"), (tau_b.shape[0], t_frames))
    if replace_gt_timesteps:
        cond_noise = trigflow.coefficients(jnp.float32(TAU_COND), scaling, sigma_data)[3]
        frame_is_cond_bt = mask_b1thw[:, 0, :, 0, 0] > 0.5
        c_noise_bt = jnp.where(frame_is_cond_bt, cond_noise, c_noise_bt)

    out = cosmos_dit.velocity(
        net_config,
        params,
        net_in,
        c_noise_bt,
        context_bld,
        cond_mask_b1thw=mask_b1thw,
        padding_mask_b1hw=padding_mask_b1hw,
        mesh=mesh,
        guidance_b=guidance_b,
    )
    x0 = c_skip * x_tau + c_out * out.astype(jnp.float32)
    return mask_b1thw * gt + (1.0 - mask_b1thw) * x0


class Conditioning(NamedTuple):
    """What one batch conditions on, as the denoisers the updates call (docs/algorithm.md §7)."""

    shape: tuple  # shape of the generated samples, e.g. (B,16,T,H,W)
    # (params, x_tau, tau_b[, guidance_b=]) -> x0 with the batch's conditioning; guidance_b (B,) only for a
    # guidance-conditioned student or critic (docs/algorithm.md §15)
    x0_fn: Callable
    x0_uncond_fn: Callable  # the same with the unconditional (all-zero) text


def text_width_kind(net_config, teacher, width: int) -> str:
    """ "raw" if text of this width goes through the teacher's frozen projection, "projected" if it is already the
    context the networks take (a dataset of projected context, docs/algorithm.md §7, §13); a ValueError naming the
    widths otherwise. Equal projection input and output widths count as raw."""
    proj = teacher["text_proj"]
    widths = {"raw": None if proj is None else proj["kernel"].shape[0], "projected": net_config.crossattn_emb_channels}
    for kind, w in widths.items():
        if width == w:
            return kind
    takes = (
        f"{widths['raw']} (raw Cosmos-Reason1 embeddings, which its text projection maps to {widths['projected']}) or "
        if proj is not None
        else ""
    ) + f"{widths['projected']} (projected context)"
    raise ValueError(
        f"the data's text embeddings are {width} wide, but this teacher takes {takes}; write the data for "
        "this teacher (python -m trigflow_distill.data.cli --net=...)."
    )


def contexts(algo, teacher, text_bld):
    """(cond, uncond) context (B, L, D) for the networks from the batch's text: raw embeddings are projected
    (the unconditional text is all zeros); projected context is used as is, and its unconditional twin is
    GELU(b), the projection of zeros (docs/algorithm.md §7, §13)."""
    proj = teacher["text_proj"]
    kind = text_width_kind(algo.net_config, teacher, text_bld.shape[-1])
    if proj is None:
        return text_bld, jnp.zeros_like(text_bld)
    if kind == "raw":

        def project(text):
            return cosmos_dit.project_text(algo.net_config, {"crossattn_proj": proj}, text)

        return project(text_bld), project(jnp.zeros_like(text_bld))
    uncond = jax.nn.gelu(proj["bias"].astype(jnp.float32), approximate=False)
    return text_bld.astype(jnp.float32), jnp.broadcast_to(uncond, text_bld.shape)


def condition(algo, key, teacher, batch) -> Conditioning:
    """Video2World conditioning of a batch {"latents", "text", ["num_cond_frames"], ["padding_mask"]}: N
    conditional frames (a negative or missing N is drawn from algo.cond_frame_probs with `key`), contexts from
    `contexts` (raw or projected text), the batch's padding mask (B,1,h,w) or none (zeros); every network call
    goes through `denoise` with all of these (docs/algorithm.md §1, §7)."""
    gt = batch["latents"].astype(jnp.float32)
    drawn = sample_num_cond_frames(key, gt.shape[0], algo.cond_frame_probs)
    num_cond = batch.get("num_cond_frames")
    num_cond = drawn if num_cond is None else jnp.where(num_cond >= 0, num_cond, drawn)
    mask = cond_mask(num_cond, gt.shape)
    padding_mask = batch.get("padding_mask")

    def x0_fn_for(context):
        def fn(params, x_tau, tau_b, guidance_b=None):
            return denoise(
                algo.net_config,
                params,
                x_tau,
                tau_b,
                context,
                gt,
                mask,
                scaling=algo.scaling,
                sigma_data=algo.sigma_data,
                replace_gt_timesteps=algo.replace_gt_timesteps,
                padding_mask_b1hw=padding_mask,
                mesh=algo.mesh,
                guidance_b=guidance_b,
            )

        return fn

    cond, uncond = contexts(algo, teacher, batch["text"])
    return Conditioning(gt.shape, x0_fn_for(cond), x0_fn_for(uncond))
