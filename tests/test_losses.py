"""DMD2 generator and critic losses against float64 numpy versions of the reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trigflow_distill.core import losses

SHAPE = (4, 3, 2, 5)  # (B, C, T, H) stands in for (B, C, T, H, W)


def _batch(seed, scale=1.0):
    k = jax.random.split(jax.random.key(seed), 3)
    return tuple(scale * jax.random.normal(ki, SHAPE) for ki in k)


def _reference_g(g_x0, x0_fake, x0_teacher):
    g_x0, x0_fake, x0_teacher = (np.asarray(a, np.float64) for a in (g_x0, x0_fake, x0_teacher))
    lam = np.maximum(np.abs(g_x0 - x0_teacher).mean(axis=(1, 2, 3)), 1e-5)
    return (x0_fake - x0_teacher) / lam[:, None, None, None], lam


def test_dmd_loss_value_and_gradient_is_2g_over_numel():
    g_x0, x0_fake, x0_teacher = _batch(0)
    (loss, aux), grads = jax.value_and_grad(losses.dmd_loss, argnums=(0, 1, 2), has_aux=True)(g_x0, x0_fake, x0_teacher)
    g, lam = _reference_g(g_x0, x0_fake, x0_teacher)
    numel = np.prod(SHAPE[1:])
    np.testing.assert_allclose(aux["lambda_b"], lam, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_b"], (g**2).mean(axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(aux["grad_norm_b"], np.abs(g).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(loss, (g**2).mean(), rtol=1e-4)
    assert not np.any(aux["nan_b"])
    # Batch loss = mean over B of per-sample means, so d/dG_x0 = 2g / numel / B.
    np.testing.assert_allclose(grads[0], 2 * g / numel / SHAPE[0], rtol=1e-4, atol=1e-8)
    # Per-sample: d loss_b / d G_x0[b] = 2 g_b / numel.
    per_sample = jax.grad(lambda x: losses.dmd_loss(x, x0_fake, x0_teacher)[1]["loss_b"][2])(g_x0)
    np.testing.assert_allclose(per_sample[2], 2 * g[2] / numel, rtol=1e-4, atol=1e-8)
    assert np.all(np.asarray(per_sample)[[0, 1, 3]] == 0.0)
    # No gradient to the critic's or the teacher's prediction.
    assert np.all(np.asarray(grads[1]) == 0.0) and np.all(np.asarray(grads[2]) == 0.0)


def test_dmd_lambda_floor():
    g_x0, x0_fake, _ = _batch(1)
    loss, aux = losses.dmd_loss(g_x0, x0_fake, g_x0)  # |G - x0_T| = 0: lambda floored at 1e-5
    np.testing.assert_allclose(aux["lambda_b"], 1e-5)
    g = (np.asarray(x0_fake, np.float64) - np.asarray(g_x0, np.float64)) / 1e-5
    np.testing.assert_allclose(aux["loss_b"], (g**2).mean(axis=(1, 2, 3)), rtol=1e-3)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("where", ["g_x0", "x0_fake", "x0_teacher"])
def test_dmd_nan_sample_masked_with_zero_gradient(where):
    g_x0, x0_fake, x0_teacher = _batch(2)
    bad = {"g_x0": g_x0, "x0_fake": x0_fake, "x0_teacher": x0_teacher}
    bad[where] = bad[where].at[1, 0, 1, 2].set(jnp.nan)
    loss_grad = jax.jit(jax.value_and_grad(losses.dmd_loss, has_aux=True))
    (loss, aux), grad = loss_grad(bad["g_x0"], bad["x0_fake"], bad["x0_teacher"])
    (clean_loss, clean_aux), clean_grad = loss_grad(g_x0, x0_fake, x0_teacher)

    np.testing.assert_array_equal(aux["nan_b"], [False, True, False, False])
    assert float(aux["loss_b"][1]) == 0.0
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad[1]) == 0.0)
    keep = np.array([0, 2, 3])
    np.testing.assert_array_equal(aux["loss_b"][keep], clean_aux["loss_b"][keep])
    np.testing.assert_array_equal(grad[keep], clean_grad[keep])
    np.testing.assert_allclose(loss, clean_aux["loss_b"][keep].sum() / 4, rtol=1e-6)
    assert np.isfinite(float(loss)) and float(loss) < float(clean_loss)


def test_guidance_4_is_the_reference_offset_form_with_w_3():
    x0_cond, x0_uncond, g_x0 = _batch(3)
    x0_fake = _batch(4)[0]
    standard = losses.cfg_x0(x0_cond, x0_uncond, 4.0)
    offset = x0_cond + 3.0 * (x0_cond - x0_uncond)
    np.testing.assert_allclose(standard, offset, rtol=1e-5, atol=1e-5)
    (l_std, _), g_std = jax.value_and_grad(losses.dmd_loss, has_aux=True)(g_x0, x0_fake, standard)
    (l_off, _), g_off = jax.value_and_grad(losses.dmd_loss, has_aux=True)(g_x0, x0_fake, offset)
    np.testing.assert_allclose(l_std, l_off, rtol=1e-5)
    np.testing.assert_allclose(g_std, g_off, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(losses.cfg_x0(x0_cond, x0_uncond, 1.0), x0_cond, atol=1e-6)
    np.testing.assert_allclose(losses.cfg_x0(x0_cond, x0_uncond, 0.0), x0_uncond)


def test_critic_loss_weighting_and_gradients():
    g_x0, x0_fake, _ = _batch(5)
    tau = jnp.array([0.1, 0.7, 1.5, 0.3])
    (loss, aux), (d_g, d_fake) = jax.value_and_grad(losses.critic_loss, argnums=(0, 1), has_aux=True)(
        g_x0, x0_fake, tau
    )
    err = ((np.asarray(g_x0, np.float64) - np.asarray(x0_fake, np.float64)) ** 2).mean(axis=(1, 2, 3))
    weight = 1 / np.sin(np.asarray(tau, np.float64)) ** 2
    np.testing.assert_allclose(aux["weight_b"], weight, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_b"], weight * err, rtol=1e-5)
    np.testing.assert_allclose(loss, (weight * err).mean(), rtol=1e-5)
    assert np.all(np.asarray(d_g) == 0.0)  # the student's sample is data for the critic
    expected = -2 * (np.asarray(g_x0) - np.asarray(x0_fake)) * weight[:, None, None, None] / np.prod(SHAPE)
    np.testing.assert_allclose(d_fake, expected, rtol=1e-4, atol=1e-9)


def test_critic_loss_guard_at_tau_zero_and_shape_check():
    g_x0, x0_fake, _ = _batch(6)
    loss, aux = losses.critic_loss(g_x0, x0_fake, jnp.array([0.0, 0.5, 0.5, 0.5]))
    assert np.isfinite(float(loss)) and float(aux["weight_b"][0]) == pytest.approx(1e12, rel=1e-3)
    with pytest.raises(ValueError, match="tau_b"):
        losses.critic_loss(g_x0, x0_fake, jnp.zeros((4, 2)))


def test_gan_losses_are_binary_cross_entropy():
    k0, k1 = jax.random.split(jax.random.key(7))
    real, fake = 3 * jax.random.normal(k0, (6, 10)), 3 * jax.random.normal(k1, (6, 10))
    bce = optax.sigmoid_binary_cross_entropy
    np.testing.assert_allclose(losses.gan_generator_loss(fake), bce(fake, jnp.ones_like(fake)).mean(), rtol=1e-6)
    expected = bce(real, jnp.ones_like(real)).mean() + bce(fake, jnp.zeros_like(fake)).mean()
    np.testing.assert_allclose(losses.gan_discriminator_loss(real, fake), expected, rtol=1e-6)


def test_dmd_lambda_per_frame_chunk_against_numpy():
    """lambda_frame_chunks=K: one lambda per (sample, T/K consecutive frames), the reference's per-shard lambda."""
    shape = (3, 2, 8, 2, 3)  # (B, C, T, H, W), 4 chunks of 2 frames
    k = jax.random.split(jax.random.key(7), 3)
    g_x0, x0_fake, x0_teacher = (jax.random.normal(ki, shape) * (1 + ki_i) for ki_i, ki in enumerate(k))
    # Make chunks differ in scale so a per-sample lambda would be visibly wrong.
    g_x0 = g_x0 * jnp.arange(1, 9, dtype=jnp.float32)[None, None, :, None, None]
    G, F, T = (np.asarray(a, np.float64) for a in (g_x0, x0_fake, x0_teacher))
    lam = np.empty((3, 4))
    g = np.empty(shape)
    for b in range(3):
        for c in range(4):
            frames = slice(2 * c, 2 * c + 2)
            lam[b, c] = max(np.abs(G[b, :, frames] - T[b, :, frames]).mean(), 1e-5)
            g[b, :, frames] = (F[b, :, frames] - T[b, :, frames]) / lam[b, c]
    (loss, aux), grad = jax.value_and_grad(losses.dmd_loss, has_aux=True)(g_x0, x0_fake, x0_teacher, 4)
    np.testing.assert_allclose(aux["lambda_bk"], lam, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_b"], (g**2).mean(axis=(1, 2, 3, 4)), rtol=1e-4)
    np.testing.assert_allclose(loss, (g**2).mean(), rtol=1e-4)
    np.testing.assert_allclose(grad, 2 * g / g[0].size / shape[0], rtol=1e-4, atol=1e-7)
    # K = 1 is the per-sample lambda (the default), and a K that does not divide T is refused.
    (l1, a1), l0 = losses.dmd_loss(g_x0, x0_fake, x0_teacher, 1), losses.dmd_loss(g_x0, x0_fake, x0_teacher)[0]
    np.testing.assert_allclose(a1["lambda_b"], np.maximum(np.abs(G - T).mean(axis=(1, 2, 3, 4)), 1e-5), rtol=1e-5)
    assert float(l1) == float(l0) and float(l1) != pytest.approx(float(loss), rel=1e-2)
    with pytest.raises(ValueError, match="lambda_frame_chunks"):
        losses.dmd_loss(g_x0, x0_fake, x0_teacher, 3)
