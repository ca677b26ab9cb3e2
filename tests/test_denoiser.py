"""The Video2World denoiser wrapper: padding masks reach the network (docs/algorithm.md §7)."""

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit

NET = cosmos_dit.get_preset("tiny", num_blocks=1)


def test_padding_mask_reaches_the_network_at_pixel_or_latent_resolution():
    params = cosmos_dit.init_params(NET, jax.random.PRNGKey(0))
    params.pop("crossattn_proj")
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (2, 16, 2, 4, 6))
    ctx = jax.random.normal(k[1], (2, 5, NET.crossattn_emb_channels))
    gt = jax.random.normal(k[2], x.shape)
    mask = video2world.cond_mask(jnp.array([0, 1]), x.shape)
    tau = jnp.array([0.7, 1.2])

    def run(pad):
        return np.asarray(video2world.denoise(NET, params, x, tau, ctx, gt, mask, padding_mask_b1hw=pad))

    pad_latent = np.zeros((2, 1, 4, 6), np.float32)
    pad_latent[:, :, :, 4:] = 1.0  # right two latent columns are padding
    pad_pixel = np.repeat(np.repeat(pad_latent, 8, axis=2), 8, axis=3)  # (2, 1, 32, 48): 8x VAE downsampling
    none, zeros = run(None), run(np.zeros((2, 1, 4, 6), np.float32))
    np.testing.assert_array_equal(none, zeros)  # missing mask = zeros
    latent, pixel = run(pad_latent), run(pad_pixel)
    np.testing.assert_allclose(latent, pixel, rtol=1e-6, atol=1e-6)
    assert np.abs(latent - none).max() > 1e-3  # the network really sees it
