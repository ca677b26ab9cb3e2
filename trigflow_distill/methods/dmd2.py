"""The DMD2 method in TrigFlow: the train state, the jit-able critic and student updates, student sampling.

docs/algorithm.md §2-7. The student and critic start as copies of the teacher (without its frozen text
projection); the teacher sits beside the TrainState, never in an optimizer. Every per-step random draw comes from
fold_in(state.key, state.step), so a run is a pure function of (config, data, step) and resumes exactly.
Nothing here opens files: `run.py` builds these pieces from a config, `train.py` loops over them.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from trigflow_distill.core import losses, sampling, trigflow
from trigflow_distill.core.recipe import COND_FRAME_PROBS
from trigflow_distill.methods import train_state, video2world


@dataclasses.dataclass(frozen=True)
class Algo:
    """The static (hashable) part of the algorithm that the update functions close over."""

    net_config: Any
    scaling: str = "rectified_flow"
    sigma_data: float = 1.0
    guidance: float = 4.0
    num_student_steps: int = 4
    timestep_shift: float = 5.0
    cond_frame_probs: tuple = COND_FRAME_PROBS
    replace_gt_timesteps: bool = True
    lambda_frame_chunks: int = 1  # DMD lambda per (sample, chunk of T/K latent frames); 4 = the released 2B (§13)
    ema_start: int = 0  # student updates before the power EMA starts averaging (docs/algorithm.md §6)
    mesh: Any = None  # jax Mesh the update runs on; a `seq` axis > 1 sequence-shards the networks' activations
    # (algo, key, teacher, batch) -> Conditioning; other data (e.g. the analytic test's 2-D mixture) plug in here.
    condition: Callable = video2world.condition
    sim_steps: int | None = None  # None: backward simulation from n ~ U{1..num_student_steps}; else n fixed
    # "fixed": backward simulation on the student's sampling schedule, one noise (§3); "random": NVlabs/rcm's
    # random decreasing times with fresh noise at each re-noise.
    backward_simulation: str = "fixed"
    renoise_shift: float | None = None  # time shift of the critic/teacher time tau_D; None: timestep_shift
    # (lo, hi): a guidance-conditioned student and critic, the CFG scale s ~ U[lo, hi] per sample and update
    # (docs/algorithm.md §15); None: one fixed scale, `guidance`. `guidance` is then the scale samples are drawn at.
    guidance_range: tuple | None = None
    # The update schedule (docs/algorithm.md §6): iteration i updates the student iff i % student_update_freq == 0,
    # and every iteration i < student_warmup does.
    student_update_freq: int = 5
    student_warmup: int = 1
    text_kind: str | None = None  # "raw" / "projected": what the dataset declares; None: told by the text's width

    def is_student_step(self, step: int) -> bool:
        """Whether iteration `step` is a student update (else a critic update), docs/algorithm.md §6."""
        return step % self.student_update_freq == 0 or step < self.student_warmup


def algo_from_config(config, net_config, mesh=None, text_kind=None) -> Algo:
    """The DMD2 algorithm of a config (docs/algorithm.md §4-6, §15) for the network `net_config` on `mesh`;
    `text_kind` what the dataset declares its text to be (None: told by the width)."""
    d, t = config.distill, config.teacher
    return Algo(
        net_config=net_config,
        mesh=mesh,
        text_kind=text_kind,
        student_update_freq=int(d.student_update_freq),
        student_warmup=int(d.student_warmup),
        scaling=t.scaling,
        sigma_data=float(t.sigma_data),
        guidance=float(d.guidance),
        num_student_steps=int(d.num_student_steps),
        timestep_shift=float(d.timestep_shift),
        cond_frame_probs=tuple(float(p) for p in d.cond_frame_probs),
        replace_gt_timesteps=bool(d.replace_gt_timesteps),
        lambda_frame_chunks=int(d.lambda_frame_chunks),
        backward_simulation=d.backward_simulation,
        ema_start=int(d.ema_start),
        guidance_range=tuple(float(g) for g in d.guidance_range) if d.guidance_conditioned else None,
    )


def draw_guidance(algo: Algo, key, batch_size: int):
    """The CFG scale of each sample of an update (docs/algorithm.md §15): (B,) ~ U[lo, hi] for a guidance-conditioned
    student, None for a fixed one (the networks then take no scale and the teacher uses algo.guidance)."""
    if algo.guidance_range is None:
        return None
    lo, hi = algo.guidance_range
    return jax.random.uniform(key, (batch_size,), jnp.float32, lo, hi)


def _with_guidance(x0_fn, guidance_b):
    """The student's / critic's x0_fn: `x0_fn` given the per-sample scale when there is one."""
    return x0_fn if guidance_b is None else functools.partial(x0_fn, guidance_b=guidance_b)


def teacher_cfg_x0(algo: Algo, cond: video2world.Conditioning, teacher, x_tau, tau_b, guidance_b=None):
    """The guided teacher's x0 (docs/algorithm.md §4): scale algo.guidance, or the per-sample guidance_b (§15)."""
    s = algo.guidance if guidance_b is None else trigflow.expand_tau(guidance_b, len(cond.shape))
    return losses.cfg_x0(cond.x0_fn(teacher["net"], x_tau, tau_b), cond.x0_uncond_fn(teacher["net"], x_tau, tau_b), s)


# fold_in streams of the per-sample CFG scale (§15) and of the random backward simulation's draws, apart from the
# split keys so that runs without them are unchanged
_GUIDANCE_STREAM = 4
_SIMULATION_STREAM = 5
BACKWARD_SIMULATIONS = ("fixed", "random")


def num_sim_steps(algo: Algo, key):
    if algo.sim_steps is None:
        return sampling.draw_num_steps(key, algo.num_student_steps)
    return jnp.int32(algo.sim_steps)


def _renoise_shift(algo: Algo) -> float:
    return algo.timestep_shift if algo.renoise_shift is None else algo.renoise_shift


def simulate(algo: Algo, x0_fn, params, key, n, eps_g, with_grad: bool):
    """The student's n-step sample G_x0 from eps_g (docs/algorithm.md §3), gradient through the last step only if
    with_grad: on the sampling schedule with one noise ("fixed"), or at random decreasing times with fresh noise
    drawn from fold_in(key, _SIMULATION_STREAM) ("random")."""
    if algo.backward_simulation == "random":
        sim_key = jax.random.fold_in(key, _SIMULATION_STREAM)
        return sampling.backward_simulation_random(
            x0_fn, params, eps_g, n, sim_key, _renoise_shift(algo), algo.sigma_data, with_grad
        )
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift, algo.num_student_steps)
    return sampling.backward_simulation(x0_fn, params, eps_g, n, taus, algo.sigma_data, with_grad=with_grad)


def renoise(algo: Algo, key, g_x0):
    """x_D = cos tau_D G_x0 / sigma_d + sin tau_D eps_D with a fresh shifted-uniform tau_D (docs/algorithm.md §2,
    §4)."""
    k_tau, k_eps = jax.random.split(key)
    tau_b = trigflow.sample_tau(k_tau, (g_x0.shape[0],), shift=_renoise_shift(algo))
    eps = jax.random.normal(k_eps, g_x0.shape, jnp.float32)
    x_d = trigflow.add_noise(g_x0, eps, trigflow.expand_tau(tau_b, g_x0.ndim), algo.sigma_data)
    return x_d, tau_b


def critic_update(algo: Algo, critic_tx, state: train_state.TrainState, teacher, batch):
    """One critic (fake score) step (docs/algorithm.md §5): fit the critic to the student's current samples."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    cond = algo.condition(algo, k_cond, teacher, batch)
    x0_fn = _with_guidance(cond.x0_fn, draw_guidance(algo, jax.random.fold_in(key, _GUIDANCE_STREAM), cond.shape[0]))
    n = num_sim_steps(algo, k_n)
    eps_g = jax.random.normal(k_eps, cond.shape, jnp.float32)
    g_x0 = simulate(algo, x0_fn, state.student, key, n, eps_g, with_grad=False)
    g_x0 = jax.lax.stop_gradient(g_x0)
    x_d, tau_d = renoise(algo, k_renoise, g_x0)

    def loss_fn(critic):
        return losses.critic_loss(g_x0, x0_fn(critic, x_d, tau_d), tau_d)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic)
    ok = jnp.isfinite(loss) & train_state.all_finite(grads)
    critic, critic_opt = train_state.apply_or_skip(critic_tx, state.critic, state.critic_opt, grads, ok)
    new_state = state.replace(
        step=state.step + 1, critic=critic, critic_opt=critic_opt, **train_state.skip_counters(state, ok)
    )
    metrics = {
        "critic/loss": loss,
        "critic/grad_norm": optax.tree.norm(grads),
        "critic/skipped": 1.0 - ok,
        "critic/sim_steps": n,
        "critic/tau": jnp.mean(tau_d),
    }
    return new_state, metrics


def student_update(algo: Algo, student_tx, ema_gamma: float, state: train_state.TrainState, teacher, batch):
    """One student (generator) step (docs/algorithm.md §4): the DMD2 gradient (critic x0 - guided teacher x0) /
    lambda; student, critic and teacher all at the same per-sample scale for a guidance-conditioned student (§15)."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    cond = algo.condition(algo, k_cond, teacher, batch)
    guidance_b = draw_guidance(algo, jax.random.fold_in(key, _GUIDANCE_STREAM), cond.shape[0])
    x0_fn = _with_guidance(cond.x0_fn, guidance_b)
    n = num_sim_steps(algo, k_n)
    eps_g = jax.random.normal(k_eps, cond.shape, jnp.float32)

    def loss_fn(student):
        g_x0 = simulate(algo, x0_fn, student, key, n, eps_g, with_grad=True)
        x_d, tau_d = renoise(algo, k_renoise, jax.lax.stop_gradient(g_x0))
        x0_fake = x0_fn(state.critic, x_d, tau_d)
        x0_teacher = teacher_cfg_x0(algo, cond, teacher, x_d, tau_d, guidance_b)
        loss, aux = losses.dmd_loss(
            g_x0,
            jax.lax.stop_gradient(x0_fake),
            jax.lax.stop_gradient(x0_teacher),
            lambda_frame_chunks=algo.lambda_frame_chunks,
        )
        return loss, (aux, tau_d)

    (loss, (aux, tau_d)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    # dmd_loss zeroes non-finite samples; a batch with no finite sample at all is a diverged student: skip it.
    ok = jnp.isfinite(loss) & train_state.all_finite(grads) & ~jnp.all(aux["nan_b"])
    new_state = train_state.apply_student_step(algo, student_tx, ema_gamma, state, grads, ok)
    metrics = {
        "student/loss": loss,
        "student/grad_norm": optax.tree.norm(grads),
        "student/skipped": 1.0 - ok,
        "student/sim_steps": n,
        "student/tau": jnp.mean(tau_d),
        "student/lambda": jnp.mean(aux["lambda_b"]),
        "student/nan_samples": jnp.sum(aux["nan_b"]),
    }
    return new_state, metrics


def make_update_fns(algo: Algo, student_tx, critic_tx, ema_gamma: float, shardings=None):
    """Jitted (critic_update, student_update)(state, teacher, batch) -> (state, metrics), state donated.

    `shardings` = (state_sharding, teacher_sharding, batch_sharding, replicated) from sharding.py, or None.
    """
    critic = functools.partial(critic_update, algo, critic_tx)
    # rcm.RcmAlgo (docs/algorithm.md §14) brings its own student update; the critic update is shared.
    student = functools.partial(getattr(algo, "student_update_fn", student_update), algo, student_tx, ema_gamma)
    if shardings is None:
        return jax.jit(critic, donate_argnums=0), jax.jit(student, donate_argnums=0)
    state_sh, teacher_sh, batch_sh, repl = shardings
    kw = dict(in_shardings=(state_sh, teacher_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    return jax.jit(critic, **kw), jax.jit(student, **kw)


def student_samples(algo: Algo, params, teacher, batch, key, guidance=None):
    """Few-step student samples (B,16,T,H,W) for the conditioning of `batch` (same conditional-frame draw as
    training), through `sampling.sample`. A guidance-conditioned student samples at CFG scale `guidance` (None:
    algo.guidance, §15)."""
    k_cond, k_eps = jax.random.split(key)
    cond = algo.condition(algo, k_cond, teacher, batch)
    if algo.guidance_range is None and guidance is not None:
        raise ValueError("guidance is for a guidance-conditioned student; this one was distilled at one scale")
    guidance_b = None
    if algo.guidance_range is not None:
        guidance_b = jnp.full((cond.shape[0],), algo.guidance if guidance is None else guidance, jnp.float32)
    settings = sampling.SamplerSettings(
        kind="student",
        steps=algo.num_student_steps,
        shift=algo.timestep_shift,
        sigma_data=algo.sigma_data,
        train_steps=algo.num_student_steps,
    )
    x0_fn = functools.partial(_with_guidance(cond.x0_fn, guidance_b), params)
    return sampling.sample(settings, x0_fn, None, jax.random.normal(k_eps, cond.shape, jnp.float32))
