"""The DMD2 distillation trainer: TrainState, the jitted `critic_update` / `student_update`, and the host loop.

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run

SPEC §4-7. The student and critic start as copies of the teacher (without its frozen text projection); the
teacher sits beside the TrainState, never in an optimizer. Every per-step random draw comes from
fold_in(state.key, state.step), so a run is a pure function of (config, data, step) and resumes exactly.
"""
import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from trigflow_distill import denoiser, losses, optim, sampling, trigflow


@flax.struct.dataclass
class TrainState:
    step: jax.Array              # () int32, iterations done
    key: jax.Array               # (2,) uint32 seed key; per-step keys are fold_in(key, step)
    student: Any                 # trainable student params (fp32)
    student_opt: Any
    student_ema: Any
    student_updates: jax.Array   # () int32, counts the EMA's n
    critic: Any
    critic_opt: Any
    consecutive_skips: jax.Array  # () int32, non-finite updates in a row
    total_skips: jax.Array       # () int32


@dataclasses.dataclass(frozen=True)
class Algo:
    """The static (hashable) part of the algorithm that the update functions close over."""
    net_config: Any
    scaling: str = "rectified_flow"
    sigma_data: float = 1.0
    guidance: float = 4.0
    num_student_steps: int = 4
    timestep_shift: float = 5.0
    cond_frame_probs: tuple = (0.6, 0.2, 0.2)
    replace_gt_timesteps: bool = True


def algo_from_config(config, net_config) -> Algo:
    d, t = config.distill, config.teacher
    return Algo(net_config=net_config, scaling=t.scaling, sigma_data=float(t.sigma_data),
                guidance=float(d.guidance), num_student_steps=int(d.num_student_steps),
                timestep_shift=float(d.timestep_shift), cond_frame_probs=tuple(float(p) for p in d.cond_frame_probs),
                replace_gt_timesteps=bool(d.replace_gt_timesteps))


def make_optimizers(config):
    """(student_tx, critic_tx) from the config's optimizer sections (SPEC §6)."""
    def one(o):
        return optim.make_optimizer(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                    clip_norm=o.clip_norm, warmup=o.warmup, max_steps=o.decay_steps)
    return one(config.student_optim), one(config.critic_optim)


def split_teacher(params):
    """Teacher params -> {"net": params without the text projection, "text_proj": the projection or None}."""
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    return {"net": net, "text_proj": params.get("crossattn_proj")}


def init_state(teacher, student_tx, critic_tx, seed: int) -> TrainState:
    """Student, EMA and critic all start as fp32 copies of the teacher net (SPEC §6). Jit it with out_shardings."""
    def f32_copy():
        return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), teacher["net"])
    student, ema, critic = f32_copy(), f32_copy(), f32_copy()
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, key=jax.random.PRNGKey(seed), student=student,
                      student_opt=student_tx.init(student), student_ema=ema, student_updates=zero,
                      critic=critic, critic_opt=critic_tx.init(critic), consecutive_skips=zero, total_skips=zero)


def _contexts(teacher, text_bld):
    """(cond, uncond) projected contexts; the unconditional text is all zeros (SPEC §7)."""
    def project(text):
        if teacher["text_proj"] is None:
            return text
        p = teacher["text_proj"]
        y = jnp.einsum("blc,cd->bld", text.astype(jnp.float32), p["kernel"].astype(jnp.float32))
        return jax.nn.gelu(y + p["bias"].astype(jnp.float32), approximate=False)
    return project(text_bld), project(jnp.zeros_like(text_bld))


def _conditioning(algo: Algo, key, batch):
    """GT latents, condition mask (B,1,T,H,W) and contexts for one batch. A negative N is drawn here."""
    gt = batch["latents"].astype(jnp.float32)
    b = gt.shape[0]
    drawn = denoiser.sample_num_cond_frames(key, b, algo.cond_frame_probs)
    num_cond = batch.get("num_cond_frames")
    num_cond = drawn if num_cond is None else jnp.where(num_cond >= 0, num_cond, drawn)
    return gt, denoiser.cond_mask(num_cond, gt.shape)


def _x0_fn(algo: Algo, gt, mask, context):
    def fn(params, x_tau, tau_b):
        return denoiser.denoise(algo.net_config, params, x_tau, tau_b, context, gt, mask, scaling=algo.scaling,
                                sigma_data=algo.sigma_data, replace_gt_timesteps=algo.replace_gt_timesteps)
    return fn


def _renoise(algo: Algo, key, g_x0):
    """x_D = cos tau_D G_x0 / sigma_d + sin tau_D eps_D with a fresh shifted-uniform tau_D (SPEC §2, §4.3)."""
    k_tau, k_eps = jax.random.split(key)
    tau_b = trigflow.sample_tau(k_tau, (g_x0.shape[0],), shift=algo.timestep_shift)
    eps = jax.random.normal(k_eps, g_x0.shape, jnp.float32)
    x_d = trigflow.add_noise(g_x0, eps, trigflow.expand_tau(tau_b, g_x0.ndim), algo.sigma_data)
    return x_d, tau_b


def _all_finite(tree):
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _apply_or_skip(tx, params, opt_state, grads, ok):
    """One optimizer step if `ok`, else params and optimizer state unchanged."""
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(new_params, params), keep(new_opt, opt_state)


def _skip_counters(state, ok):
    skip = (~ok).astype(jnp.int32)
    return dict(consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1), total_skips=state.total_skips + skip)


def critic_update(algo: Algo, critic_tx, state: TrainState, teacher, batch):
    """One critic (fake score) step (SPEC §5): fit the critic to the student's current samples."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    gt, mask = _conditioning(algo, k_cond, batch)
    context, _ = _contexts(teacher, batch["text"])
    x0_fn = _x0_fn(algo, gt, mask, context)
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift)
    n = sampling.draw_num_steps(k_n, algo.num_student_steps)
    eps_g = jax.random.normal(k_eps, gt.shape, jnp.float32)
    g_x0 = sampling.backward_simulation(x0_fn, state.student, eps_g, n, taus, algo.sigma_data, with_grad=False)
    g_x0 = jax.lax.stop_gradient(g_x0)
    x_d, tau_d = _renoise(algo, k_renoise, g_x0)

    def loss_fn(critic):
        return losses.critic_loss(g_x0, x0_fn(critic, x_d, tau_d), tau_d)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    critic, critic_opt = _apply_or_skip(critic_tx, state.critic, state.critic_opt, grads, ok)
    new_state = state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt, **_skip_counters(state, ok))
    metrics = {"critic/loss": loss, "critic/grad_norm": optax.global_norm(grads), "critic/skipped": 1.0 - ok,
               "critic/sim_steps": n, "critic/tau": jnp.mean(tau_d)}
    return new_state, metrics


def student_update(algo: Algo, student_tx, ema_gamma: float, state: TrainState, teacher, batch):
    """One student (generator) step (SPEC §4): the DMD2 gradient (critic x0 - guided teacher x0) / lambda."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    gt, mask = _conditioning(algo, k_cond, batch)
    context, uncond_context = _contexts(teacher, batch["text"])
    x0_fn = _x0_fn(algo, gt, mask, context)
    x0_uncond_fn = _x0_fn(algo, gt, mask, uncond_context)
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift)
    n = sampling.draw_num_steps(k_n, algo.num_student_steps)
    eps_g = jax.random.normal(k_eps, gt.shape, jnp.float32)

    def loss_fn(student):
        g_x0 = sampling.backward_simulation(x0_fn, student, eps_g, n, taus, algo.sigma_data, with_grad=True)
        x_d, tau_d = _renoise(algo, k_renoise, jax.lax.stop_gradient(g_x0))
        x0_fake = x0_fn(state.critic, x_d, tau_d)
        x0_teacher = losses.cfg_x0(x0_fn(teacher["net"], x_d, tau_d), x0_uncond_fn(teacher["net"], x_d, tau_d),
                                   algo.guidance)
        loss, aux = losses.dmd_loss(g_x0, jax.lax.stop_gradient(x0_fake), jax.lax.stop_gradient(x0_teacher))
        return loss, (aux, tau_d)

    (loss, (aux, tau_d)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    student, student_opt = _apply_or_skip(student_tx, state.student, state.student_opt, grads, ok)
    updates = state.student_updates + ok.astype(jnp.int32)
    new_ema = optim.ema_update(state.student_ema, student, updates, ema_gamma)
    ema = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_ema, state.student_ema)
    new_state = state.replace(step=state.step + 1, student=student, student_opt=student_opt, student_ema=ema,
                              student_updates=updates, **_skip_counters(state, ok))
    metrics = {"student/loss": loss, "student/grad_norm": optax.global_norm(grads), "student/skipped": 1.0 - ok,
               "student/sim_steps": n, "student/tau": jnp.mean(tau_d),
               "student/lambda": jnp.mean(aux["lambda_b"]), "student/nan_samples": jnp.sum(aux["nan_b"])}
    return new_state, metrics


def make_update_fns(algo: Algo, student_tx, critic_tx, ema_gamma: float, shardings=None):
    """Jitted (critic_update, student_update)(state, teacher, batch) -> (state, metrics), state donated.

    `shardings` = (state_sharding, teacher_sharding, batch_sharding, replicated) from sharding.py, or None.
    """
    critic = functools.partial(critic_update, algo, critic_tx)
    student = functools.partial(student_update, algo, student_tx, ema_gamma)
    if shardings is None:
        return jax.jit(critic, donate_argnums=0), jax.jit(student, donate_argnums=0)
    state_sh, teacher_sh, batch_sh, repl = shardings
    kw = dict(in_shardings=(state_sh, teacher_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    return jax.jit(critic, **kw), jax.jit(student, **kw)


def is_student_step(step: int, student_update_freq: int, tangent_warmup: int) -> bool:
    """SPEC §6: iteration i updates the student iff i % freq == 0 (and always during the warm-up)."""
    return step % student_update_freq == 0 or step < tangent_warmup
