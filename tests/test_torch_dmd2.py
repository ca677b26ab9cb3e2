"""benchmarks/torch_dmd2.py (the PyTorch speed baseline) computes what trigflow_distill computes, so the step-speed
benchmark compares like with like: same schedule, coefficients, losses, denoiser, backward simulation, DMD and
critic losses and gradients on the same inputs and draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.core import losses, optim, sampling, trigflow
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit

torch = pytest.importorskip("torch")
import torch_dmd2 as td  # noqa: E402  (benchmarks/ is on the pytest pythonpath; it imports torch)

pytestmark = pytest.mark.torch

T = torch.from_numpy


def test_schedules_coefficients_optimizer_constants():
    np.testing.assert_allclose(td.student_taus(4, 5.0), sampling.student_schedule(4, 5.0), rtol=1e-12)
    np.testing.assert_allclose(td.shifted_times(35, 5.0), sampling.shifted_rf_times(35, 5.0), rtol=1e-12)
    tau = np.linspace(0.01, 1.55, 7).astype(np.float32)
    for scaling in ("rectified_flow", "edm"):
        for a, b in zip(td.coefficients(T(tau), scaling, 0.5), trigflow.coefficients(tau, scaling, 0.5)):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-5)
    for n in (0, 3, 10, 5000, 500000):
        assert td.lr_multiplier(n, 10, 400000) == pytest.approx(float(optim.lr_multiplier(n, 10, 400000)), rel=1e-6)
        assert td.ema_beta(n, td.Hparams().ema_gamma) == pytest.approx(float(optim.ema_beta(n)), rel=1e-6)
    assert td.Hparams().ema_gamma == pytest.approx(optim.ema_gamma(0.1), rel=1e-12)
    taus = td.sample_tau(torch.Generator().manual_seed(0), 4096).numpy()
    assert taus.min() >= trigflow.TAU_MIN and taus.max() <= trigflow.TAU_MAX
    # same distribution as trigflow.sample_tau: the RF time t = tan/(1+tan) has CDF u(t) = t / (5 - 4t)
    t = np.tan(taus) / (1 + np.tan(taus))
    assert abs(np.mean(t / (5 - 4 * t)) - 0.5) < 0.02


def test_losses_values_and_gradients():
    rng = np.random.default_rng(0)
    shape = (4, 3, 2, 4, 4)
    g_x0, fake, teacher = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    fake[2, 0, 0, 0, 0] = np.nan  # this sample must contribute 0 and no gradient
    tau = np.array([0.0, 0.3, 1.0, math.pi / 2], np.float32)  # tau = 0 hits the 1/sin^2 guard

    (want, aux), want_grad = jax.value_and_grad(losses.dmd_loss, has_aux=True)(g_x0, fake, teacher)
    g = T(g_x0).requires_grad_(True)
    got, got_aux = td.dmd_loss(g, T(fake), T(teacher))
    got.backward()
    assert np.isfinite(got.item()) and got.item() == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(g.grad.numpy(), want_grad, rtol=1e-5, atol=1e-7)
    assert np.all(g.grad.numpy()[2] == 0)
    for k in ("lambda_b", "loss_b", "nan_b", "grad_norm_b"):
        np.testing.assert_allclose(got_aux[k].detach().numpy(), aux[k], rtol=1e-5, err_msg=k)

    (want, _), want_grad = jax.value_and_grad(losses.critic_loss, argnums=1, has_aux=True)(g_x0, teacher, tau)
    f = T(teacher).requires_grad_(True)
    got, _ = td.critic_loss(T(g_x0), f, T(tau))
    got.backward()
    assert np.isfinite(got.item()) and got.item() == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(f.grad.numpy(), want_grad, rtol=1e-5)


@pytest.fixture(scope="module")
def nets():
    """A 1-block tiny Cosmos DiT: teacher params (all leaves non-trivial) and a different critic."""
    config = cosmos_dit.get_preset("tiny", num_blocks=1)

    def params(seed):  # numpy draws (fast), every leaf random: kernels N(0, 1/(4 fan_in)), norm scales near 1
        rng = np.random.default_rng(seed)

        def leaf(path, shape):
            if path[-1].key == "scale":
                return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            fan_in = shape[-2] if len(shape) > 1 else 100
            return (0.5 * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

        return jax.tree_util.tree_map_with_path(
            leaf, cosmos_dit.param_shapes(config), is_leaf=lambda s: isinstance(s, tuple)
        )

    teacher = params(0)
    critic = {k: v for k, v in params(1).items() if k != "crossattn_proj"}
    return config, teacher, critic


def test_denoiser_simulation_and_update_losses_match(nets):
    config, teacher, critic = nets
    net = {k: v for k, v in teacher.items() if k != "crossattn_proj"}
    dmd = td.DMD2(config, teacher)
    dmd.critic.load_state_dict(td.build_model(config, critic).state_dict())

    rng = np.random.default_rng(1)
    b, shape = 2, (2, 16, 2, 8, 8)
    latents = rng.standard_normal(shape).astype(np.float32)
    text = rng.standard_normal((b, 5, 96)).astype(np.float32)
    num_cond = np.array([0, 1], np.int32)
    eps_g, eps_d = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    tau_d = np.array([0.4, 1.2], np.float32)

    cond = td.make_cond(T(latents), T(text), T(num_cond).long(), dmd.text_proj)
    context = cosmos_dit.project_text(teacher["crossattn_proj"], jnp.asarray(text))
    uncond = cosmos_dit.project_text(teacher["crossattn_proj"], jnp.zeros_like(text))
    np.testing.assert_allclose(cond.context.numpy(), context, rtol=1e-4, atol=1e-5)
    mask = video2world.cond_mask(jnp.asarray(num_cond), shape)
    np.testing.assert_array_equal(cond.mask.numpy(), mask)
    taus = sampling.student_schedule(4)

    def x0_fn(ctx):
        return lambda p, x, tau_b: video2world.denoise(config, p, x, tau_b, ctx, latents, mask)

    def jax_student_loss(student, n):
        g_x0 = sampling.backward_simulation(x0_fn(context), student, eps_g, n, taus, with_grad=True)
        x_d = trigflow.add_noise(jax.lax.stop_gradient(g_x0), eps_d, trigflow.expand_tau(tau_d, 5))
        x0_t = losses.cfg_x0(x0_fn(context)(net, x_d, tau_d), x0_fn(uncond)(net, x_d, tau_d), 4.0)
        return losses.dmd_loss(g_x0, x0_fn(context)(critic, x_d, tau_d), x0_t)[0]

    def jax_critic_loss(critic_p, n):
        g_x0 = sampling.backward_simulation(x0_fn(context), net, eps_g, n, taus, with_grad=False)
        x_d = trigflow.add_noise(g_x0, eps_d, trigflow.expand_tau(tau_d, 5))
        return losses.critic_loss(g_x0, x0_fn(context)(critic_p, x_d, tau_d), tau_d)[0]

    n = 2
    want_s, grads_s = jax.jit(jax.value_and_grad(jax_student_loss), static_argnums=1)(net, n)
    got_s, _ = dmd.student_loss(cond, n, T(eps_g), T(tau_d), T(eps_d))
    got_s.backward()
    want_c, grads_c = jax.jit(jax.value_and_grad(jax_critic_loss), static_argnums=1)(critic, n + 1)
    got_c, _ = dmd.critic_loss(cond, n + 1, T(eps_g), T(tau_d), T(eps_d))
    got_c.backward()

    assert float(got_s) == pytest.approx(float(want_s), rel=2e-3)
    assert float(got_c) == pytest.approx(float(want_c), rel=2e-3)
    for model, grads in ((dmd.student, grads_s), (dmd.critic, grads_c)):
        torch_grads = dict(model.named_parameters())
        for name, jax_leaf in (
            ("proj_out.weight", grads["final_layer"]["linear"]["kernel"]),
            ("transformer_blocks.0.attn1.to_q.weight", grads["blocks"]["self_attn"]["q_proj"]["kernel"][0]),
        ):
            got = torch_grads[name].grad.numpy().T
            np.testing.assert_allclose(got, jax_leaf, rtol=0, atol=2e-3 * np.abs(jax_leaf).max(), err_msg=name)
    assert all(p.grad is None for p in dmd.teacher.parameters())
