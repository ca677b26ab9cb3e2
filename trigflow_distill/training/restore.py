"""Opening a run: check a config, load and convert the teacher, build the sharded pieces the loop needs, and
re-open a finished run's latest checkpoint for inference (export, evaluation, generation: `load_student`,
`load_run`, `restore_params` read only the student weights they need, never the whole TrainState).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used; the run's config is saved as <workdir>/config.json by the trainer and read back by `read_config`.
Workdirs may be local or remote (gs://...): every path here goes through etils.epath.
"""

import dataclasses
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from trigflow_distill.common import sharding
from trigflow_distill.common.errors import CheckpointError
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import teacher_cache
from trigflow_distill.training import builder, checkpoint, run_config


def restore_params(
    workdir,
    names=("student_ema",),
    mesh=None,
    step: int | None = None,
    group_bytes: int = 1 << 30,
    report=checkpoint.report,
) -> tuple[int, dict]:
    """(step, {name: params}) of the TrainState fields `names` (e.g. "student_ema", "student") of the latest (or
    the given) checkpoint in <workdir>/checkpoints.

    A partial Orbax restore: only those arrays are read (for 2B, the EMA is 2.06e9 fp32 params = 8.2 GB of the
    TrainState's ~56 GB), shapes come from the checkpoint's own metadata, so no teacher, optimizer state or
    TrainState is built. mesh None: numpy arrays in host memory; else jax arrays FSDP-sharded over `mesh` as the
    trainer shards params (`sharding.param_sharding`; every host reads only its shards). Leaves are read in groups
    of about `group_bytes`: a TensorStore read holds a buffer as large as what it reads until it returns, so one
    call for everything would peak at twice the result; in groups the peak is the result plus one group (2B EMA on
    the host: 8.2 GB + its largest leaf, 1.9 GB, instead of ~16.5 GB).

    What is read is checked against the checksums saved with the checkpoint (`checkpoint.verify`). Without `step`,
    a checkpoint that does not read back intact is skipped with a `report` line (not renamed: readers never move a
    run's files) and the previous one is used, as the trainer's resume does; a given `step` that does not read back
    is a CheckpointError.
    """
    directory = checkpoint.checkpoint_dir(workdir)
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}: the run has not saved one yet.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {directory}; there are {sorted(steps)}.")
    tried = [step] if step is not None else sorted(steps, reverse=True)
    skipped = []
    for candidate in tried:
        path = directory / str(candidate) / "state"
        try:
            saved = ocp.PyTreeCheckpointHandler().metadata(path).tree
            missing = [n for n in names if n not in saved]
            if not missing:
                restored = _read_params(path, saved, names, mesh, group_bytes)
                sums = checkpoint.read_checksums(directory / str(candidate))
                bad = [] if sums is None else [b for n in names for b in checkpoint.verify(restored[n], sums, f"{n}/")]
                if bad:
                    raise ValueError(checkpoint.mismatch_message(bad))
        except Exception as e:  # noqa: BLE001 - TensorStore raises plain Exception for missing/truncated files
            why = f"checkpoint {candidate} in {directory} does not read back intact ({checkpoint.short_error(e)})"
            if step is not None:
                raise CheckpointError(f"{why}; choose another step (there are {sorted(steps)}).") from None
            report(f"{why}; trying the previous one.")
            skipped.append(candidate)
            continue
        if missing:  # a wrong name, not damage
            raise ValueError(f"{path} has no {missing}; a TrainState checkpoint has {sorted(saved)}.")
        if sums is None:
            report(f"checkpoint {candidate} in {directory} {checkpoint.NOT_VERIFIED}.")
        if skipped:
            report(f"skipped unreadable checkpoint(s) {skipped}; read step {candidate}.")
        return int(candidate), restored
    raise CheckpointError(
        f"none of the checkpoints {tried} in {directory} reads back intact (see the messages above); restore the "
        "folder from a backup."
    )


def _read_params(path, saved, names, mesh, group_bytes) -> dict:
    """The `names` subtrees of the TrainState checkpoint item `path` (its metadata tree `saved`), group by group."""
    abstract = {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[n]) for n in names}
    if mesh is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    else:
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), sharding.param_sharding(abstract, mesh))
    restored = {}
    with ocp.PyTreeCheckpointer() as checkpointer:
        for group in _leaf_groups(abstract, group_bytes):
            part = checkpointer.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=_subtree(abstract, group), restore_args=_subtree(restore_args, group), partial_restore=True
                ),
            )
            restored = _merge(restored, part)
    return restored


def _leaf_groups(abstract: dict, group_bytes: int) -> list:
    """Key paths of `abstract`'s leaves in consecutive groups of at most `group_bytes` (or one leaf); a tree with
    non-dict nodes (e.g. optimizer-state tuples) is one group."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    if not all(isinstance(k, jax.tree_util.DictKey) for p, _ in leaves for k in p):
        return [None]
    groups, size = [[]], 0
    for p, leaf in leaves:
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tuple(k.key for k in p))
        size += nbytes
    return groups


def _subtree(tree, paths):
    """The nested dict holding only `paths` of `tree` (paths None: all of it)."""
    if paths is None:
        return tree
    out = {}
    for path in paths:
        node, value = out, tree
        for k in path[:-1]:
            node, value = node.setdefault(k, {}), value[k]
        node[path[-1]] = value[path[-1]]
    return out


def _merge(a: dict, b: dict) -> dict:
    """Nested dicts a and b (disjoint leaves) in one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


STUDENTS = {"ema": "student_ema", "raw": "student"}


def load_student(workdir, which: str = "ema", mesh=None, **net_overrides):
    """(config, net_config, student): `load_student_at` without the step."""
    return load_student_at(workdir, which, mesh, **net_overrides)[1:]


def load_student_at(workdir, which: str = "ema", mesh=None, **net_overrides):
    """(step, config, net_config, student) of a run's distilled student, ready for export and generation.

    student = {"net", "text_proj"} (the teacher value's form): the EMA (which="ema") or raw (which="raw") student
    of the latest checkpoint (`restore_params`: only those weights are read; numpy on the host, or sharded over
    `mesh`) and the teacher's frozen text projection (fp32; replicated over `mesh`), or None for a teacher without
    one. net_config is the teacher's architecture with the run's compute options (config.net), `net_overrides` on
    top. The teacher comes from its converted cache
    (config.teacher.cache_dir or <workdir>/teacher_cache; converted again if missing); locally only the projection
    is read from it.
    """
    if which not in STUDENTS:
        raise ValueError(f"which={which!r}: use one of {sorted(STUDENTS)}.")
    config = run_config.read_config(workdir)
    step, restored = restore_params(workdir, (STUDENTS[which],), mesh)
    cache_dir = config.teacher.cache_dir or str(epath.Path(workdir) / "teacher_cache")
    net_config, teacher = teacher_cache.load_teacher(
        config.teacher.path, cache_dir, **builder.net_options(config.net, **net_overrides)
    )
    net = dict(restored[STUDENTS[which]])
    proj = None
    if "crossattn_proj" in teacher:
        proj = jax.tree.map(lambda x: np.array(x, np.float32), teacher["crossattn_proj"])
        proj = proj if mesh is None else jax.device_put(proj, sharding.replicated(mesh))
    # A guidance-conditioned student (§15) has one more leaf than its teacher: its config says so (export sizes by it).
    net_config = dataclasses.replace(net_config, guidance_embedder=cosmos_dit.GUIDANCE_EMBEDDER in net)
    return step, config, net_config, {"net": net, "text_proj": proj}


def load_run(workdir, students=("student_ema", "student")):
    """(config, net_config, teacher, student_params, ema_params) of the latest checkpoint in `workdir`, for
    evaluation: the teacher value {"net", "text_proj"} (`builder.load_teacher`) and the students named in
    `students` (a partial restore into host memory, see `restore_params`; no optimizer state, critic or TrainState
    is built). A student not asked for is None.
    """
    config = run_config.read_config(workdir)
    _, restored = restore_params(workdir, students)
    net_config, teacher = builder.load_teacher(config, workdir)
    return config, net_config, teacher, restored.get("student"), restored.get("student_ema")
