"""A teacher/student/critic network seen as a Video2World TrigFlow denoiser x0 = D(x_tau, tau)
(docs/algorithm.md §1, §7).

Every network call of the algorithm (student, teacher, critic) goes through `denoise`: the TrigFlow
coefficients turn the velocity network into an x0 predictor, and the first N latent frames of each sample
are replaced by the ground truth (input side and output side) with their own small timestep.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange

from trigflow_distill import networks, trigflow

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
    `context_bld` is what `networks.velocity` takes: the projected context when `params` has no
    `crossattn_proj` (the trainer projects once per batch), the raw embedding otherwise. `mesh`: passed to
    `networks.velocity` (sequence-sharded activations when it has a `seq` axis of size > 1). `guidance_b`: the CFG
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

    out = networks.velocity(
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
