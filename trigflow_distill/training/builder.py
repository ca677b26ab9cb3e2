"""The one run builder: a config, the teacher and a mesh -> the algorithm, optimizers, abstract and sharded
TrainState, and the jitted updates (`build`). Training, the automatic mesh, the compile-only memory plan and the
restore paths all call it, so they cannot drift apart. Also: loading the teacher into its frozen value
(`load_teacher`) and the one "does this data fit the teacher" check (`check_source`).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.common import sharding
from trigflow_distill.data import format as data_format
from trigflow_distill.methods import rcm, train_state, video2world
from trigflow_distill.models.cosmos_dit import teacher_cache


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


def split_teacher(params):
    """Teacher params -> {"net": params without the text projection, "text_proj": the projection or None}."""
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    return {"net": net, "text_proj": params.get("crossattn_proj")}


def load_teacher(config, workdir):
    """(net_config, teacher) with teacher = {"net", "text_proj"}, converted once and cached (docs/algorithm.md §9)."""
    cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
    net_config, params = teacher_cache.load_teacher(config.teacher.path, cache_dir, **net_options(config.net))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: np.asarray(x).astype(store), params)
    if "crossattn_proj" in params:  # the frozen projection stays fp32: it is applied once per batch
        params["crossattn_proj"] = jax.tree.map(lambda x: x.astype(np.float32), params["crossattn_proj"])
    return net_config, split_teacher(params)


def setup(config, workdir, mesh, loaded=None):
    """Everything the loop needs: (algo, txs, teacher, shardings, abstract state, init fn). loaded: the
    (net_config, teacher) of `load_teacher` when already read (for the mesh choice), else read here."""
    net_config, teacher = load_teacher(config, workdir) if loaded is None else loaded
    algo = rcm.algo_from_config(config, net_config, mesh)  # distill.method: dmd2 or rcm (§14)
    student_tx, critic_tx = train_state.make_optimizers(config)
    teacher_sh = sharding.param_sharding(teacher, mesh)
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
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    init = jax.jit(init, in_shardings=(teacher_sh,), out_shardings=state_sh)
    return algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init


def check_source(source, net_config, teacher) -> None:
    """ValueError unless the records fit the networks: 16-channel latents patchifiable by the DiT (in every
    bucket), text of a width the teacher takes (raw: its projection's input; projected: the context width)."""
    for _, spec, _ in data_format.source_buckets(source):
        c, t, h, w = spec.latent_shape
        if (
            c != net_config.in_channels
            or t % net_config.patch_temporal
            or h % net_config.patch_spatial
            or (w % net_config.patch_spatial)
        ):
            raise ValueError(
                f"the data's latents are {spec.latent_shape}; the teacher needs {net_config.in_channels} "
                f"channels and T, H, W divisible by {net_config.patch_temporal}, "
                f"{net_config.patch_spatial}, {net_config.patch_spatial}."
            )
        video2world.text_width_kind(net_config, teacher, spec.text_shape[-1])
