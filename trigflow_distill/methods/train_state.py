"""The DMD2 method in TrigFlow: the train state, the jit-able critic and student updates, student sampling.

docs/algorithm.md §2-7. The student and critic start as copies of the teacher (without its frozen text
projection); the teacher sits beside the TrainState, never in an optimizer. Every per-step random draw comes from
fold_in(state.key, state.step), so a run is a pure function of (config, data, step) and resumes exactly.
Nothing here opens files: `run.py` builds these pieces from a config, `train.py` loops over them.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from trigflow_distill.common import sharding
from trigflow_distill.core import optim
from trigflow_distill.models import cosmos_dit


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


def init_state(teacher, student_tx, critic_tx, seed: int, guidance_conditioned: bool = False) -> TrainState:
    """Student, EMA and critic all start as fp32 copies of the teacher net (docs/algorithm.md §6), with a zero
    guidance embedder when `guidance_conditioned` (§15: they still equal the teacher for every s). Jit it with
    out_shardings."""

    def f32_copy():
        net = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), teacher["net"])
        return cosmos_dit.add_guidance_embedder(net) if guidance_conditioned else net

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


def all_finite(tree):
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def apply_or_skip(tx, params, opt_state, grads, ok):
    """One optimizer step if `ok`, else params and optimizer state unchanged."""
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    return keep(new_params, params), keep(new_opt, opt_state)


def skip_counters(state, ok):
    skip = (~ok).astype(jnp.int32)
    return dict(consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1), total_skips=state.total_skips + skip)


def apply_student_step(algo, student_tx, ema_gamma: float, state: TrainState, grads, ok) -> TrainState:
    """The state after one student step with `grads`: optimizer step and EMA if `ok`, else unchanged student,
    optimizer and EMA; counters advanced either way. Shared by every student loss (DMD2 here, rCM)."""
    student, student_opt = apply_or_skip(student_tx, state.student, state.student_opt, grads, ok)
    # beta counts the student updates before this one (docs/algorithm.md §6, §13): 0 at the first update.
    new_ema = optim.ema_update(state.student_ema, student, state.student_updates, ema_gamma, algo.ema_start)
    ema = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_ema, state.student_ema)
    return state.replace(
        step=state.step + 1,
        student=student,
        student_opt=student_opt,
        student_ema=ema,
        student_updates=state.student_updates + ok.astype(jnp.int32),
        **skip_counters(state, ok),
    )


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
