"""The DMD2 method in TrigFlow: the train state, the jit-able critic and student updates, student sampling.

docs/algorithm.md §2-7. The student and critic start as copies of the teacher (without its frozen text
projection); the teacher sits beside the TrainState, never in an optimizer. Every per-step random draw comes from
fold_in(state.key, state.step), so a run is a pure function of (config, data, step) and resumes exactly.
Nothing here opens files: `run.py` builds these pieces from a config, `train.py` loops over them.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from trigflow_distill import denoiser, losses, networks, optim, sampling, sharding, trigflow
from trigflow_distill.recipe import COND_FRAME_PROBS


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32, iterations done
    key: jax.Array  # (2,) uint32 seed key; per-step keys are fold_in(key, step)
    student: Any  # trainable student params (fp32)
    student_opt: Any
    student_ema: Any
    student_updates: jax.Array  # () int32, counts the EMA's n
    critic: Any
    critic_opt: Any
    consecutive_skips: jax.Array  # () int32, non-finite updates in a row
    total_skips: jax.Array  # () int32


class Conditioning(NamedTuple):
    """What one batch conditions on, as the denoisers the updates call (docs/algorithm.md §7)."""

    shape: tuple  # shape of the generated samples, e.g. (B,16,T,H,W)
    # (params, x_tau, tau_b[, guidance_b=]) -> x0 with the batch's conditioning; guidance_b (B,) only for a
    # guidance-conditioned student or critic (docs/algorithm.md §15)
    x0_fn: Callable
    x0_uncond_fn: Callable  # the same with the unconditional (all-zero) text


def text_width_kind(net_config, teacher, width: int) -> str:
    """ "raw" if text of this width goes through the teacher's frozen projection, "projected" if it is already the
    context the networks take (a dataset of projected context, docs/algorithm.md §7, §13); a ValueError naming the
    widths otherwise. Equal projection input and output widths count as raw."""
    proj = teacher["text_proj"]
    widths = {"raw": None if proj is None else proj["kernel"].shape[0], "projected": net_config.crossattn_emb_channels}
    for kind, w in widths.items():
        if width == w:
            return kind
    takes = (
        f"{widths['raw']} (raw Cosmos-Reason1 embeddings, which its text projection maps to {widths['projected']}) or "
        if proj is not None
        else ""
    ) + f"{widths['projected']} (projected context)"
    raise ValueError(
        f"the data's text embeddings are {width} wide, but this teacher takes {takes}; write the data for "
        "this teacher (python -m trigflow_distill.data.write --net=...)."
    )


def contexts(algo: "Algo", teacher, text_bld):
    """(cond, uncond) context (B, L, D) for the networks from the batch's text: raw embeddings are projected
    (the unconditional text is all zeros); projected context is used as is, and its unconditional twin is
    GELU(b), the projection of zeros (docs/algorithm.md §7, §13)."""
    proj = teacher["text_proj"]
    kind = text_width_kind(algo.net_config, teacher, text_bld.shape[-1])
    if proj is None:
        return text_bld, jnp.zeros_like(text_bld)
    if kind == "raw":

        def project(text):
            return networks.project_text(algo.net_config, {"crossattn_proj": proj}, text)

        return project(text_bld), project(jnp.zeros_like(text_bld))
    uncond = jax.nn.gelu(proj["bias"].astype(jnp.float32), approximate=False)
    return text_bld.astype(jnp.float32), jnp.broadcast_to(uncond, text_bld.shape)


def video2world(algo: "Algo", key, teacher, batch) -> Conditioning:
    """Video2World conditioning of a batch {"latents", "text", ["num_cond_frames"], ["padding_mask"]}: N
    conditional frames (a negative or missing N is drawn from algo.cond_frame_probs with `key`), contexts from
    `contexts` (raw or projected text), the batch's padding mask (B,1,h,w) or none (zeros); every network call
    goes through `denoiser.denoise` with all of these (docs/algorithm.md §1, §7)."""
    gt = batch["latents"].astype(jnp.float32)
    drawn = denoiser.sample_num_cond_frames(key, gt.shape[0], algo.cond_frame_probs)
    num_cond = batch.get("num_cond_frames")
    num_cond = drawn if num_cond is None else jnp.where(num_cond >= 0, num_cond, drawn)
    mask = denoiser.cond_mask(num_cond, gt.shape)
    padding_mask = batch.get("padding_mask")

    def x0_fn_for(context):
        def fn(params, x_tau, tau_b, guidance_b=None):
            return denoiser.denoise(
                algo.net_config,
                params,
                x_tau,
                tau_b,
                context,
                gt,
                mask,
                scaling=algo.scaling,
                sigma_data=algo.sigma_data,
                replace_gt_timesteps=algo.replace_gt_timesteps,
                padding_mask_b1hw=padding_mask,
                mesh=algo.mesh,
                guidance_b=guidance_b,
            )

        return fn

    cond, uncond = contexts(algo, teacher, batch["text"])
    return Conditioning(gt.shape, x0_fn_for(cond), x0_fn_for(uncond))


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
    condition: Callable = video2world
    sim_steps: int | None = None  # None: backward simulation from n ~ U{1..num_student_steps}; else n fixed
    renoise_shift: float | None = None  # time shift of the critic/teacher time tau_D; None: timestep_shift
    # (lo, hi): a guidance-conditioned student and critic, the CFG scale s ~ U[lo, hi] per sample and update
    # (docs/algorithm.md §15); None: one fixed scale, `guidance`. `guidance` is then the scale samples are drawn at.
    guidance_range: tuple | None = None


def algo_from_config(config, net_config, mesh=None) -> Algo:
    d, t = config.distill, config.teacher
    return Algo(
        net_config=net_config,
        mesh=mesh,
        scaling=t.scaling,
        sigma_data=float(t.sigma_data),
        guidance=float(d.guidance),
        num_student_steps=int(d.num_student_steps),
        timestep_shift=float(d.timestep_shift),
        cond_frame_probs=tuple(float(p) for p in d.cond_frame_probs),
        replace_gt_timesteps=bool(d.replace_gt_timesteps),
        lambda_frame_chunks=int(d.get("lambda_frame_chunks", 1)),
        ema_start=int(d.get("ema_start", 0)),
        guidance_range=tuple(float(g) for g in d.guidance_range) if d.get("guidance_conditioned", False) else None,
    )


def net_options(config_net, **overrides) -> dict:
    """The DiTConfig compute options of config.net (dtype, remat, attention, attention_block_size), `overrides`
    on top. The one place these options reach the network: training, plan and evaluation all pass through here."""
    options = dict(
        dtype=config_net.dtype,
        remat=config_net.remat,
        attention=config_net.attention,
        attention_block_size=int(config_net.get("attention_block_size", 512)),
    )
    return {**options, **overrides}


def make_optimizers(config):
    """(student_tx, critic_tx) from the config's optimizer sections (docs/algorithm.md §6)."""

    def one(o):
        return optim.make_optimizer(
            o.lr,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            clip_norm=o.clip_norm,
            warmup=o.warmup,
            max_steps=o.decay_steps,
        )

    return one(config.student_optim), one(config.critic_optim)


def split_teacher(params):
    """Teacher params -> {"net": params without the text projection, "text_proj": the projection or None}."""
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    return {"net": net, "text_proj": params.get("crossattn_proj")}


def init_state(teacher, student_tx, critic_tx, seed: int, guidance_conditioned: bool = False) -> TrainState:
    """Student, EMA and critic all start as fp32 copies of the teacher net (docs/algorithm.md §6), with a zero
    guidance embedder when `guidance_conditioned` (§15: they still equal the teacher for every s). Jit it with
    out_shardings."""

    def f32_copy():
        net = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), teacher["net"])
        return networks.add_guidance_embedder(net) if guidance_conditioned else net

    student, ema, critic = f32_copy(), f32_copy(), f32_copy()

    def zero():  # one buffer per counter: the updates donate the state, which must not alias
        return jnp.zeros((), jnp.int32)

    return TrainState(
        step=zero(),
        key=jax.random.PRNGKey(seed),
        student=student,
        student_opt=student_tx.init(student),
        student_ema=ema,
        student_updates=zero(),
        critic=critic,
        critic_opt=critic_tx.init(critic),
        consecutive_skips=zero(),
        total_skips=zero(),
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


def teacher_cfg_x0(algo: Algo, cond: Conditioning, teacher, x_tau, tau_b, guidance_b=None):
    """The guided teacher's x0 (docs/algorithm.md §4): scale algo.guidance, or the per-sample guidance_b (§15)."""
    s = algo.guidance if guidance_b is None else trigflow.expand_tau(guidance_b, len(cond.shape))
    return losses.cfg_x0(cond.x0_fn(teacher["net"], x_tau, tau_b), cond.x0_uncond_fn(teacher["net"], x_tau, tau_b), s)


# fold_in stream of the per-sample CFG scale (§15), apart from the four split keys so fixed-s runs are unchanged
_GUIDANCE_STREAM = 4


def _num_sim_steps(algo: Algo, key):
    if algo.sim_steps is None:
        return sampling.draw_num_steps(key, algo.num_student_steps)
    return jnp.int32(algo.sim_steps)


def _renoise(algo: Algo, key, g_x0):
    """x_D = cos tau_D G_x0 / sigma_d + sin tau_D eps_D with a fresh shifted-uniform tau_D (docs/algorithm.md §2,
    §4)."""
    k_tau, k_eps = jax.random.split(key)
    shift = algo.timestep_shift if algo.renoise_shift is None else algo.renoise_shift
    tau_b = trigflow.sample_tau(k_tau, (g_x0.shape[0],), shift=shift)
    eps = jax.random.normal(k_eps, g_x0.shape, jnp.float32)
    x_d = trigflow.add_noise(g_x0, eps, trigflow.expand_tau(tau_b, g_x0.ndim), algo.sigma_data)
    return x_d, tau_b


def _all_finite(tree):
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _apply_or_skip(tx, params, opt_state, grads, ok):
    """One optimizer step if `ok`, else params and optimizer state unchanged."""
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    return keep(new_params, params), keep(new_opt, opt_state)


def _skip_counters(state, ok):
    skip = (~ok).astype(jnp.int32)
    return dict(consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1), total_skips=state.total_skips + skip)


def critic_update(algo: Algo, critic_tx, state: TrainState, teacher, batch):
    """One critic (fake score) step (docs/algorithm.md §5): fit the critic to the student's current samples."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    cond = algo.condition(algo, k_cond, teacher, batch)
    x0_fn = _with_guidance(cond.x0_fn, draw_guidance(algo, jax.random.fold_in(key, _GUIDANCE_STREAM), cond.shape[0]))
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift, algo.num_student_steps)
    n = _num_sim_steps(algo, k_n)
    eps_g = jax.random.normal(k_eps, cond.shape, jnp.float32)
    g_x0 = sampling.backward_simulation(x0_fn, state.student, eps_g, n, taus, algo.sigma_data, with_grad=False)
    g_x0 = jax.lax.stop_gradient(g_x0)
    x_d, tau_d = _renoise(algo, k_renoise, g_x0)

    def loss_fn(critic):
        return losses.critic_loss(g_x0, x0_fn(critic, x_d, tau_d), tau_d)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    critic, critic_opt = _apply_or_skip(critic_tx, state.critic, state.critic_opt, grads, ok)
    new_state = state.replace(step=state.step + 1, critic=critic, critic_opt=critic_opt, **_skip_counters(state, ok))
    metrics = {
        "critic/loss": loss,
        "critic/grad_norm": optax.tree.norm(grads),
        "critic/skipped": 1.0 - ok,
        "critic/sim_steps": n,
        "critic/tau": jnp.mean(tau_d),
    }
    return new_state, metrics


def apply_student_step(algo: Algo, student_tx, ema_gamma: float, state: TrainState, grads, ok) -> TrainState:
    """The state after one student step with `grads`: optimizer step and EMA if `ok`, else unchanged student,
    optimizer and EMA; counters advanced either way. Shared by every student loss (DMD2 here, rCM)."""
    student, student_opt = _apply_or_skip(student_tx, state.student, state.student_opt, grads, ok)
    # beta counts the student updates before this one (docs/algorithm.md §6, §13): 0 at the first update.
    new_ema = optim.ema_update(state.student_ema, student, state.student_updates, ema_gamma, algo.ema_start)
    ema = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_ema, state.student_ema)
    return state.replace(
        step=state.step + 1,
        student=student,
        student_opt=student_opt,
        student_ema=ema,
        student_updates=state.student_updates + ok.astype(jnp.int32),
        **_skip_counters(state, ok),
    )


def student_update(algo: Algo, student_tx, ema_gamma: float, state: TrainState, teacher, batch):
    """One student (generator) step (docs/algorithm.md §4): the DMD2 gradient (critic x0 - guided teacher x0) /
    lambda; student, critic and teacher all at the same per-sample scale for a guidance-conditioned student (§15)."""
    key = jax.random.fold_in(state.key, state.step)
    k_cond, k_n, k_eps, k_renoise = jax.random.split(key, 4)
    cond = algo.condition(algo, k_cond, teacher, batch)
    guidance_b = draw_guidance(algo, jax.random.fold_in(key, _GUIDANCE_STREAM), cond.shape[0])
    x0_fn = _with_guidance(cond.x0_fn, guidance_b)
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift, algo.num_student_steps)
    n = _num_sim_steps(algo, k_n)
    eps_g = jax.random.normal(k_eps, cond.shape, jnp.float32)

    def loss_fn(student):
        g_x0 = sampling.backward_simulation(x0_fn, student, eps_g, n, taus, algo.sigma_data, with_grad=True)
        x_d, tau_d = _renoise(algo, k_renoise, jax.lax.stop_gradient(g_x0))
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
    ok = jnp.isfinite(loss) & _all_finite(grads) & ~jnp.all(aux["nan_b"])
    new_state = apply_student_step(algo, student_tx, ema_gamma, state, grads, ok)
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


def is_student_step(step: int, student_update_freq: int, tangent_warmup: int) -> bool:
    """docs/algorithm.md §6: iteration i updates the student iff i % freq == 0 (and always during the warm-up)."""
    return step % student_update_freq == 0 or step < tangent_warmup


def state_shardings(abstract_state: TrainState, student_tx, critic_tx, mesh):
    """TrainState of NamedShardings: params, EMA and Adam moments FSDP-sharded alike; scalars replicated."""
    p_sh = sharding.param_sharding(abstract_state.student, mesh)
    repl = sharding.replicated(mesh)
    return TrainState(
        step=repl,
        key=repl,
        student=p_sh,
        student_ema=p_sh,
        critic=p_sh,
        student_opt=sharding.opt_state_sharding(student_tx, abstract_state.student, p_sh, mesh),
        critic_opt=sharding.opt_state_sharding(critic_tx, abstract_state.critic, p_sh, mesh),
        student_updates=repl,
        consecutive_skips=repl,
        total_skips=repl,
    )


def student_samples(algo: Algo, params, teacher, batch, key, guidance=None):
    """Few-step student samples (B,16,T,H,W) for the conditioning of `batch` (same conditional-frame draw as
    training). A guidance-conditioned student samples at CFG scale `guidance` (None: algo.guidance, §15)."""
    k_cond, k_eps = jax.random.split(key)
    cond = algo.condition(algo, k_cond, teacher, batch)
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift, algo.num_student_steps)
    guidance_b = None
    if algo.guidance_range is None and guidance is not None:
        raise ValueError("guidance is for a guidance-conditioned student; this one was distilled at one scale")
    if algo.guidance_range is not None:
        guidance_b = jnp.full((cond.shape[0],), algo.guidance if guidance is None else guidance, jnp.float32)
    x0_fn = functools.partial(_with_guidance(cond.x0_fn, guidance_b), params)
    return sampling.sample_student(x0_fn, jax.random.normal(k_eps, cond.shape, jnp.float32), taus, algo.sigma_data)
