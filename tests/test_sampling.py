"""Student schedule and sampler, backward simulation, CFG teacher sampler."""

import dataclasses
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


def _phi(k, z):
    """phi_k(z) of exponential integrators: phi_1 = (e^z - 1)/z, phi_{k+1} = (phi_k - 1/k!)/z."""
    p = np.expm1(z) / z
    for j in range(1, k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def _numpy_unipc(x0_fn, eps, steps, shift=5.0):
    """Multistep UniPC in float64 from the paper's update rule (Zhao et al. 2023, data prediction x_theta): predictor
    UniP-2 and corrector UniC, B(h) = e^h - 1 with the data-prediction step z = -h, order 1 at the first and last
    step; a_1 = 1/2 for UniP-2 and UniC-1, the solved R_p a = g_p / B(h) for UniC-2. Schedule of NVIDIA's inference:
    sigma = shift(linspace(0.999, 0, steps + 1)[:-1]) then 0, alpha = 1 - sigma; the net sees floor(1000 sigma)/1000
    and its x0 is re-expressed at sigma through its velocity. Written on histories, not on coefficient tables."""
    s = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    t_net = np.floor(1000 * s) / 1000
    sig = np.append(s.astype(np.float32).astype(np.float64), 0.0)
    alpha = 1 - sig
    lam = lambda i: np.log(alpha[i]) - np.log(sig[i]) if sig[i] > 0 else np.inf  # noqa: E731
    x, xs_c, ms, orders = eps.astype(np.float64), [], [], []
    for i in range(steps):
        tau = np.full(eps.shape[0], np.arctan2(t_net[i], 1 - t_net[i]))
        x_tau = x * (np.cos(tau) + np.sin(tau))[:, None]
        v = (x - x0_fn(x_tau, tau)) / t_net[i]
        m = x - sig[i] * v
        if i > 0:  # UniC-p at t_i with the previous predictor's order p, from the corrected x^c_{i-1}
            h = lam(i) - lam(i - 1)
            z = -h
            b = np.expm1(z)
            p = orders[-1]
            r = [(lam(i - 1 - k) - lam(i - 1)) / h for k in range(1, p)] + [1.0]
            d = [(ms[-1 - k] - ms[-1]) for k in range(1, p)] + [m - ms[-1]]
            if p == 1:
                a = [0.5]
            else:
                g = [z * _phi(k + 1, z) * math.factorial(k) / b for k in range(1, p + 1)]
                a = np.linalg.solve(np.array([[rk ** (k - 1) for rk in r] for k in range(1, p + 1)]), g)
            corr = sum(a[k] * d[k] / r[k] for k in range(p))
            x = sig[i] / sig[i - 1] * xs_c[-1] - alpha[i] * np.expm1(z) * ms[-1] - alpha[i] * b * corr
        xs_c.append(x)
        ms.append(m)
        p = min(2, steps - i, i + 1)
        orders.append(p)
        if sig[i + 1] == 0:
            x = m
            continue
        h = lam(i + 1) - lam(i)
        z = -h
        x = sig[i + 1] / sig[i] * x - alpha[i + 1] * np.expm1(z) * m
        if p == 2:  # UniP-2: a_1 = 1/2 on D_1 / r_1
            r1 = (lam(i - 1) - lam(i)) / h
            x = x - alpha[i + 1] * np.expm1(z) * 0.5 * (ms[-2] - m) / r1
    return x


def test_unipc_schedule_is_nvidias():
    """35 steps: RF times shift-5 of linspace(0.999, 0, 36)[:-1]; the net sees floor(1000 t)/1000 (999 -> 0.999)."""
    sigmas, net_t = sampling.unipc_rf_times(35, 5.0)
    assert sigmas.shape == (36,) and net_t.shape == (35,) and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[0], 5 * 0.999 / (1 + 4 * 0.999), rtol=1e-7)
    assert net_t[0] == 0.999 and net_t[-1] == 0.128  # 1000 * 0.12812 -> 128
    np.testing.assert_array_equal(net_t * 1000, np.floor(sigmas[:-1] * 1000))


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 35])
def test_unipc_teacher_against_numpy_paper_update_rule(steps):
    eps = np.asarray(jax.random.normal(jax.random.key(7), (8, 3)), np.float64)

    def cond(x, tau):
        return 0.6 * x + 0.3 * (jnp if isinstance(tau, jax.Array) else np).sin(3 * tau)[:, None]

    def uncond(x, tau):
        return 0.2 * x - 0.1 * (jnp if isinstance(tau, jax.Array) else np).cos(tau)[:, None]

    guidance = 3.0
    want = _numpy_unipc(lambda x, t: uncond(x, t) + guidance * (cond(x, t) - uncond(x, t)), eps, steps)
    settings = sampling.SamplerSettings(kind="teacher", steps=steps, guidance=guidance, solver="unipc")
    got = jax.jit(lambda e: sampling.sample(settings, cond, uncond, e))(jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Not the Euler sampler: the same settings with solver "euler" land elsewhere.
    euler = sampling.sample(dataclasses.replace(settings, solver="euler"), cond, uncond, jnp.asarray(eps, jnp.float32))
    assert np.abs(np.asarray(euler) - want).max() > 1e-3


def test_unipc_teacher_against_numpy_on_a_gaussian_denoiser():
    """NVIDIA's 35 steps with the exact denoiser of Gaussian data (non-linear in tau), against the numpy UniPC."""
    mean, var = jnp.array([0.7, -1.2]), 0.3
    eps = jax.random.normal(jax.random.key(4), (64, 2))
    x0_fn = _gaussian_x0_fn(mean, var, 1.0)

    def x0_np(x, tau):
        return np.asarray(x0_fn(jnp.asarray(x, jnp.float32), jnp.asarray(tau, jnp.float32)), np.float64)

    want = _numpy_unipc(x0_np, np.asarray(eps), 35)
    got = sampling.sample_teacher_unipc(x0_fn, None, eps, None, 35)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unipc_settings_are_validated():
    with pytest.raises(ValueError, match="teacher sampler"):
        sampling.SamplerSettings(kind="student", steps=4, solver="unipc")
    with pytest.raises(ValueError, match="'euler' or 'unipc'"):
        sampling.SamplerSettings(kind="teacher", steps=4, solver="heun")
    with pytest.raises(ValueError, match="time 0"):
        sampling.SamplerSettings(kind="teacher", steps=20000, solver="unipc")
    assert sampling.SamplerSettings(kind="teacher", steps=35, guidance=8.0, solver="unipc").nfe == 70


def test_unipc_teacher_matches_diffusers_unipc_scheduler():
    """diffusers' UniPCMultistepScheduler (bh2, order 2, predict_x0, flow sigmas set to NVIDIA's shifted grid) stepping
    the velocity of the same guided denoiser at the net's quantized times gives the same sample."""
    torch = pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers.scheduling_unipc_multistep")
    steps, guidance = 12, 3.0
    sigmas, net_t = sampling.unipc_rf_times(steps, 5.0)
    sched = schedulers.UniPCMultistepScheduler(
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(sigmas=sigmas[:-1].copy())
    np.testing.assert_allclose(sched.sigmas.numpy(), sigmas, rtol=1e-7)

    def cond(x, tau):
        return 0.6 * x + 0.3 * (jnp if isinstance(tau, jax.Array) else np).sin(3 * tau)[:, None]

    def uncond(x, tau):
        return 0.2 * x - 0.1

    eps = np.asarray(jax.random.normal(jax.random.key(8), (8, 3)), np.float64)
    x = torch.from_numpy(eps)
    for i, t in enumerate(sched.timesteps):
        tau = np.full(8, np.arctan2(net_t[i], 1 - net_t[i]))
        xn = x.numpy()
        x_tau = xn * (np.cos(tau) + np.sin(tau))[:, None]
        x0 = uncond(x_tau, tau) + guidance * (cond(x_tau, tau) - uncond(x_tau, tau))
        x = sched.step(torch.from_numpy((xn - x0) / net_t[i]), t, x, return_dict=False)[0]
    settings = sampling.SamplerSettings(kind="teacher", steps=steps, guidance=guidance, solver="unipc")
    got = sampling.sample(settings, cond, uncond, jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(got, x.numpy(), rtol=2e-5, atol=2e-5)
