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

from trigflow_distill import models
from trigflow_distill.core import sampling, trigflow

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
    `context_bld` is what the family's `velocity` takes: the projected context when `params` has no
    `crossattn_proj` (the trainer projects once per batch), the raw embedding otherwise. `mesh`: passed to
    the family's `velocity` (sequence-sharded activations when it has a `seq` axis of size > 1). `guidance_b`: the CFG
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

    out = models.family(net_config).velocity(
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


def make_x0_fn(
    net_config,
    context_bld,
    gt_bcthw,
    mask_b1thw,
    *,
    scaling="rectified_flow",
    sigma_data=1.0,
    replace_gt_timesteps=True,
    padding_mask_b1hw=None,
    mesh=None,
) -> Callable:
    """The one Video2World x0 builder: fn(params, x_tau, tau_b, guidance_b=None) -> x0, `denoise` with this
    context, ground truth, conditional-frame mask and padding mask. Training, evaluation, `generate` and the
    benchmarks all build their denoisers here (docs/algorithm.md §1, §7)."""

    def x0_fn(params, x_tau, tau_b, guidance_b=None):
        return denoise(
            net_config,
            params,
            x_tau,
            tau_b,
            context_bld,
            gt_bcthw,
            mask_b1thw,
            scaling=scaling,
            sigma_data=sigma_data,
            replace_gt_timesteps=replace_gt_timesteps,
            padding_mask_b1hw=padding_mask_b1hw,
            mesh=mesh,
            guidance_b=guidance_b,
        )

    return x0_fn


def sample(
    settings: sampling.SamplerSettings,
    net_config,
    params,
    context_bld,
    uncond_bld,
    gt_bcthw,
    mask_b1thw,
    eps_bcthw,
    *,
    scaling="rectified_flow",
    padding_mask_b1hw=None,
    mesh=None,
    replace_gt_timesteps=True,
):
    """Video2World samples x0 (B, C, T, H, W) from noise eps: `sampling.sample` over `make_x0_fn` denoisers.

    context_bld / uncond_bld: projected conditional / unconditional context (uncond is read by a guided teacher
    only); gt, mask and the padding mask may have batch 1. A guidance-conditioned student (params with a guidance
    embedder, §15) takes settings.guidance as its input. `replace_gt_timesteps` (static under jit): conditional
    frames get the small conditional timestep (§7), as the network was trained; NVIDIA's teacher inference feeds
    them the step's time (False). The output's conditional frames are gt exactly.
    """
    b = eps_bcthw.shape[0]
    gt = jnp.broadcast_to(gt_bcthw, (b, *gt_bcthw.shape[1:]))
    mask = jnp.broadcast_to(mask_b1thw, (b, *mask_b1thw.shape[1:]))
    guidance_b = None
    if settings.kind == "student" and models.family(net_config).GUIDANCE_EMBEDDER in params:
        if settings.guidance is None:
            raise ValueError("a guidance-conditioned student needs the CFG scale to sample at (settings.guidance)")
        guidance_b = jnp.full((b,), settings.guidance, jnp.float32)

    def x0_for(context):
        fn = make_x0_fn(
            net_config,
            context,
            gt,
            mask,
            scaling=scaling,
            sigma_data=settings.sigma_data,
            replace_gt_timesteps=replace_gt_timesteps,
            padding_mask_b1hw=padding_mask_b1hw,
            mesh=mesh,
        )
        return lambda x_tau, tau_b: fn(params, x_tau, tau_b, guidance_b)

    uncond = x0_for(jnp.broadcast_to(uncond_bld, context_bld.shape)) if settings.uses_cfg else None
    x0 = sampling.sample(settings, x0_for(context_bld), uncond, eps_bcthw)
    return mask * gt + (1.0 - mask) * x0


def contexts(algo, teacher, text_bld):
    """(cond, uncond) context (B, L, D) for the networks from the batch's text: raw embeddings are projected by the
    teacher's frozen projection, projected context is used as is (its kind: algo.text_kind, what the dataset
    declares, else told by the width: the family's `text_kind`); the unconditional context is the projection
    of all-zero text, GELU(b) (docs/algorithm.md §7, §13). A teacher without a projection takes the text as is."""
    proj = teacher["text_proj"]
    if proj is None:
        return text_bld, jnp.zeros_like(text_bld)
    net = models.family(algo.net_config)
    kind = net.text_kind(algo.net_config, text_bld.shape[-1], algo.text_kind)
    context = net.project_text(proj, text_bld) if kind == "raw" else text_bld.astype(jnp.float32)
    return context, net.unconditional_context(proj, context.shape)


def condition(algo, key, teacher, batch) -> Conditioning:
    """Video2World conditioning of a batch {"latents", "text", ["num_cond_frames"], ["padding_mask"]}: N
    conditional frames (a negative or missing N is drawn from algo.cond_frame_probs with `key`), contexts from
    `contexts` (raw or projected text), the batch's padding mask (B,1,h,w) or none (zeros); every network call
    goes through `make_x0_fn` with all of these (docs/algorithm.md §1, §7)."""
    gt = batch["latents"].astype(jnp.float32)
    drawn = sample_num_cond_frames(key, gt.shape[0], algo.cond_frame_probs)
    num_cond = batch.get("num_cond_frames")
    num_cond = drawn if num_cond is None else jnp.where(num_cond >= 0, num_cond, drawn)
    mask = cond_mask(num_cond, gt.shape)

    def x0_fn_for(context):
        return make_x0_fn(
            algo.net_config,
            context,
            gt,
            mask,
            scaling=algo.scaling,
            sigma_data=algo.sigma_data,
            replace_gt_timesteps=algo.replace_gt_timesteps,
            padding_mask_b1hw=batch.get("padding_mask"),
            mesh=algo.mesh,
        )

    cond, uncond = contexts(algo, teacher, batch["text"])
    return Conditioning(gt.shape, x0_fn_for(cond), x0_fn_for(uncond))
