"""The one run builder: a config, the teacher and a mesh -> the algorithm, optimizers, abstract and sharded
TrainState, and the jitted updates (`build`). Training, the automatic mesh, the compile-only memory plan and the
restore paths all call it, so they cannot drift apart. Also: loading the teacher into its frozen value
(`load_teacher`) and the one "does this data fit the teacher" check (`check_source`).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used.
"""

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill import methods
from trigflow_distill.common import sharding
from trigflow_distill.core import optim
from trigflow_distill.data import format as data_format
from trigflow_distill.methods import dmd2, train_state
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import teacher_cache


def net_options(config_net, **overrides) -> dict:
    """The DiTConfig compute options of config.net (dtype, remat, attention, attention_block_size), `overrides`
    on top. The one place these options reach the network: training, plan and evaluation all pass through here."""
    options = dict(
        dtype=config_net.dtype,
        remat=config_net.remat,
        attention=config_net.attention,
        attention_block_size=int(config_net.attention_block_size),
    )
    return {**options, **overrides}


def split_teacher(params):
    """Teacher params -> {"net": params without the text projection, "text_proj": the projection or None}."""
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    return {"net": net, "text_proj": params.get("crossattn_proj")}


def load_teacher(config, workdir):
    """(net_config, teacher) with teacher = {"net", "text_proj"}, converted once and cached (docs/algorithm.md §9)."""
    cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
    net_config, params = teacher_cache.load_teacher(config.teacher.path, cache_dir, **net_options(config.net))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    proj = params.get("crossattn_proj")
    params = jax.tree.map(lambda x: np.asarray(x).astype(store), params)
    if proj is not None:  # the frozen projection stays fp32 (not rounded to `store`): it is applied once per batch
        params["crossattn_proj"] = jax.tree.map(lambda x: np.asarray(x).astype(np.float32), proj)
    return net_config, split_teacher(params)


class Run(NamedTuple):
    """Everything a run's updates need, built once by `build` (on real or abstract teacher weights)."""

    algo: Any  # the method's Algo (methods.algo_from_config)
    student_tx: Any
    critic_tx: Any
    teacher: dict  # {"net", "text_proj"} placed with `teacher_sharding` (or ShapeDtypeStructs carrying it)
    abstract_state: train_state.TrainState  # ShapeDtypeStructs with their shardings: restore target, plan input
    state_sharding: train_state.TrainState
    teacher_sharding: Any
    batch_sharding: Any
    init: Callable  # jitted teacher -> TrainState (sharded)
    critic_step: Callable  # jitted (state, teacher, batch) -> (state, metrics), state donated
    student_step: Callable


def _is_abstract(tree) -> bool:
    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def build(config, net_config, teacher, mesh, text_kind: str | None = None) -> Run:
    """The one run builder (docs/algorithm.md §6): the method of config.distill.method for `net_config` on `mesh`,
    its optimizers, the sharded TrainState (abstract, and the jitted init from `teacher`) and the jitted critic
    and student updates. `teacher` = {"net", "text_proj"}: arrays (placed on the mesh here) or ShapeDtypeStructs
    (the compile-only plan: nothing is allocated). `text_kind`: what the dataset declares its text to be."""
    algo = methods.algo_from_config(config, net_config, mesh, text_kind)
    student_tx, critic_tx = train_state.make_optimizers(config)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    if _is_abstract(teacher):
        teacher = _with_shardings(teacher, teacher_sh)
    else:
        teacher = sharding.put_global(teacher, teacher_sh)
    init = functools.partial(
        train_state.init_state,
        student_tx=student_tx,
        critic_tx=critic_tx,
        seed=int(config.seed),
        guidance_conditioned=algo.guidance_range is not None,
    )
    abstract = jax.eval_shape(init, teacher)
    state_sh = train_state.state_shardings(abstract, student_tx, critic_tx, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    critic_step, student_step = dmd2.make_update_fns(
        algo,
        student_tx,
        critic_tx,
        optim.ema_gamma(config.distill.ema_rate),
        (state_sh, teacher_sh, batch_sh, sharding.replicated(mesh)),
    )
    return Run(
        algo=algo,
        student_tx=student_tx,
        critic_tx=critic_tx,
        teacher=teacher,
        abstract_state=_with_shardings(abstract, state_sh),
        state_sharding=state_sh,
        teacher_sharding=teacher_sh,
        batch_sharding=batch_sh,
        init=jax.jit(init, in_shardings=(teacher_sh,), out_shardings=state_sh),
        critic_step=critic_step,
        student_step=student_step,
    )


def abstract_teacher(config, net_config) -> dict:
    """The teacher value as ShapeDtypeStructs (config.teacher.dtype storage, no text projection: the plan's data
    arrives projected), for `build` without weights."""
    net = jax.eval_shape(functools.partial(cosmos_dit.init_params, net_config), jax.random.PRNGKey(0))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    net = {k: v for k, v in net.items() if k != "crossattn_proj"}
    return {"net": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, store), net), "text_proj": None}


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def check_source(source, net_config, lambda_frame_chunks: int = 1) -> str | None:
    """The text kind of a record source's data (what its dataset declares, else told by the width); ValueError
    unless every bucket's records fit the network (`cosmos_dit.check_data`, the one check) and its latent frames
    split into `lambda_frame_chunks` equal chunks (docs/algorithm.md §13)."""
    declared = getattr(source, "text_kind", None)
    kinds = set()
    for _, spec, _ in data_format.source_buckets(source):
        kinds.add(cosmos_dit.check_data(net_config, spec.latent_shape, spec.text_shape[-1], declared))
        frames = int(spec.latent_shape[1])
        if frames % lambda_frame_chunks:
            divisors = [k for k in range(1, frames + 1) if frames % k == 0]
            raise ValueError(
                f"distill.lambda_frame_chunks={lambda_frame_chunks} does not divide the data's {frames} latent "
                f"frames: set --config.distill.lambda_frame_chunks to one of {divisors} (1 = one lambda per sample)."
            )
    return kinds.pop() if len(kinds) == 1 else None


def check_projection(source, text_proj, teacher_path: str = "the teacher") -> None:
    """ValueError when `source` holds a projected context made by another teacher's text projection than
    `text_proj` ({"kernel", "bias"}, the run's teacher): its dataset's meta.json records the projection's
    `data.format.projection_fingerprint` (`teacher`), which must match even when the widths do. Sources without
    that record (raw text, in-memory data, datasets written before it) pass."""
    meta = getattr(source, "meta", None) or {}
    made_by = meta.get("teacher") if meta.get("text_kind") == "projected" else None
    if not isinstance(made_by, dict) or not made_by.get("crossattn_proj") or text_proj is None:
        return
    ours = data_format.projection_fingerprint(np.asarray(text_proj["kernel"]), np.asarray(text_proj["bias"]))
    if ours != made_by["crossattn_proj"]:
        where = getattr(source, "directory", "the dataset")
        raise ValueError(
            f"{where} holds a context projected by another teacher ({made_by.get('path')}, crossattn_proj "
            f"{made_by['crossattn_proj'][:19]}) than this run's {teacher_path} (crossattn_proj {ours[:19]}): re-run "
            f"prepare with --teacher {teacher_path}, or train with --config.teacher.path={made_by.get('path')}."
        )
