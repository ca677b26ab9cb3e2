"""Student schedule and sampler, backward simulation, CFG teacher sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.core import sampling
from trigflow_distill.core.trigflow import tau_to_rf_t

SCHEDULE_4 = np.array([math.pi / 2, math.atan(15.0), math.atan(5.0), math.atan(5.0 / 3.0)])


def test_student_schedule_values():
    np.testing.assert_allclose(sampling.student_schedule(4, 5.0), SCHEDULE_4, rtol=1e-12)
    # The same schedule is RF t = [1, .75, .5, .25] after shift 5.
    t = np.array([1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(tau_to_rf_t(SCHEDULE_4.astype(np.float32)), 5 * t / (1 + 4 * t), rtol=1e-6)
    np.testing.assert_allclose(sampling.student_schedule(1), [math.pi / 2])
    with pytest.raises(ValueError, match="num_steps"):
        sampling.student_schedule(0)


@pytest.mark.parametrize("num_steps,sigma_data", [(1, 1.0), (2, 1.0), (4, 1.0), (4, 0.5)])
def test_student_sampler_calls_denoiser_once_per_tau(num_steps, sigma_data):
    taus = sampling.student_schedule(num_steps)
    eps = jax.random.normal(jax.random.key(0), (3, 2, 5))
    calls = []

    def x0_fn(x, tau_b):
        calls.append((np.asarray(x), np.asarray(tau_b)))
        return 0.5 * x + tau_b[:, None, None]

    out = sampling.sample_student(x0_fn, eps, taus, sigma_data=sigma_data)
    assert len(calls) == num_steps
    x = np.asarray(eps, np.float64)
    for j, (x_seen, tau_seen) in enumerate(calls):
        np.testing.assert_allclose(tau_seen, np.full(3, taus[j]), rtol=1e-7)
        np.testing.assert_allclose(x_seen, x, rtol=1e-5, atol=1e-6)
        x0 = 0.5 * x + taus[j]
        if j + 1 < num_steps:  # re-noise with the same initial noise
            x = np.cos(taus[j + 1]) * x0 / sigma_data + np.sin(taus[j + 1]) * np.asarray(eps)
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-6)


def _per_step_denoiser(taus):
    """x0 = p[j] * x + q[j] with j the schedule index of tau: one parameter pair per step."""
    taus = jnp.asarray(taus, jnp.float32)

    def x0_fn(params, x, tau_b):
        onehot = jax.nn.one_hot(jnp.argmin(jnp.abs(taus[None, :] - tau_b[:, None]), axis=1), taus.size)
        p, q = onehot @ params["p"], onehot @ params["q"]
        return p[:, None] * x + q[:, None]

    return x0_fn


def test_backward_simulation_value_and_gradient_only_through_last_step():
    taus = sampling.student_schedule(4)
    x0_fn = _per_step_denoiser(taus)
    params = {"p": jnp.array([0.9, 0.8, 0.7, 0.6]), "q": jnp.array([0.1, -0.2, 0.3, -0.4])}
    eps = jax.random.normal(jax.random.key(1), (4, 3))
    traces = []

    @jax.jit
    def loss_and_grad(params, n):
        traces.append(None)

        def loss(params):
            return jnp.sum(sampling.backward_simulation(x0_fn, params, eps, n, taus) ** 2)

        return jax.value_and_grad(loss)(params)

    for n in range(1, 5):
        value, grads = loss_and_grad(params, jnp.int32(n))
        prefix = sampling.sample_student(lambda x, t: x0_fn(params, x, t), eps, taus[:n])
        np.testing.assert_allclose(value, jnp.sum(prefix**2), rtol=1e-5)
        # Last step: G = p x_n + q, so dL/dp = sum 2 G x_n and dL/dq = sum 2 G, all from step n alone.
        x_n = eps
        if n > 1:
            x0_prev = sampling.sample_student(lambda x, t: x0_fn(params, x, t), eps, taus[: n - 1])
            x_n = jnp.cos(taus[n - 1]) * x0_prev + jnp.sin(taus[n - 1]) * eps
        for name, expected in (("p", jnp.sum(2 * prefix * x_n)), ("q", jnp.sum(2 * prefix))):
            g = np.asarray(grads[name])
            assert np.all(g[: n - 1] == 0.0), (n, name, g)  # exactly zero for the earlier steps
            assert np.all(g[n:] == 0.0)
            np.testing.assert_allclose(g[n - 1], expected, rtol=1e-5)
    assert len(traces) == 1  # one compiled function for every n


def test_backward_simulation_without_gradient_and_with_differentiated_closure():
    taus = sampling.student_schedule(4)
    x0_fn = _per_step_denoiser(taus)
    params = {"p": jnp.full(4, 0.8), "q": jnp.zeros(4)}
    eps = jax.random.normal(jax.random.key(2), (2, 3))
    n = jnp.int32(3)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(sampling.backward_simulation(x0_fn, p, eps, n, taus, with_grad=False))))(
        params
    )
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))

    # A conditioning value that x0_fn closes over and that is itself differentiated must not break the loop.
    def through_context(ctx):
        fn = lambda p, x, t: x0_fn(p, x, t) + ctx
        return jnp.sum(sampling.backward_simulation(fn, params, eps, n, taus))

    assert float(jax.jit(jax.grad(through_context))(jnp.float32(0.5))) == pytest.approx(eps.size)


def test_draw_num_steps():
    keys = jax.random.split(jax.random.key(3), 400)
    draws = np.asarray(jax.vmap(sampling.draw_num_steps)(keys))
    assert draws.dtype == np.int32
    assert set(draws.tolist()) == {1, 2, 3, 4}
    assert np.all(np.abs(np.bincount(draws)[1:] / draws.size - 0.25) < 0.08)
    for k in keys[:5]:
        assert int(sampling.draw_num_steps(k)) == int(sampling.draw_num_steps(k))
    assert set(np.asarray(jax.vmap(lambda k: sampling.draw_num_steps(k, 2))(keys)).tolist()) == {1, 2}


def _gaussian_x0_fn(mean, var, sigma_data):
    """Exact TrigFlow denoiser for data N(mean, var I)."""

    def x0_fn(x_tau, tau_b):
        a = jnp.cos(tau_b)[:, None] / sigma_data
        b2 = jnp.sin(tau_b)[:, None] ** 2
        return mean + a * var * (x_tau - a * mean) / (a**2 * var + b2)

    return x0_fn


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_teacher_sampler_follows_the_exact_flow_of_gaussian_data(sigma_data):
    """For data N(m, v) the RF probability-flow ODE maps eps to m + sqrt(v) eps; fine Euler must land there."""
    mean, var = jnp.array([0.7, -1.2]), 0.3
    eps = jax.random.normal(jax.random.key(4), (64, 2))
    x0_fn = _gaussian_x0_fn(mean, var, sigma_data)
    exact = mean + math.sqrt(var) * eps
    errors = []
    for num_steps in (35, 350):  # Euler is first order: 10x the steps, ~10x smaller error
        out = jax.jit(
            lambda e, k=num_steps: sampling.sample_teacher_cfg(
                x0_fn, None, e, None, k, shift=1.0, sigma_data=sigma_data
            )
        )(eps)
        errors.append(float(jnp.max(jnp.abs(out - exact))))
    assert errors[1] < 0.01 and errors[1] < errors[0] / 6, errors
    shifted = sampling.sample_teacher_cfg(x0_fn, None, eps, 1.0, num_steps=350, sigma_data=sigma_data)
    np.testing.assert_allclose(shifted, exact, atol=0.03)


def test_teacher_sampler_cfg_and_euler_against_numpy():
    """Numpy float64 Euler in RF time (written on eps-prediction) with guided x0, for a non-trivial denoiser."""
    eps = np.asarray(jax.random.normal(jax.random.key(5), (8, 3)), np.float64)

    def cond(x, tau):
        return 0.6 * x + 0.3 * (jnp if isinstance(tau, jax.Array) else np).sin(3 * tau)[:, None]

    def uncond(x, tau):
        return 0.2 * x - 0.1

    guidance, steps, shift = 3.0, 7, 5.0
    t = np.linspace(1, 0, steps + 1)
    t = shift * t / (1 + (shift - 1) * t)
    x_rf = eps.copy()
    for i in range(steps):
        tau = np.full(8, np.arctan2(t[i], 1 - t[i]))
        x_tau = x_rf * (np.cos(tau) + np.sin(tau))[:, None]
        x0 = uncond(x_tau, tau) + guidance * (cond(x_tau, tau) - uncond(x_tau, tau))
        eps_hat = (x_rf - (1 - t[i]) * x0) / t[i]
        x_rf = (1 - t[i + 1]) * x0 + t[i + 1] * eps_hat
    out = sampling.sample_teacher_cfg(cond, uncond, jnp.asarray(eps, jnp.float32), guidance, num_steps=steps)
    np.testing.assert_allclose(out, x_rf, rtol=1e-4, atol=1e-4)


def test_teacher_sampler_without_guidance_never_calls_uncond():
    def uncond(x, tau):
        raise AssertionError("the unconditional denoiser must not run without guidance")

    target = jnp.array([1.5, -0.5])
    eps = jax.random.normal(jax.random.key(6), (4, 2))
    for guidance in (None, 1.0, 1):
        out = sampling.sample_teacher_cfg(lambda x, t: jnp.broadcast_to(target, x.shape), uncond, eps, guidance, 5)
        np.testing.assert_allclose(out, jnp.broadcast_to(target, eps.shape), atol=1e-5)  # point mass: Euler exact


def test_fewer_student_steps_use_the_prefix_of_the_training_schedule():
    """k < 4 steps sample on the first k training times (docs/algorithm.md §13), not on a re-spaced k-step grid."""
    np.testing.assert_allclose(sampling.student_schedule(2), [math.pi / 2, math.atan(15.0)], rtol=1e-12)
    np.testing.assert_allclose(sampling.student_schedule(3), SCHEDULE_4[:3], rtol=1e-12)
    np.testing.assert_allclose(sampling.student_schedule(1), [math.pi / 2], rtol=1e-12)
    # A student trained with 8 steps samples on the 8-step grid and its prefixes.
    eight = sampling.student_schedule(8, train_steps=8)
    t = np.linspace(1, 0, 9)[:8]
    np.testing.assert_allclose(tau_to_rf_t(eight.astype(np.float32)), 5 * t / (1 + 4 * t), rtol=1e-6)
    np.testing.assert_allclose(sampling.student_schedule(2, train_steps=8), eight[:2], rtol=1e-12)
    with pytest.raises(ValueError, match="train_steps"):
        sampling.student_schedule(5)
