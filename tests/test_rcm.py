"""rCM (docs/algorithm.md §14): the JVP through the DiT, the sCM tangent identities, the update's skip logic and
determinism, the config dispatch, and (slow) rCM versus DMD2 on the analytic Gaussian-mixture teacher."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_analytic_distill as world
from trigflow_distill import methods
from trigflow_distill.core import optim, trigflow
from trigflow_distill.methods import dmd2, rcm, train_state, video2world
from trigflow_distill.models import cosmos_dit
from trigflow_distill.training import builder

import predict25_4step

NET = cosmos_dit.get_preset("tiny", num_blocks=1)
SHAPE = (2, 16, 2, 4, 4)  # (B, C, T, H, W)


def _tiny_world(attention="einsum"):
    """(net_config, params without projection, x_tau, tau_b, context, gt, mask) of a 1-block tiny DiT, fp32."""
    net = dataclasses.replace(NET, attention=attention)
    params = cosmos_dit.init_params(net, jax.random.PRNGKey(0))
    params.pop("crossattn_proj")
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], SHAPE)
    ctx = jax.random.normal(k[1], (2, 5, net.crossattn_emb_channels))
    gt = jax.random.normal(k[2], SHAPE)
    mask = video2world.cond_mask(jnp.array([0, 1]), SHAPE)  # sample 1 has a conditional frame
    return net, params, x, jnp.array([0.7, 1.2]), ctx, gt, mask


def _velocity_fn(net, params, ctx, gt, mask):
    """F(x_tau, tau_b): the TrigFlow velocity of the tiny DiT through the Video2World denoiser."""

    def f(x, tau_b):
        x0 = video2world.denoise(net, params, x, tau_b, ctx, gt, mask)
        return rcm.f_from_x0(x, x0, trigflow.expand_tau(tau_b, x.ndim))

    return f


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_dit_jvp_equals_central_finite_difference():
    """jax.jvp of F through the DiT (x and tau moving together) vs (F(p + h v) - F(p - h v)) / 2h in fp32, h = 1e-2:
    relative L2 error below 1e-3. Measured: 1.3e-4 at h = 1e-2; 1.2e-3 at h = 3e-2 (O(h^2) truncation) and 2.4e-4
    at h = 1e-3 (fp32 rounding ~1e-7/h)."""
    net, params, x, tau_b, ctx, gt, mask = _tiny_world()
    f = _velocity_fn(net, params, ctx, gt, mask)
    v_x = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
    v_tau = jnp.array([0.3, -0.5])
    _, jvp = jax.jit(lambda: jax.jvp(f, (x, tau_b), (v_x, v_tau)))()
    h = 1e-2
    fd = (f(x + h * v_x, tau_b + h * v_tau) - f(x - h * v_x, tau_b - h * v_tau)) / (2 * h)
    assert _rel(jvp, fd) < 1e-3, _rel(jvp, fd)
    x0_fn = lambda x, t: video2world.denoise(net, params, x, t, ctx, gt, mask)  # noqa: E731
    _, dx0 = jax.jvp(x0_fn, (x, tau_b), (v_x, v_tau))
    np.testing.assert_array_equal(dx0[1, :, 0], 0.0)  # the conditional frame is ground truth: no tangent


def test_forward_over_reverse_and_linearize_agree_with_jvp():
    """On the DiT: jax.linearize's tangent equals jax.jvp's; <w, J v> from jax.jvp equals <J^T w, v> from jax.grad;
    and forward-over-reverse (jax.jvp of jax.grad) equals reverse-over-reverse for the Hessian-vector product.
    fp32, relative tolerance 1e-5 (reassociation only)."""
    net, params, x, tau_b, ctx, gt, mask = _tiny_world()
    f = lambda x: _velocity_fn(net, params, ctx, gt, mask)(x, tau_b)  # noqa: E731
    k = jax.random.split(jax.random.PRNGKey(3), 2)
    v, w = (jax.random.normal(kk, SHAPE) for kk in k)
    _, jv = jax.jvp(f, (x,), (v,))
    _, lin = jax.linearize(f, x)
    np.testing.assert_allclose(lin(v), jv, rtol=1e-5, atol=1e-5)
    scalar = lambda x: jnp.vdot(w, f(x))  # noqa: E731
    np.testing.assert_allclose(jnp.vdot(w, jv), jnp.vdot(jax.grad(scalar)(x), v), rtol=1e-5)
    fwd_rev = jax.jvp(jax.grad(scalar), (x,), (v,))[1]
    rev_rev = jax.grad(lambda x: jnp.vdot(jax.grad(scalar)(x), v))(x)
    assert _rel(fwd_rev, rev_rev) < 1e-5


@pytest.mark.parametrize("jvp_attention", ["einsum", "blockwise_jvp"])
def test_blockwise_net_gets_forward_mode_attention_for_the_tangent(jvp_attention):
    """ "blockwise" attention has a custom VJP, so jax.jvp cannot enter it; the rCM tangent pass swaps in
    `jvp_attention` and gives the same F and dF as an einsum net (fp32, 1e-5). Key blocks of 3: the 8 image tokens
    are two blocks and a tail, the 5 text tokens a block and a tail, for "blockwise_jvp"'s custom JVP."""
    net, params, x, tau_b, ctx, gt, mask = _tiny_world("blockwise")
    net = dataclasses.replace(net, attention_block_size=3)
    f_block = _velocity_fn(net, params, ctx, gt, mask)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f_block, (x, tau_b), (x, tau_b))
    algo = rcm._forward_mode_algo(rcm.RcmAlgo(net_config=net, jvp_attention=jvp_attention))
    assert algo.net_config.attention == jvp_attention
    f_teacher = jax.random.normal(jax.random.PRNGKey(4), SHAPE)

    def tangent(net):
        x0_fn = lambda p, x, t: video2world.denoise(net, p, x, t, ctx, gt, mask)  # noqa: E731
        return rcm.student_f_and_tangent(x0_fn, params, x, tau_b, f_teacher)

    (f1, df1), (f2, df2) = tangent(algo.net_config), tangent(dataclasses.replace(NET, attention="einsum"))
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(df1, df2, rtol=1e-5, atol=1e-5)


# ---- the sCM tangent on closed-form worlds ------------------------------------------------------------------------
def test_tangent_vanishes_for_the_exact_consistency_function():
    """Zero-mean Gaussian data N(0, s^2): the PF-ODE keeps x_tau / sqrt(v(tau)) constant, v = cos^2 s^2 + sin^2, so the
    exact consistency function is x0 = s x_tau / sqrt(v). With that student and the exact teacher denoiser
    (cos s^2 x_tau / v), g = cos tau d/dtau(student x0 along the teacher ODE) = 0 at r = 1; a wrong student (the
    teacher itself) gets g equal to cos tau times a finite difference of its x0 along an ODE step."""
    s = 0.5
    var = lambda t: jnp.cos(t) ** 2 * s**2 + jnp.sin(t) ** 2  # noqa: E731
    consistency = lambda p, x, t: p * s * x / jnp.sqrt(var(t))[:, None]  # noqa: E731
    teacher_x0 = lambda x, t: jnp.cos(t)[:, None] * s**2 * x / var(t)[:, None]  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 3)) * 2.0
    tau_b = jnp.array([0.1, 0.5, 1.0, 1.4])
    tau = tau_b[:, None]
    f_teacher = rcm.f_from_x0(x, teacher_x0(x, tau_b), tau)
    f_sg, df = rcm.student_f_and_tangent(consistency, 1.0, x, tau_b, f_teacher)
    g = rcm.tangent_target(f_sg, f_teacher, df, x, tau, 1.0)
    assert float(jnp.abs(g).max()) < 1e-5
    # Wrong student = the teacher denoiser: g = cos tau d/dtau D(x(tau), tau) along the ODE dx/dtau = F_teacher.
    as_student = lambda p, x, t: teacher_x0(x, t)  # noqa: E731
    f_sg, df = rcm.student_f_and_tangent(as_student, 1.0, x, tau_b, f_teacher)
    g = rcm.tangent_target(f_sg, f_teacher, df, x, tau, 1.0)
    h = 1e-3
    fd = (teacher_x0(x + h * f_teacher, tau_b + h) - teacher_x0(x - h * f_teacher, tau_b - h)) / (2 * h)
    np.testing.assert_allclose(g, jnp.cos(tau) * fd, rtol=2e-3, atol=1e-4)
    # Warm-up r = 0 (NVlabs/rcm since 2026-01-08): -cos (F_θ - F_T) and the whole JVP term remain; at r = 1/2 the
    # JVP term is still whole and only the first two terms are ramped.
    g0 = rcm.tangent_target(f_sg + 1.0, f_teacher, df, x, tau, 0.0)
    np.testing.assert_allclose(g0, -jnp.cos(tau) * (f_sg + 1.0 - f_teacher) - df, rtol=1e-6, atol=1e-7)
    cos, sin = jnp.cos(tau), jnp.sin(tau)
    g_half = rcm.tangent_target(f_sg + 1.0, f_teacher, df, x, tau, 0.5)
    expected = -cos * jnp.sqrt(1 - 0.25 * sin**2) * (f_sg + 1.0 - f_teacher) - 0.5 * cos * sin * x - df
    np.testing.assert_allclose(g_half, expected, rtol=1e-6, atol=1e-7)


def test_scm_loss_value_gradient_and_nan_masking():
    """Value ||ĝ||^2 per sample, gradient -2ĝ w.r.t. F_θ with ĝ = g/(||g|| + 0.1); a non-finite sample gets loss 0
    and gradient 0 while the others are untouched."""
    k = jax.random.split(jax.random.PRNGKey(6), 2)
    f, g = (jax.random.normal(kk, (3, 4, 5)) for kk in k)
    g = g.at[2].multiply(1e-3)  # a small tangent: the + 0.1 matters
    g_hat = g / (jnp.sqrt(jnp.sum(g**2, axis=(1, 2)))[:, None, None] + 0.1)
    loss_b, aux = rcm.scm_loss(f, f, g)
    np.testing.assert_allclose(loss_b, jnp.sum(g_hat**2, axis=(1, 2)), rtol=1e-6)
    grad = jax.grad(lambda f: jnp.sum(rcm.scm_loss(f, f, g)[0]))(f)
    np.testing.assert_allclose(grad, -2 * g_hat, rtol=1e-5, atol=1e-7)
    assert not np.any(aux["nan_b"])

    g_bad = g.at[1, 0, 0].set(jnp.nan)
    loss_b, aux = rcm.scm_loss(f, f, g_bad)
    grad = jax.grad(lambda f: jnp.sum(rcm.scm_loss(f, f, g_bad)[0]))(f)
    np.testing.assert_array_equal(aux["nan_b"], [False, True, False])
    assert float(loss_b[1]) == 0.0 and np.all(np.asarray(grad[1]) == 0.0) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(np.asarray(grad)[[0, 2]], -2 * np.asarray(g_hat)[[0, 2]], rtol=1e-5, atol=1e-7)


def test_scm_time_distribution():
    """ln(sigma) ~ N(p_mean + ln sqrt(T), p_std^2) for (B,C,T,H,W) latents (the reference's video noise multiplier),
    N(p_mean, p_std^2) for other shapes; tau = arctan(sigma / sigma_d)."""
    key = jax.random.PRNGKey(7)
    for shape, shift in (((20000, 16, 24, 2, 2), 0.5 * math.log(24)), ((20000, 2), 0.0)):
        log_sigma = np.log(np.tan(np.asarray(rcm.sample_tau_scm(key, shape), np.float64)))
        assert abs(log_sigma.mean() - (-0.8 + shift)) < 0.05 and abs(log_sigma.std() - 1.6) < 0.05


# ---- the update: alternation, skip logic, determinism ---------------------------------------------------------------
def gmm_data(key, label_b):
    """Real samples of the analytic world's class-conditional mixture, (B, 2): what batch["latents"] holds there."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(world.WEIGHTS, jnp.float32)[label_b]))
    means = jnp.asarray(world.MEANS, jnp.float32)[comp]
    return means + world.STD * jax.random.normal(k_noise, (label_b.shape[0], 2))


def gmm_batch(key, batch_size):
    k_label, k_data = jax.random.split(key)
    label = jax.random.randint(k_label, (batch_size,), 0, world.NUM_CLASSES)
    return {"label": label, "latents": gmm_data(k_data, label)}


def gmm_algo(**overrides):
    """RcmAlgo on the analytic world (as test_analytic_distill.ALGO: n = 4, tau_D shift 1, guidance 2)."""
    kw = dict(
        net_config=None,
        sigma_data=world.SIGMA_DATA,
        guidance=world.GUIDANCE,
        num_student_steps=4,
        condition=world.gmm_condition,
        sim_steps=4,
        renoise_shift=world.TAU_SHIFT,
    )
    return rcm.RcmAlgo(**{**kw, **overrides})


# Tangent warm-up 2, then every 2nd iteration a student update.
SCHEDULE = gmm_algo(tangent_warmup=2, student_update_freq=2)


def _tiny_training(algo=SCHEDULE):
    """(critic, student update fns, teacher, batch, initial state) on the analytic world."""
    tx = optim.make_optimizer(1e-3, warmup=2)
    teacher = {"net": world.mlp_init(jax.random.PRNGKey(0)), "text_proj": None}
    state = train_state.init_state(teacher, tx, tx, seed=0)
    critic = jax.jit(functools.partial(dmd2.critic_update, algo, tx))
    student = jax.jit(functools.partial(rcm.rcm_student_update, algo, tx, optim.EMA_GAMMA))
    return critic, student, teacher, gmm_batch(jax.random.PRNGKey(1), 64), state


def _run(state, critic, student, teacher, batch, steps, algo=SCHEDULE):
    history = []
    for _ in range(steps):
        fn = student if algo.is_student_step(int(state.step)) else critic
        state, metrics = fn(state, teacher, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_rcm_schedule_counts_the_warm_up_in_student_steps():
    """NVlabs/rcm's schedule: every iteration below the warm-up W is a student (sCM) step, then 1 student step in
    student_update_freq counted from W; DMD2's own `student_warmup` does not apply. The reference's defaults (W 1000,
    freq 5) give 1000 sCM steps before the first critic step, not 200 sCM and 800 critic steps."""
    algo = rcm.RcmAlgo(net_config=None, tangent_warmup=1000, student_update_freq=5, student_warmup=1)
    students = [i for i in range(1010) if algo.is_student_step(i)]
    assert students == [*range(1000), 1000, 1005]
    assert dmd2.Algo(net_config=None, student_warmup=1).is_student_step(1000)  # DMD2: i % 5 == 0 or i < 1


def test_rcm_alternation_skip_and_exact_resume():
    critic, student, teacher, batch, state0 = _tiny_training()
    # 5 iterations: student (r = 0), student (r = 1/2), student (r = 1, the DMD2 term joins at i = W = 2), critic,
    # student (with DMD).
    state, history = _run(state0, critic, student, teacher, batch, 5)
    assert int(state.student_updates) == 4 and int(state.total_skips) == 0
    students = [h for h in history if "student/loss" in h]
    ratios = [h["student/warmup_ratio"] for h in students]
    dmd = [h["student/dmd_loss"] for h in students]
    np.testing.assert_allclose(ratios, [0.0, 0.5, 1.0, 1.0])
    assert dmd[0] == 0.0 and dmd[1] == 0.0 and dmd[2] > 0.0 and dmd[3] > 0.0
    assert all(np.isfinite(h["student/scm_loss"]) and h["student/scm_loss"] > 0 for h in students)
    assert "critic/loss" in history[3]
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.student, state0.student)
    assert max(jax.tree.leaves(moved)) > 0  # the student learned
    # Resume: 3 iterations, a host round trip of the state (what a checkpoint is), 2 more = 5 in one go, bit for bit.
    half, _ = _run(state0, critic, student, teacher, batch, 3)
    half = jax.tree.map(jnp.asarray, jax.device_get(half))
    resumed, _ = _run(half, critic, student, teacher, batch, 2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    # A non-finite batch is skipped: parameters, optimizer and EMA unchanged, the skip counted.
    bad = dict(batch, latents=batch["latents"].at[0, 0].set(jnp.nan))
    after, metrics = student(resumed, teacher, bad)
    assert float(metrics["student/skipped"]) == 1.0 and int(after.consecutive_skips) == 1
    for name in ("student", "student_opt", "student_ema", "student_updates"):
        for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(resumed, name))):
            np.testing.assert_array_equal(a, b)


# ---- rCM versus DMD2 on the analytic teacher ----------------------------------------------------------------------
# The reference weighs per-sample sums: loss_scale 100 on the sCM term (its gradient w.r.t. F_θ has norm <= 200) and
# 1 on the DMD2 term (gradient norm ~ 2 sqrt(N) for N elements per sample: ~4600 for Predict2.5 latents). With N = 2
# here, the same balance needs a DMD2 weight of ~sqrt(5.4e6 / 2) ~ 1600; 1000 is used (100 measured worse: energy
# 0.025 / 0.031 at 1000 rounds). Warm-up 100 iterations.
ANALYTIC_RCM = dict(loss_scale=100.0, dmd_weight=1000.0, tangent_warmup=100)


def train_rcm(key, rounds=world.ROUNDS):
    """world.train with rcm_student_update and batches that also carry real data (the sCM part's latents)."""
    algo = gmm_algo(**ANALYTIC_RCM)
    opt_s, opt_c = optim.make_optimizer(world.STUDENT_LR), optim.make_optimizer(world.CRITIC_LR)
    k_init, key = jax.random.split(key)
    teacher = {"net": world.mlp_init(k_init), "text_proj": None}
    state = train_state.init_state(teacher, opt_s, opt_c, seed=0)
    critic_step = functools.partial(dmd2.critic_update, algo, opt_c)
    student_step = functools.partial(rcm.rcm_student_update, algo, opt_s, optim.EMA_GAMMA)

    @jax.jit
    def run(state, keys_r5):
        def one_round(state, keys_5):  # 1 student : 4 critic updates, as world.train
            state, metrics = student_step(state, teacher, gmm_batch(keys_5[0], world.BATCH))
            state, _ = jax.lax.scan(lambda s, k: critic_step(s, teacher, gmm_batch(k, world.BATCH)), state, keys_5[1:])
            return state, metrics["student/loss"]

        return jax.lax.scan(one_round, state, keys_r5)

    state, losses = run(state, jax.random.split(key, (rounds, 5)))
    assert int(state.total_skips) == 0 and int(state.student_updates) == rounds
    assert np.all(np.isfinite(np.asarray(losses)))
    return state


@pytest.mark.slow
def test_rcm_student_at_least_as_close_to_the_teacher_as_dmd2():
    """Same teacher, rounds (1000 student + 4000 critic updates), optimizers and critic: the 4-step EMA students'
    energy distance to the 35-step guided teacher. Measured (this test's seeds): DMD2 0.0154 / 0.0193, rCM 0.0145 /
    0.0164 (classes 0 / 1); the assertion allows rCM 10% above DMD2 (sampling noise of the 2000-sample estimate)."""
    dmd2_ema = world.trained_default()[0]["ema"]
    rcm_ema = train_rcm(jax.random.key(0)).student_ema
    for cls in range(world.NUM_CLASSES):
        keys = jax.random.split(jax.random.key(1), 3)
        eps_ref, _, eps_test = (jax.random.normal(jax.random.fold_in(k, cls), (2000, 2)) for k in keys)
        ref = np.asarray(world.teacher_samples(eps_ref, cls, 35), np.float64)
        energy = {
            name: world.energy_distance(np.asarray(world.student_samples(p, eps_test, cls), np.float64), ref)
            for name, p in (("dmd2", dmd2_ema), ("rcm", rcm_ema))
        }
        print(f"class {cls} energy distance to the teacher: dmd2 {energy['dmd2']:.4f} rcm {energy['rcm']:.4f}")
        assert energy["rcm"] < world.MAX_ENERGY and energy["rcm"] <= 1.1 * energy["dmd2"], (cls, energy)


# ---- configuration and the Video2World update on the tiny DiT ----------------------------------------------------
def test_method_from_config():
    """distill.method picks the algorithm from the methods.METHODS registry: dmd2 (default) -> dmd2.Algo, rcm -> RcmAlgo
    with distill.rcm; others and
    a JVP attention without forward mode are one-line errors."""
    config = predict25_4step.get_config("tiny")
    assert type(methods.algo_from_config(config, NET)) is dmd2.Algo
    config.distill.method = "rcm"
    algo = methods.algo_from_config(config, NET)
    assert isinstance(algo, rcm.RcmAlgo) and algo.student_update_fn is rcm.rcm_student_update
    assert (algo.loss_scale, algo.dmd_weight, algo.tangent_warmup, algo.p_mean) == (100.0, 1.0, 100, -0.8)
    assert algo.guidance == config.distill.guidance
    tx = optim.make_optimizer(1e-3)
    _, student = dmd2.make_update_fns(algo, tx, tx, optim.EMA_GAMMA)
    assert student.__wrapped__.func is rcm.rcm_student_update  # the dispatch in dmd2.make_update_fns
    config.distill.rcm.jvp_attention = "blockwise_jvp"
    assert methods.algo_from_config(config, NET).jvp_attention == "blockwise_jvp"
    config.distill.rcm.jvp_attention = "blockwise"
    with pytest.raises(ValueError, match="jvp_attention"):
        methods.algo_from_config(config, NET)
    config.distill.method = "sid"
    with pytest.raises(ValueError, match="distill.method"):
        methods.algo_from_config(config, NET)


@pytest.mark.slow
def test_rcm_update_on_the_tiny_dit_with_blockwise_attention():
    """Two rCM student steps in Video2World (conditional frames, raw text) on a "blockwise" tiny DiT: the JVP pass
    runs on forward-mode attention, the first step is sCM only, the second adds DMD2; both finite and applied."""
    net = cosmos_dit.get_preset("tiny", num_blocks=1, attention="blockwise")
    teacher = builder.split_teacher(cosmos_dit.init_params(net, jax.random.PRNGKey(0)))
    algo = rcm.RcmAlgo(net_config=net, tangent_warmup=1, sim_steps=2)  # step 0 sCM only, DMD2 from step 1
    tx = optim.make_optimizer(1e-3, warmup=2)
    state = train_state.init_state(teacher, tx, tx, seed=0)
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    batch = {
        "latents": jax.random.normal(k[0], SHAPE),
        "text": jax.random.normal(k[1], (2, 5, 96)),
        "num_cond_frames": jnp.array([0, 1], jnp.int32),
    }
    student = jax.jit(functools.partial(rcm.rcm_student_update, algo, tx, optim.EMA_GAMMA))
    state, m0 = student(state, teacher, batch)
    state, m1 = student(state, teacher, batch)
    assert int(state.student_updates) == 2 and int(state.total_skips) == 0
    assert float(m0["student/dmd_loss"]) == 0.0 and float(m1["student/dmd_loss"]) > 0.0
    assert all(np.isfinite(float(m[k])) for m in (m0, m1) for k in ("student/loss", "student/grad_norm"))
