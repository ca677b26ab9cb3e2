"""The DMD2 distillation trainer: TrainState, the jitted `critic_update` / `student_update`, and the host loop.

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run

SPEC §4-7. The student and critic start as copies of the teacher (without its frozen text projection); the
teacher sits beside the TrainState, never in an optimizer. Every per-step random draw comes from
fold_in(state.key, state.step), so a run is a pure function of (config, data, step) and resumes exactly.
"""
import dataclasses
import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview
from jax.experimental import multihost_utils

from trigflow_distill import (checkpoint, convert, data, denoiser, distributed, losses, metrics, optim, sampling,
                              sharding, toy, trigflow)


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
    mesh: Any = None  # jax Mesh the update runs on; a `seq` axis > 1 sequence-shards the networks' activations


def algo_from_config(config, net_config, mesh=None) -> Algo:
    d, t = config.distill, config.teacher
    return Algo(net_config=net_config, mesh=mesh, scaling=t.scaling, sigma_data=float(t.sigma_data),
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
                                sigma_data=algo.sigma_data, replace_gt_timesteps=algo.replace_gt_timesteps,
                                mesh=algo.mesh)
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
    metrics = {"critic/loss": loss, "critic/grad_norm": optax.tree.norm(grads), "critic/skipped": 1.0 - ok,
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
    # dmd_loss zeroes non-finite samples; a batch with no finite sample at all is a diverged student: skip it.
    ok = jnp.isfinite(loss) & _all_finite(grads) & ~jnp.all(aux["nan_b"])
    student, student_opt = _apply_or_skip(student_tx, state.student, state.student_opt, grads, ok)
    updates = state.student_updates + ok.astype(jnp.int32)
    new_ema = optim.ema_update(state.student_ema, student, updates, ema_gamma)
    ema = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_ema, state.student_ema)
    new_state = state.replace(step=state.step + 1, student=student, student_opt=student_opt, student_ema=ema,
                              student_updates=updates, **_skip_counters(state, ok))
    metrics = {"student/loss": loss, "student/grad_norm": optax.tree.norm(grads), "student/skipped": 1.0 - ok,
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


# ----------------------------------------------------------------------------------------------------------------
# Host side: set-up, the loop, resume.

class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite updates in a row)."""


def validate_config(config):
    """Clear errors for the mistakes a user can make before anything heavy starts."""
    if not config.teacher.path:
        raise ValueError(
            "config.teacher.path is empty. The real recipe distills the Cosmos Predict2.5 2B teacher: download "
            "base/pre-trained/<uuid>_ema_bf16.pt from https://huggingface.co/nvidia/Cosmos-Predict2.5-2B and pass "
            "--config.teacher.path=/path/to/that.pt (or use configs/predict25_4step.py:tiny for the CPU demo).")
    if not os.path.exists(config.teacher.path):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path!r} does not exist.")
    if config.data.kind not in ("dir", "toy", "synthetic"):
        raise ValueError(f"config.data.kind={config.data.kind!r}: use 'dir', 'toy' or 'synthetic'.")
    if config.data.kind == "dir" and not config.data.path:
        raise ValueError("config.data.path is empty: point it at a dataset written by "
                         "`python -m trigflow_distill.data.write` (see trigflow_distill/data/__init__.py).")
    d = config.distill
    if d.student_update_freq < 1 or d.num_student_steps < 1:
        raise ValueError("distill.student_update_freq and distill.num_student_steps must be >= 1.")
    if len(d.cond_frame_probs) < 1 or min(d.cond_frame_probs) < 0 or abs(sum(d.cond_frame_probs) - 1) > 1e-6:
        raise ValueError(f"distill.cond_frame_probs={tuple(d.cond_frame_probs)} must be probabilities summing to 1.")
    if config.teacher.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"teacher.dtype={config.teacher.dtype!r}: use 'float32' or 'bfloat16'.")


def make_source(config, world=None):
    """The record source named by config.data (records: latents, text, [num_cond_frames], [prompt])."""
    if config.data.kind == "toy":
        return toy.RecordSource(world if world is not None else toy.make_world(), seed=config.data.seed)
    if config.data.kind == "synthetic":
        return data.make_synthetic_source(4096, tuple(config.data.latent_shape), tuple(config.data.text_shape),
                                          seed=config.data.seed)
    return data.NpyDirSource(config.data.path)


def load_teacher(config, workdir):
    """(net_config, teacher) with teacher = {"net", "text_proj"}, converted once and cached (SPEC §9)."""
    cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
    net_config, params = convert.load_teacher(config.teacher.path, cache_dir, dtype=config.net.dtype,
                                              remat=config.net.remat, attention=config.net.attention,
                                              attention_block_size=config.net.get("attention_block_size", 512))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: np.asarray(x).astype(store), params)
    if "crossattn_proj" in params:  # the frozen projection stays fp32: it is applied once per batch
        params["crossattn_proj"] = jax.tree.map(lambda x: x.astype(np.float32), params["crossattn_proj"])
    return net_config, split_teacher(params)


def state_shardings(abstract_state: TrainState, student_tx, critic_tx, mesh):
    """TrainState of NamedShardings: params, EMA and Adam moments FSDP-sharded alike; scalars replicated."""
    p_sh = sharding.param_sharding(abstract_state.student, mesh)
    repl = sharding.replicated(mesh)
    return TrainState(step=repl, key=repl, student=p_sh, student_ema=p_sh, critic=p_sh,
                      student_opt=sharding.opt_state_sharding(student_tx, abstract_state.student, p_sh, mesh),
                      critic_opt=sharding.opt_state_sharding(critic_tx, abstract_state.critic, p_sh, mesh),
                      student_updates=repl, consecutive_skips=repl, total_skips=repl)


def setup(config, workdir, mesh):
    """Everything the loop needs: (algo, txs, teacher, shardings, abstract state, init fn)."""
    net_config, teacher = load_teacher(config, workdir)
    algo = algo_from_config(config, net_config, mesh)
    student_tx, critic_tx = make_optimizers(config)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    teacher = sharding.put_global(teacher, teacher_sh)
    init = functools.partial(init_state, student_tx=student_tx, critic_tx=critic_tx, seed=int(config.seed))
    abstract = jax.eval_shape(init, teacher)
    state_sh = state_shardings(abstract, student_tx, critic_tx, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    init = jax.jit(init, in_shardings=(teacher_sh,), out_shardings=state_sh)
    return algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init


def train(config, workdir: str) -> TrainState:
    """Runs (or resumes) the distillation in `workdir` up to config.total_steps; returns the final state."""
    validate_config(config)
    main_process = distributed.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(dict(config.mesh))
    batch_size = int(config.data.batch_size)
    sharding.check_batch(batch_size, mesh)

    algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init = setup(config, workdir, mesh)
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    critic_step, student_step = make_update_fns(algo, student_tx, critic_tx, optim.ema_gamma(config.distill.ema_rate),
                                                (state_sh, teacher_sh, batch_sh, repl))

    world = toy.make_world() if config.data.kind == "toy" else None
    source = make_source(config, world)
    data_iter = data.make_iterator(source, batch_size, int(config.data.seed),
                                   process_slice=sharding.local_batch_slice(batch_size, mesh))
    manager = checkpoint.make_manager(workdir, int(config.keep_checkpoints), int(config.checkpoint_every))
    state, start = checkpoint.restore_latest(manager, abstract, data_iter)
    if state is None:
        state = init(teacher)
        if main_process:
            print(parameter_overview.get_parameter_overview(jax.device_get(state.student), include_stats=False,
                                                            max_lines=40), flush=True)
    elif main_process:
        print(f"Resumed from {workdir} at step {start}.", flush=True)

    total = int(config.total_steps)
    first = source[0]["latents"]  # (16,T,H,W): tokens per sample for the speed line
    c = algo.net_config
    tokens = batch_size * (first.shape[1] // c.patch_temporal) * (first.shape[2] // c.patch_spatial) * (
        first.shape[3] // c.patch_spatial)
    writer = metrics.Writer(workdir, total, tokens, enabled=main_process)
    agg = metrics.Aggregator()
    pending = []
    d = config.distill
    sample_fn = jax.jit(functools.partial(student_samples, algo))
    try:
        for step in range(start, total):
            batch = sharding.global_batch(next(data_iter), batch_size, mesh)
            fn = student_step if is_student_step(step, d.student_update_freq, d.tangent_warmup) else critic_step
            state, step_metrics = fn(state, teacher, batch)
            pending.append(step_metrics)
            done = step + 1
            if done % config.log_every == 0 or done == total:
                for m in jax.device_get(pending):
                    agg.add(m)
                pending = []
                scalars = agg.compute_and_reset()
                skips = int(state.consecutive_skips)
                writer.write(done, {**scalars, "total_skips": float(state.total_skips)})
                if skips >= config.max_consecutive_skips:
                    raise TrainingStopped(
                        f"{skips} consecutive updates had a non-finite loss or gradient (step {done}); stopping. "
                        f"The last good checkpoint is in {manager.directory}. Lower the learning rates or check the "
                        "data for non-finite values.")
            if checkpoint.save(manager, done, state, data_iter, force=done == total) and main_process:
                print(f"checkpoint saved at step {done}", flush=True)
            if config.sample_every and done % config.sample_every == 0 and world is not None:
                save_samples(sample_fn, state, teacher, batch, world, os.path.join(workdir, "samples", f"{done:07d}.png"))
    finally:
        checkpoint.wait_until_finished(manager)
        writer.close()
    return state


def student_samples(algo: Algo, params, teacher, batch, key):
    """4-step student samples (B,16,T,H,W) for the conditioning of `batch` (same conditional-frame draw as training)."""
    k_cond, k_eps = jax.random.split(key)
    gt, mask = _conditioning(algo, k_cond, batch)
    context, _ = _contexts(teacher, batch["text"])
    x0_fn = functools.partial(_x0_fn(algo, gt, mask, context), params)
    taus = sampling.student_schedule(algo.num_student_steps, algo.timestep_shift)
    return sampling.sample_student(x0_fn, jax.random.normal(k_eps, gt.shape, jnp.float32), taus, algo.sigma_data)


def save_samples(sample_fn, state: TrainState, teacher, batch, world, path: str):
    """Pictures of the EMA student's samples on the current batch (every process computes, process 0 writes).

    `sample_fn` is jit(partial(student_samples, algo)), built once per run."""
    x = multihost_utils.process_allgather(sample_fn(state.student_ema, teacher, batch, jax.random.PRNGKey(0)), tiled=True)
    prompts = multihost_utils.process_allgather(batch["prompt"], tiled=True)
    if distributed.is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        toy.save_grid_png(world, np.asarray(x), np.asarray(prompts), path, per_prompt=2)


def load_run(workdir: str):
    """(config, net_config, teacher_params, student_params, ema_params) of the latest checkpoint in `workdir`.

    teacher_params is the full teacher tree (with its text projection); student/EMA params lack it.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (run main.py first).")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    mesh = sharding.make_mesh({"data": -1})
    algo, _, teacher, _, abstract, _ = setup(config, workdir, mesh)
    manager = checkpoint.make_manager(workdir, int(config.keep_checkpoints), int(config.checkpoint_every))
    state, step = checkpoint.restore_latest(manager, abstract)
    if state is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}.")
    teacher_params = dict(teacher["net"])
    if teacher["text_proj"] is not None:
        teacher_params["crossattn_proj"] = teacher["text_proj"]
    return config, algo.net_config, teacher_params, state.student, state.student_ema
