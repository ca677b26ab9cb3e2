"""TrigFlow time, noising and network preconditioning (docs/algorithm.md §1-2).

TrigFlow state: x_tau = cos(tau) * x0 / sigma_d + sin(tau) * eps, tau in [0, pi/2] (0 clean, pi/2 pure noise).
EDM sigma = sigma_d * tan(tau); rectified-flow (RF) time t = sigma_d sin / (cos + sigma_d sin).
"""

import math

import jax
import jax.numpy as jnp

SCALINGS = ("edm", "rectified_flow")
# Guard band that keeps sampled tau inside the open interval (0, pi/2): 1/sin^2(tau) and log(tan tau) stay finite.
TAU_MIN = 1e-6
TAU_MAX = math.pi / 2 - 1e-6
# tan(pi/2) in float64 (the reference's precision). float32(pi/2) lies just above pi/2, where float32 tan is
# about -2.3e7 and ln(tan) is NaN; the EDM c_noise uses this value there instead (docs/algorithm.md §13).
TAN_HALF_PI_F64 = math.tan(math.pi / 2)  # 1.633e16


def tau_to_sigma(tau, sigma_data=1.0):
    """EDM noise level sigma = sigma_d * tan(tau)."""
    return sigma_data * jnp.tan(tau)


def sigma_to_tau(sigma, sigma_data=1.0):
    """Inverse of `tau_to_sigma`; sigma=inf maps to pi/2."""
    return jnp.arctan2(sigma, sigma_data)


def tau_to_rf_t(tau, sigma_data=1.0):
    """RF time t = sigma_d sin(tau) / (cos(tau) + sigma_d sin(tau)) in [0, 1] (= sigma/(1+sigma) for sigma_d=1)."""
    s = sigma_data * jnp.sin(tau)
    return s / (jnp.cos(tau) + s)


def rf_t_to_tau(t, sigma_data=1.0):
    """Inverse of `tau_to_rf_t`: tan(tau) = t / (sigma_d (1 - t)); t=1 maps to pi/2."""
    return jnp.arctan2(t, sigma_data * (1.0 - t))


def coefficients(tau, scaling, sigma_data=1.0):
    """Preconditioning on TrigFlow time: net input c_in*x_tau, net time c_noise, x0 = c_skip*x_tau + c_out*net_out.

    docs/algorithm.md §1. scaling="edm": the net is an EDM denoiser, c_noise = ln(sigma)/4 (-inf at tau = 0; at
    tau >= float32(pi/2) it is ln(sigma_d * 1.633e16)/4, the float64 reference value, not NaN, §13).
    scaling="rectified_flow": the net predicts the RF velocity eps - x0 at RF time c_noise = t in [0, 1].
    """
    cos, sin = jnp.cos(tau), jnp.sin(tau)
    if scaling == "edm":
        c_skip = sigma_data * cos
        c_out = sigma_data * sin
        c_in = jnp.ones_like(cos)
        at_noise_end = jnp.asarray(tau) >= jnp.float32(math.pi / 2)
        # Clamp tau before tan so the unused branch has no NaN either (keeps gradients w.r.t. tau clean).
        tan = jnp.where(at_noise_end, TAN_HALF_PI_F64, jnp.tan(jnp.where(at_noise_end, 1.0, tau)))
        c_noise = 0.25 * jnp.log(sigma_data * tan)
    elif scaling == "rectified_flow":
        denom = cos + sigma_data * sin
        c_skip = sigma_data / denom
        c_out = -sigma_data * sin / denom
        c_in = sigma_data / denom
        c_noise = sigma_data * sin / denom
    else:
        raise ValueError(f"unknown scaling {scaling!r}; use one of {SCALINGS}")
    return c_skip, c_out, c_in, c_noise


def add_noise(x0, eps, tau, sigma_data=1.0):
    """x_tau = cos(tau) x0 / sigma_d + sin(tau) eps; `tau` must already broadcast against x0 (see `expand_tau`)."""
    return jnp.cos(tau) * x0 / sigma_data + jnp.sin(tau) * eps


def x0_from_output(x_tau, net_out, tau, scaling, sigma_data=1.0):
    """Clean-sample estimate from a raw network output; `tau` broadcastable to x_tau."""
    c_skip, c_out, _, _ = coefficients(tau, scaling, sigma_data)
    return c_skip * x_tau + c_out * net_out


def expand_tau(tau_b, ndim):
    """Append singleton axes so that tau of shape (B,) (or (B,T)) broadcasts against an `ndim`-dim array."""
    tau_b = jnp.asarray(tau_b)
    if tau_b.ndim > ndim:
        raise ValueError(f"tau has {tau_b.ndim} dims but the target has only {ndim}; pass one tau per sample")
    return tau_b.reshape(tau_b.shape + (1,) * (ndim - tau_b.ndim))


def _per_sample(tau_b, shape):
    """Broadcast one tau per sample, shape (B,), over the remaining axes of `shape` (e.g. frames)."""
    return jnp.broadcast_to(expand_tau(tau_b, len(shape)), shape)


def _check_shape(shape):
    shape = tuple(shape)
    if len(shape) < 1:
        raise ValueError(f"shape must start with the batch axis, e.g. (B,) or (B, T); got {shape}")
    return shape


def sample_tau(key, shape, shift=5.0):
    """Shifted-uniform TrigFlow time (docs/algorithm.md §2), one tau per sample broadcast over `shape[1:]` (frames).

    u ~ U(0,1); t = shift*u / (1 + (shift-1) u); tau = arctan(t / (1-t)), clamped into [TAU_MIN, TAU_MAX].
    """
    shape = _check_shape(shape)
    u = jax.random.uniform(key, shape[:1], dtype=jnp.float32)
    t = shift * u / (1.0 + (shift - 1.0) * u)
    tau_b = jnp.clip(jnp.arctan2(t, 1.0 - t), TAU_MIN, TAU_MAX)
    return _per_sample(tau_b, shape)


def sample_tau_lognormal(key, shape, p_mean=-0.8, p_std=1.6, sigma_data=1.0):
    """EDM log-normal alternative: ln(sigma) ~ N(p_mean, p_std^2), tau = arctan(sigma / sigma_d), per sample."""
    shape = _check_shape(shape)
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(key, shape[:1], dtype=jnp.float32))
    tau_b = jnp.clip(sigma_to_tau(sigma, sigma_data), TAU_MIN, TAU_MAX)
    return _per_sample(tau_b, shape)
