"""rCM: continuous-time consistency (sCM) regularised by DMD2, in the same TrigFlow core (docs/algorithm.md §14).

The student step adds to DMD2's generator loss (docs/algorithm.md §4, on a backward-simulated sample, the same
critic) the sCM loss of arXiv 2410.11081 on real latents: the student's PF-ODE velocity F_θ at a noised data point
is pulled along the tangent g built from the guided teacher's F and the JVP of F_θ along the teacher's ODE.
`jax.jvp` through the DiT gives that JVP directly (no hand-written JVP kernels, as PyTorch needs; the
"blockwise_jvp" attention's custom JVP only keeps the blockwise memory profile).
The critic step is `dmd2.critic_update` unchanged; state, skip logic, EMA and randomness are DMD2's.

Pure functions of the loss: `f_from_x0`, `sample_tau_scm`, `student_f_and_tangent`, `tangent_target`, `scm_loss`;
the update: `rcm_student_update` (signature of `dmd2.student_update`); configuration: `RcmAlgo`, `algo_from_config`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trigflow_distill.core import losses, trigflow
from trigflow_distill.methods import dmd2, train_state

# Attention implementations that support forward-mode autodiff. "blockwise" (custom VJP) and "splash" (Pallas) do
# not: the JVP pass swaps them for `RcmAlgo.jvp_attention` (same numbers, its own memory profile and speed;
# "blockwise_jvp" is "blockwise"'s tiles with a custom JVP).
FORWARD_MODE_ATTENTION = ("auto", "einsum", "xla", "blockwise_jvp")


@dataclasses.dataclass(frozen=True)
class RcmAlgo(dmd2.Algo):
    """dmd2.Algo plus the rCM constants (docs/algorithm.md §14; defaults = NVlabs/rcm's Wan2.1 1.3B recipe)."""

    loss_scale: float = 100.0  # weight of the per-sample sum of the sCM loss (reference `loss_scale`)
    dmd_weight: float = 1.0  # weight of the per-sample sum of the DMD2 loss (reference `loss_scale_dmd`)
    # The warm-up W (NVlabs/rcm `tangent_warmup`): iterations i < W are all student (sCM-only) steps while the
    # tangent's warm-up ratio ramps to 1; from i = W on the DMD2 term joins and the critic trains.
    tangent_warmup: int = 1000
    tangent_norm_eps: float = 0.1  # g / (||g|| + eps), per sample
    p_mean: float = -0.8  # sCM time: ln(sigma) ~ N(p_mean, p_std^2) ...
    p_std: float = 1.6
    frame_noise_scale: bool = True  # ... times sqrt(latent frames) (reference `adjust_video_noise`)
    jvp_attention: str = "einsum"  # attention of the JVP pass when the net's own has no forward mode

    def is_student_step(self, step: int) -> bool:
        """Iteration `step` is a student step iff step < W or (step - W) % student_update_freq == 0: the warm-up is
        counted in student steps (docs/algorithm.md §14); `distill.student_warmup` is DMD2's and does not apply."""
        w = self.tangent_warmup
        return step < w or (step - w) % self.student_update_freq == 0

    @property
    def student_update_fn(self):
        """The student update `dmd2.make_update_fns` uses for this algorithm."""
        return rcm_student_update


def algo_from_config(config, net_config, mesh=None, text_kind=None) -> RcmAlgo:
    """The rCM algorithm of a config: `dmd2.algo_from_config` plus config.distill.rcm (docs/algorithm.md §14)."""
    algo = dmd2.algo_from_config(config, net_config, mesh, text_kind)
    if algo.guidance_range is not None:
        raise ValueError(
            "distill.guidance_conditioned=True is for distill.method='dmd2' (docs/algorithm.md §15); rCM distills "
            "one guidance scale."
        )
    r = config.distill.rcm
    if r.jvp_attention not in FORWARD_MODE_ATTENTION or int(r.tangent_warmup) < 0:
        raise ValueError(
            f"distill.rcm.jvp_attention={r.jvp_attention!r} must be one of {FORWARD_MODE_ATTENTION} "
            f"and distill.rcm.tangent_warmup={r.tangent_warmup} must be >= 0."
        )
    fields = {f.name: getattr(algo, f.name) for f in dataclasses.fields(algo)}
    return RcmAlgo(
        **fields,
        loss_scale=float(r.loss_scale),
        dmd_weight=float(r.dmd_weight),
        tangent_warmup=int(r.tangent_warmup),
        tangent_norm_eps=float(r.tangent_norm_eps),
        p_mean=float(r.p_mean),
        p_std=float(r.p_std),
        frame_noise_scale=bool(r.frame_noise_scale),
        jvp_attention=r.jvp_attention,
    )


# ---- the sCM loss as pure functions -------------------------------------------------------------------------------
def f_from_x0(x_tau, x0, tau, sigma_data=1.0):
    """TrigFlow PF-ODE velocity F = dx_tau/dtau = (cos tau x_tau - x0/sigma_d) / sin tau; tau broadcastable."""
    return (jnp.cos(tau) * x_tau - x0 / sigma_data) / jnp.sin(tau)


def sample_tau_scm(key, shape, p_mean=-0.8, p_std=1.6, sigma_data=1.0, frame_noise_scale=True):
    """sCM training time (B,): ln(sigma) ~ N(p_mean, p_std^2), sigma times sqrt(T) for (B,C,T,H,W) video latents
    when frame_noise_scale (the reference's `adjust_video_noise`), tau = arctan(sigma/sigma_d)."""
    frames = shape[2] if frame_noise_scale and len(shape) == 5 else 1
    return trigflow.sample_tau_lognormal(key, shape[:1], p_mean + 0.5 * math.log(frames), p_std, sigma_data)


def student_f_and_tangent(x0_fn, params, x_tau, tau_b, f_teacher, sigma_data=1.0):
    """(F_θ, dF_θ) without gradient: F_θ(x_tau, tau) and its JVP along the teacher's ODE, i.e. along the tangent
    (cos tau sin tau F_teacher, cos tau sin tau) of (x_tau, tau) (sCM §5.1 JVP rearrangement); dF_θ is therefore
    cos tau sin tau dF_θ/dtau. x0_fn(params, x_tau, tau_b) -> x0 must support forward-mode autodiff."""
    params = jax.lax.stop_gradient(params)

    def f(x, t_b):
        return f_from_x0(x, x0_fn(params, x, t_b), trigflow.expand_tau(t_b, x.ndim), sigma_data)

    cs_b = jnp.cos(tau_b) * jnp.sin(tau_b)
    f_theta, df_theta = jax.jvp(f, (x_tau, tau_b), (trigflow.expand_tau(cs_b, x_tau.ndim) * f_teacher, cs_b))
    return jax.lax.stop_gradient(f_theta), jax.lax.stop_gradient(df_theta)


def tangent_target(f_theta, f_teacher, df_theta, x_tau, tau, warmup_ratio):
    """The sCM tangent g with warm-up ratio r in [0, 1], as NVlabs/rcm writes it since 2026-01-08 (r = 1 is sCM's
    -cos^2 (F_θ - F_T) - cos sin (x_tau + dF_θ/dtau)):

        g = -cos tau sqrt(1 - r^2 sin^2 tau) (F_θ - F_T) - (r cos tau sin tau x_tau + dF_θ)

    The JVP term dF_θ (from `student_f_and_tangent`) is kept whole; r ramps only the other two terms
    (docs/algorithm.md §14). tau broadcastable against x_tau."""
    cos, sin = jnp.cos(tau), jnp.sin(tau)
    return -cos * jnp.sqrt(1.0 - (warmup_ratio * sin) ** 2) * (f_theta - f_teacher) - (
        warmup_ratio * cos * sin * x_tau + df_theta
    )


def scm_loss(f_theta, f_theta_sg, g, norm_eps=0.1):
    """Per-sample sCM loss sum((F_θ - sg(F_θ) - ĝ)^2) over all but the batch axis, ĝ = g/(||g|| + norm_eps)
    (tangent normalisation, in float32; the reference uses float64). Its value is ||ĝ||^2, its gradient w.r.t. F_θ
    is -2ĝ. A sample with a non-finite g or F_θ gets loss 0 and zero gradient (its inputs are zeroed first, as in
    `losses.dmd_loss`). Returns (loss_b (B,), aux = {nan_b, g_norm_b})."""
    sg = jax.lax.stop_gradient
    axes = tuple(range(1, g.ndim))
    g = sg(g)
    nan_b = ~(jnp.all(jnp.isfinite(g), axis=axes) & jnp.all(jnp.isfinite(sg(f_theta)), axis=axes))
    bad = trigflow.expand_tau(nan_b, g.ndim)
    g, f_theta, f_theta_sg = (jnp.where(bad, jnp.zeros_like(x), x) for x in (g, f_theta, sg(f_theta_sg)))
    g_norm_b = jnp.sqrt(jnp.sum(g**2, axis=axes))
    g_hat = g / (trigflow.expand_tau(g_norm_b, g.ndim) + norm_eps)
    loss_b = jnp.sum((f_theta - f_theta_sg - g_hat) ** 2, axis=axes)
    return jnp.where(nan_b, 0.0, loss_b), {"nan_b": nan_b, "g_norm_b": g_norm_b}


def warmup_ratio(step, tangent_warmup):
    """r = min(1, step / tangent_warmup) (1 without a warm-up); every step of the warm-up is a student step, so
    `step` counts student steps there."""
    if tangent_warmup <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / tangent_warmup)


def _forward_mode_algo(algo: RcmAlgo) -> RcmAlgo:
    """algo whose network attention supports jax.jvp (see FORWARD_MODE_ATTENTION)."""
    net = algo.net_config
    if net is None or getattr(net, "attention", "auto") in FORWARD_MODE_ATTENTION:
        return algo
    return dataclasses.replace(algo, net_config=dataclasses.replace(net, attention=algo.jvp_attention))


# ---- the student update -------------------------------------------------------------------------------------------
def rcm_student_update(algo: RcmAlgo, student_tx, ema_gamma: float, state: train_state.TrainState, teacher, batch):
    """One rCM student step (docs/algorithm.md §14): loss_scale * sCM on batch["latents"] + dmd_weight * DMD2
    (§4, from state.step = tangent_warmup on), both as per-sample sums, mean over samples. Same signature, state,
    skip logic and EMA as `dmd2.student_update`."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise, k_tau, k_noise = jax.random.split(key, 6)
    cond = algo.condition(algo, k_cond, teacher, batch)
    jvp_cond = algo.condition(_forward_mode_algo(algo), k_cond, teacher, batch)  # same draws, forward-mode attention
    sd = algo.sigma_data

    # sCM on real data: x_tau from the batch's latents, the guided teacher's F, the student's F and its JVP.
    x0 = batch["latents"].astype(jnp.float32)
    tau_b = sample_tau_scm(k_tau, x0.shape, algo.p_mean, algo.p_std, sd, algo.frame_noise_scale)
    tau = trigflow.expand_tau(tau_b, x0.ndim)
    x_tau = trigflow.add_noise(x0, jax.random.normal(k_noise, x0.shape, jnp.float32), tau, sd)
    x0_teacher = dmd2.teacher_cfg_x0(algo, cond, teacher, x_tau, tau_b)
    f_teacher = jax.lax.stop_gradient(f_from_x0(x_tau, x0_teacher, tau, sd))
    f_sg, df = student_f_and_tangent(jvp_cond.x0_fn, state.student, x_tau, tau_b, f_teacher, sd)
    ratio = warmup_ratio(state.step, algo.tangent_warmup)
    g = tangent_target(f_sg, f_teacher, df, x_tau, tau, ratio)

    # DMD2 on a backward-simulated sample (docs/algorithm.md §4), from the first iteration after the warm-up.
    dmd_on = state.step >= algo.tangent_warmup
    n = dmd2.num_sim_steps(algo, k_n)
    eps_g = jax.random.normal(k_eps, cond.shape, jnp.float32)
    elements = float(np.prod(cond.shape[1:]))

    def dmd_term(student):
        g_x0 = dmd2.simulate(algo, cond.x0_fn, student, key, n, eps_g, with_grad=True)
        x_d, tau_d = dmd2.renoise(algo, k_renoise, jax.lax.stop_gradient(g_x0))
        x0_fake = cond.x0_fn(state.critic, x_d, tau_d)
        x0_t = dmd2.teacher_cfg_x0(algo, cond, teacher, x_d, tau_d)
        loss, aux = losses.dmd_loss(
            g_x0,
            jax.lax.stop_gradient(x0_fake),
            jax.lax.stop_gradient(x0_t),
            lambda_frame_chunks=algo.lambda_frame_chunks,
        )
        return elements * loss, (aux["nan_b"], jnp.mean(aux["lambda_b"]), jnp.mean(tau_d))

    def no_dmd_term(student):
        del student
        return jnp.float32(0.0), (jnp.zeros(cond.shape[:1], bool), jnp.float32(0.0), jnp.float32(0.0))

    def loss_fn(student):
        f_theta = f_from_x0(x_tau, cond.x0_fn(student, x_tau, tau_b), tau, sd)
        scm_b, scm_aux = scm_loss(f_theta, f_sg, g, algo.tangent_norm_eps)
        scm = jnp.mean(scm_b)
        dmd, dmd_aux = jax.lax.cond(dmd_on, dmd_term, no_dmd_term, student)
        return algo.loss_scale * scm + algo.dmd_weight * dmd, (scm, dmd, scm_aux, dmd_aux)

    (loss, (scm, dmd, scm_aux, (dmd_nan_b, lam, tau_d))), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.student
    )
    # Per-sample masking zeroes bad samples; a batch with no usable sample at all is a diverged student: skip it.
    ok = (
        jnp.isfinite(loss) & train_state.all_finite(grads) & ~jnp.all(scm_aux["nan_b"]) & ~(dmd_on & jnp.all(dmd_nan_b))
    )
    new_state = train_state.apply_student_step(algo, student_tx, ema_gamma, state, grads, ok)
    metrics = {
        "student/loss": loss,
        "student/scm_loss": scm,
        "student/dmd_loss": dmd,
        "student/grad_norm": optax.tree.norm(grads),
        "student/skipped": 1.0 - ok,
        "student/sim_steps": n,
        "student/tau": jnp.mean(tau_d),
        "student/scm_tau": jnp.mean(tau_b),
        "student/tangent_norm": jnp.mean(scm_aux["g_norm_b"]),
        "student/warmup_ratio": ratio,
        "student/lambda": lam,
        "student/nan_samples": jnp.sum(scm_aux["nan_b"] | dmd_nan_b),
    }
    return new_state, metrics
