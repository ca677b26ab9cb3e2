"""DMD2 losses in TrigFlow (docs/algorithm.md §4-5): generator (distribution matching), critic, optional GAN terms."""

import jax
import jax.numpy as jnp
from einops import rearrange

from trigflow_distill.core.trigflow import TAU_MIN, expand_tau

LAMBDA_FLOOR = 1e-5


def _sample_axes(x):
    return tuple(range(1, x.ndim))


def cfg_x0(x0_cond, x0_uncond, guidance):
    """Standard classifier-free guidance in x0 space: x0_u + s (x0_c - x0_u) (s = 4 is the reference's w = 3)."""
    return x0_uncond + guidance * (x0_cond - x0_uncond)


def _chunk_lambda(err, num_chunks):
    """lambda per (sample, chunk of frames) from err = |g_x0 - x0_teacher| (B, C, T, ...): max(mean, 1e-5) over
    each chunk's (C, T/K, ...) elements, shape (B, K), and its broadcast against err. K = 1: any (B, ...) shape."""
    if num_chunks == 1:
        lambda_bk = jnp.maximum(jnp.mean(err, axis=_sample_axes(err)), LAMBDA_FLOOR)[:, None]
        return lambda_bk, expand_tau(lambda_bk[:, 0], err.ndim)
    if num_chunks < 1 or err.ndim < 3 or err.shape[2] % num_chunks:
        raise ValueError(
            f"lambda_frame_chunks={num_chunks} must be >= 1 and divide the latent frames (axis 2) of "
            f"inputs shaped {err.shape}"
        )
    lambda_bk = jnp.maximum(
        jnp.mean(rearrange(err, "b c (k t) ... -> b k (c t ...)", k=num_chunks), axis=-1), LAMBDA_FLOOR
    )
    lambda_bt = jnp.repeat(lambda_bk, err.shape[2] // num_chunks, axis=1)
    return lambda_bk, lambda_bt.reshape(lambda_bt.shape[:1] + (1,) + lambda_bt.shape[1:] + (1,) * (err.ndim - 3))


def dmd_loss(g_x0, x0_fake, x0_teacher, lambda_frame_chunks=1):
    """DMD2 generator loss (docs/algorithm.md §4); all arrays (B, C, T, ...). Gradient flows only into g_x0.

    lambda = max(mean |g_x0 - x0_teacher|, 1e-5) per sample, or with lambda_frame_chunks = K > 1 per (sample,
    chunk of T/K consecutive frames): the reference computes lambda on each context-parallel shard, and the
    released 2B student used K = 4 (§13). g = (x0_fake - x0_teacher) / lambda; per element (g_x0 - sg(g_x0 - g))^2,
    whose value is g^2 and whose gradient w.r.t. g_x0 is 2g. A sample whose loss is not finite gets loss 0 and
    zero gradient. Returns (mean over samples of the per-sample element mean, aux) with aux = {lambda_b (mean over
    chunks), lambda_bk (B, K), grad_norm_b (mean |g|), loss_b, nan_b}.
    """
    sg = jax.lax.stop_gradient
    x0_fake, x0_teacher = sg(x0_fake), sg(x0_teacher)
    axes = _sample_axes(g_x0)

    def per_sample(g_x0):
        lambda_bk, lam = _chunk_lambda(jnp.abs(sg(g_x0) - x0_teacher), lambda_frame_chunks)
        g = sg((x0_fake - x0_teacher) / lam)
        return jnp.mean((g_x0 - sg(g_x0 - g)) ** 2, axis=axes), lambda_bk, g

    # Find the bad samples on values first, then recompute on sanitised inputs: masking only the output would
    # still send 0 * NaN = NaN back into g_x0.
    nan_b = ~jnp.isfinite(per_sample(sg(g_x0))[0])
    bad = expand_tau(nan_b, g_x0.ndim)
    safe = lambda x: jnp.where(bad, jnp.zeros_like(x), x)
    x0_fake, x0_teacher = safe(x0_fake), safe(x0_teacher)
    loss_b, lambda_bk, g = per_sample(safe(g_x0))
    loss_b = jnp.where(nan_b, 0.0, loss_b)
    aux = {
        "lambda_b": jnp.mean(lambda_bk, axis=1),
        "lambda_bk": lambda_bk,
        "grad_norm_b": jnp.mean(jnp.abs(g), axis=axes),
        "loss_b": loss_b,
        "nan_b": nan_b,
    }
    return jnp.mean(loss_b), aux


def critic_loss(g_x0, x0_fake, tau_b):
    """Fake-score (critic) loss (docs/algorithm.md §5): mean over elements of (sg(g_x0) - x0_fake)^2 / sin^2(tau),
    then mean over B.

    tau_b (B,) is the critic's noise level per sample, clamped to >= 1e-6 so the weight stays finite.
    Returns (loss, aux) with aux = {loss_b, weight_b}.
    """
    tau_b = jnp.asarray(tau_b)
    if tau_b.ndim != 1 or tau_b.shape[0] != g_x0.shape[0]:
        raise ValueError(f"tau_b must have shape (B,) = ({g_x0.shape[0]},), got {tau_b.shape}; pass tau[:, 0]")
    weight_b = 1.0 / jnp.sin(jnp.maximum(tau_b, TAU_MIN)) ** 2
    err_b = jnp.mean((jax.lax.stop_gradient(g_x0) - x0_fake) ** 2, axis=_sample_axes(g_x0))
    loss_b = weight_b * err_b
    return jnp.mean(loss_b), {"loss_b": loss_b, "weight_b": weight_b}


def gan_generator_loss(fake_logits):
    """Non-saturating GAN generator loss: BCE(fake_logits, 1), mean over all logits."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def gan_discriminator_loss(real_logits, fake_logits):
    """GAN discriminator loss: BCE(real_logits, 1) + BCE(fake_logits, 0), each a mean over its logits."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
