"""Opening a run: check a config, load and convert the teacher, build the sharded pieces the loop needs, and
re-open a finished run's latest checkpoint (for export and evaluation).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used; the run's config is saved as <workdir>/config.json by the trainer and read back by `load_run`.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trigflow_distill import checkpoint, convert, dmd2, sharding


def validate_config(config):
    """Clear errors for the mistakes a user can make before anything heavy starts."""
    if not config.teacher.path:
        raise ValueError(
            "config.teacher.path is empty. The real recipe distills the Cosmos Predict2.5 2B teacher: download "
            "base/pre-trained/<uuid>_ema_bf16.pt from https://huggingface.co/nvidia/Cosmos-Predict2.5-2B and pass "
            "--config.teacher.path=/path/to/that.pt (or use configs/predict25_4step.py:tiny for the CPU demo).")
    if not os.path.exists(config.teacher.path):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path!r} does not exist.")
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


def load_teacher(config, workdir):
    """(net_config, teacher) with teacher = {"net", "text_proj"}, converted once and cached (docs/algorithm.md §9)."""
    cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
    net_config, params = convert.load_teacher(config.teacher.path, cache_dir, **dmd2.net_options(config.net))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: np.asarray(x).astype(store), params)
    if "crossattn_proj" in params:  # the frozen projection stays fp32: it is applied once per batch
        params["crossattn_proj"] = jax.tree.map(lambda x: x.astype(np.float32), params["crossattn_proj"])
    return net_config, dmd2.split_teacher(params)


def setup(config, workdir, mesh):
    """Everything the loop needs: (algo, txs, teacher, shardings, abstract state, init fn)."""
    net_config, teacher = load_teacher(config, workdir)
    algo = dmd2.algo_from_config(config, net_config, mesh)
    student_tx, critic_tx = dmd2.make_optimizers(config)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    teacher = sharding.put_global(teacher, teacher_sh)
    init = functools.partial(dmd2.init_state, student_tx=student_tx, critic_tx=critic_tx, seed=int(config.seed))
    abstract = jax.eval_shape(init, teacher)
    state_sh = dmd2.state_shardings(abstract, student_tx, critic_tx, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    init = jax.jit(init, in_shardings=(teacher_sh,), out_shardings=state_sh)
    return algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init


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
    state, _ = checkpoint.restore_latest(manager, abstract)
    if state is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}.")
    teacher_params = dict(teacher["net"])
    if teacher["text_proj"] is not None:
        teacher_params["crossattn_proj"] = teacher["text_proj"]
    return config, algo.net_config, teacher_params, state.student, state.student_ema
