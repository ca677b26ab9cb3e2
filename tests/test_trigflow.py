"""TrigFlow conversions and preconditioning against closed forms written independently in float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.core import trigflow as tf

# Grid over [0, pi/2] including both ends.
TAU_GRID = np.concatenate([[0.0], np.linspace(1e-3, math.pi / 2 - 1e-3, 41), [math.pi / 2]])
INTERIOR = TAU_GRID[1:-1]


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_coefficients_closed_form_and_edm_preconditioning(sigma_data):
    c_skip, c_out, c_in, c_noise = (np.asarray(c, np.float64) for c in tf.coefficients(TAU_GRID, "edm", sigma_data))
    np.testing.assert_allclose(c_skip, sigma_data * np.cos(TAU_GRID), atol=1e-6)
    np.testing.assert_allclose(c_out, sigma_data * np.sin(TAU_GRID), atol=1e-6)
    np.testing.assert_allclose(c_in, 1.0)
    for c in (c_skip, c_out, c_in):
        assert np.all(np.isfinite(c))

    # EDM preconditioning on x_edm = x0 + sigma eps = (sigma_d / cos tau) x_tau, re-expressed on x_tau.
    sigma = sigma_data * np.tan(INTERIOR)
    root = np.sqrt(sigma**2 + sigma_data**2)
    to_edm_state = sigma_data / np.cos(INTERIOR)
    np.testing.assert_allclose(c_skip[1:-1], sigma_data**2 / root**2 * to_edm_state, rtol=1e-5)
    np.testing.assert_allclose(c_out[1:-1], sigma * sigma_data / root, rtol=1e-5)
    np.testing.assert_allclose(c_in[1:-1], 1.0 / root * to_edm_state, rtol=1e-5)
    np.testing.assert_allclose(c_noise[1:-1], 0.25 * np.log(sigma), rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(c_noise[1:-1]))


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_rectified_flow_coefficients_closed_form(sigma_data):
    c_skip, c_out, c_in, c_noise = (
        np.asarray(c, np.float64) for c in tf.coefficients(TAU_GRID, "rectified_flow", sigma_data)
    )
    for c in (c_skip, c_out, c_in, c_noise):
        assert np.all(np.isfinite(c))
    denom = np.cos(TAU_GRID) + sigma_data * np.sin(TAU_GRID)
    np.testing.assert_allclose(c_skip, sigma_data / denom, rtol=1e-5)
    np.testing.assert_allclose(c_in, sigma_data / denom, rtol=1e-5)
    np.testing.assert_allclose(c_out, -sigma_data * np.sin(TAU_GRID) / denom, rtol=1e-5, atol=1e-7)
    # c_noise is the RF time, and for sigma_d = 1 that is sigma / (1 + sigma).
    np.testing.assert_allclose(c_noise, np.asarray(tf.tau_to_rf_t(TAU_GRID, sigma_data)), rtol=1e-6)
    assert c_noise[0] == 0.0 and abs(c_noise[-1] - 1.0) < 1e-6
    if sigma_data == 1.0:
        sigma = np.tan(INTERIOR)
        np.testing.assert_allclose(c_noise[1:-1], sigma / (1 + sigma), rtol=1e-5)


def test_unknown_scaling_raises():
    with pytest.raises(ValueError, match="scaling"):
        tf.coefficients(0.3, "vp")


@pytest.mark.parametrize("sigma_data", [1.0, 0.5, 2.0])
def test_conversions_round_trip(sigma_data):
    tau = jnp.asarray(TAU_GRID, jnp.float32)
    np.testing.assert_allclose(tf.sigma_to_tau(tf.tau_to_sigma(tau[:-1], sigma_data), sigma_data), tau[:-1], atol=2e-6)
    np.testing.assert_allclose(tf.rf_t_to_tau(tf.tau_to_rf_t(tau, sigma_data), sigma_data), tau, atol=2e-6)
    t = jnp.linspace(0.0, 1.0, 21)
    np.testing.assert_allclose(tf.tau_to_rf_t(tf.rf_t_to_tau(t, sigma_data), sigma_data), t, atol=2e-6)
    assert float(tf.sigma_to_tau(jnp.inf, sigma_data)) == pytest.approx(math.pi / 2)
    assert float(tf.rf_t_to_tau(1.0, sigma_data)) == pytest.approx(math.pi / 2)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_states_of_the_three_parameterisations_agree(sigma_data):
    """x_tau relates to the EDM state x0 + sigma eps and the RF state (1-t) x0 + t eps as docs/algorithm.md §1 says."""
    k0, k1 = jax.random.split(jax.random.key(0))
    x0, eps = jax.random.normal(k0, (5, 3)), jax.random.normal(k1, (5, 3))
    tau = jnp.asarray(INTERIOR[::8], jnp.float32)[:, None]
    x_tau = tf.add_noise(x0[None], eps[None], tau[..., None], sigma_data)
    expected = np.cos(tau)[..., None] * x0 / sigma_data + np.sin(tau)[..., None] * eps
    np.testing.assert_allclose(x_tau, expected, atol=1e-6)
    sigma = tf.tau_to_sigma(tau, sigma_data)[..., None]
    np.testing.assert_allclose(sigma_data / jnp.cos(tau)[..., None] * x_tau, x0 + sigma * eps, rtol=1e-4, atol=1e-4)
    t = tf.tau_to_rf_t(tau, sigma_data)[..., None]
    x_rf = x_tau * sigma_data / (jnp.cos(tau) + sigma_data * jnp.sin(tau))[..., None]
    np.testing.assert_allclose(x_rf, (1 - t) * x0 + t * eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_oracle_networks_give_back_x0_at_every_tau(sigma_data):
    k0, k1 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k0, (TAU_GRID.size, 4)) * sigma_data
    eps = jax.random.normal(k1, (TAU_GRID.size, 4))
    tau = tf.expand_tau(jnp.asarray(TAU_GRID, jnp.float32), 2)
    x_tau = tf.add_noise(x0, eps, tau, sigma_data)

    # Rectified flow: the true velocity of x_RF = (1-t) x0 + t eps.
    x0_rf = tf.x0_from_output(x_tau, eps - x0, tau, "rectified_flow", sigma_data)
    np.testing.assert_allclose(x0_rf, x0, atol=2e-5)

    # EDM: the net output F with D = c_skip x_edm + c_out F = x0. Written in TrigFlow terms (valid at both ends),
    # it must agree with F from EDM preconditioning on the interior.
    f_edm = jnp.sin(tau) * x0 / sigma_data - jnp.cos(tau) * eps
    sigma = sigma_data * np.tan(INTERIOR)[:, None]
    x_edm = np.asarray(x0)[1:-1] + sigma * np.asarray(eps)[1:-1]
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
    np.testing.assert_allclose(f_edm[1:-1], (np.asarray(x0)[1:-1] - c_skip * x_edm) / c_out, rtol=1e-3, atol=1e-3)
    x0_edm = tf.x0_from_output(x_tau, f_edm, tau, "edm", sigma_data)
    np.testing.assert_allclose(x0_edm, x0, atol=2e-5)


def test_expand_tau_shapes():
    assert tf.expand_tau(jnp.zeros(3), 5).shape == (3, 1, 1, 1, 1)
    assert tf.expand_tau(jnp.zeros((3, 2)), 3).shape == (3, 2, 1)
    with pytest.raises(ValueError, match="tau"):
        tf.expand_tau(jnp.zeros((3, 2)), 1)


def test_sample_tau_shifted_uniform():
    key = jax.random.key(2)
    tau = tf.sample_tau(key, (20000, 3), shift=5.0)
    assert tau.shape == (20000, 3) and tau.dtype == jnp.float32
    # One tau per sample, shared by all frames.
    np.testing.assert_array_equal(tau, np.broadcast_to(tau[:, :1], tau.shape))
    assert float(tau.min()) > 0.0 and float(tau.max()) < math.pi / 2
    np.testing.assert_array_equal(tf.sample_tau(key, (20000, 3)), tau)  # same key, same draw
    # Undo the shift: u = t / (s - (s-1) t) must be U(0,1).
    t = np.tan(np.asarray(tau[:, 0], np.float64))
    t = t / (1 + t)
    u = np.sort(t / (5.0 - 4.0 * t))
    assert np.max(np.abs(u - (np.arange(u.size) + 0.5) / u.size)) < 0.015  # Kolmogorov-Smirnov, p ~ 1e-3
    assert tf.sample_tau(key, (7,)).shape == (7,)


def test_sample_tau_stays_in_open_interval_at_extreme_shifts():
    key = jax.random.key(3)
    high = tf.sample_tau(key, (1000,), shift=1e30)  # pushes every t to 1
    low = tf.sample_tau(key, (1000,), shift=1e-30)  # pushes every t to 0
    assert float(high.max()) < np.float32(math.pi / 2) and float(high.min()) > 1.5
    assert float(low.min()) >= np.float32(1e-6)
    assert np.all(np.isfinite(1.0 / np.sin(np.asarray(low, np.float64)) ** 2))


def test_sample_tau_lognormal():
    tau = tf.sample_tau_lognormal(jax.random.key(4), (20000, 2), p_mean=-0.8, p_std=1.6)
    np.testing.assert_array_equal(tau, np.broadcast_to(tau[:, :1], tau.shape))
    log_sigma = np.log(np.tan(np.asarray(tau[:, 0], np.float64)))
    assert abs(log_sigma.mean() + 0.8) < 0.05 and abs(log_sigma.std() - 1.6) < 0.05
    assert float(tau.min()) > 0.0 and float(tau.max()) < math.pi / 2


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_c_noise_at_float32_half_pi_is_the_float64_reference(sigma_data):
    """float32(pi/2) > pi/2: float32 tan is negative there; the reference (float64) has tan = 1.633e16."""
    tau = jnp.float32(math.pi / 2)
    assert float(jnp.tan(tau)) < 0  # why the guard exists
    expected = 0.25 * math.log(sigma_data * math.tan(math.pi / 2))  # 9.333 for sigma_d = 1
    c_noise = jax.jit(lambda t: tf.coefficients(t, "edm", sigma_data)[3])(jnp.full((3,), tau))
    np.testing.assert_allclose(np.asarray(c_noise), expected, rtol=1e-6)
    # Just below pi/2 the ordinary formula is kept, and the tau-gradient is finite up to and at pi/2.
    below = np.nextafter(np.float32(math.pi / 2), np.float32(0))
    np.testing.assert_allclose(
        float(tf.coefficients(below, "edm", sigma_data)[3]),
        0.25 * math.log(sigma_data * math.tan(float(below))),
        rtol=1e-5,
    )
    grad = jax.grad(lambda t: jnp.sum(tf.coefficients(t, "edm", sigma_data)[3]))(jnp.asarray(TAU_GRID[1:], jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))
