"""Opening a run: check a config, load and convert the teacher, build the sharded pieces the loop needs, and
re-open a finished run's latest checkpoint for inference (export, evaluation, generation: `load_student`,
`load_run`, `restore_params` read only the student weights they need, never the whole TrainState).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used; the run's config is saved as <workdir>/config.json by the trainer and read back by `read_config`.
Workdirs may be local or remote (gs://...): every path here goes through etils.epath.
"""

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill import checkpoint, data, distributed, dmd2, lock, networks, rcm, sharding, teacher_cache
from trigflow_distill.errors import WorkdirLocked

# Config fields a resume may change: how long, how often, where and with which memory options the run goes, never
# what it computes. Any other difference (shapes, batch, optimizers, teacher, data, distillation) is refused.
RESUME_MAY_CHANGE = (
    "total_steps",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_consecutive_skips",
    "allow_config_change",
    "eval",
    "mesh",
    "net.remat",
    "net.attention",
    "net.attention_block_size",
    "teacher.cache_dir",
    "wandb",
)


def validate_config(config):
    """Clear errors for the mistakes a user can make before anything heavy starts."""
    if not config.teacher.path:
        raise ValueError(
            "config.teacher.path is empty. The real recipe distills the Cosmos Predict2.5 2B teacher: download "
            "base/pre-trained/<uuid>_ema_bf16.pt from https://huggingface.co/nvidia/Cosmos-Predict2.5-2B and pass "
            "--config.teacher.path=/path/to/that.pt (or use configs/predict25_4step.py:tiny for the CPU demo)."
        )
    if "://" not in str(config.teacher.path) and not os.path.exists(config.teacher.path):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path!r} does not exist.")
    if config.data.kind == "dir" and not config.data.path:
        raise ValueError(
            "config.data.path is empty: point it at a dataset written by "
            "`python -m trigflow_distill.data.write` (see trigflow_distill/data/__init__.py)."
        )
    for name in (
        "total_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_consecutive_skips",
        "data.batch_size",
    ):
        if _get(config, name) < 1:
            raise ValueError(f"config.{name}={_get(config, name)} must be >= 1.")
    if config.sample_every < 0:
        raise ValueError(f"config.sample_every={config.sample_every} must be >= 0 (0: no sample pictures).")
    for section in ("student_optim", "critic_optim"):
        for field in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "warmup", "decay_steps"):
            value = float(config[section][field])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"config.{section}.{field}={config[section][field]} must be a finite number >= 0.")
        if not config[section].b1 < 1 or not config[section].b2 < 1:
            raise ValueError(f"config.{section}.b1 and .b2 must be < 1.")
    d = config.distill
    for field in ("guidance", "timestep_shift", "ema_rate"):
        if not math.isfinite(float(d[field])) or float(d[field]) <= 0:
            raise ValueError(f"config.distill.{field}={d[field]} must be a finite number > 0.")
    if d.get("guidance_conditioned", False):
        lo_hi = tuple(d.guidance_range)
        if len(lo_hi) != 2 or not all(math.isfinite(float(g)) and float(g) > 0 for g in lo_hi) or lo_hi[0] > lo_hi[1]:
            raise ValueError(
                f"distill.guidance_range={lo_hi} must be two finite scales 0 < lo <= hi, e.g. (1.0, 6.0) (§15)."
            )
    if int(d.get("lambda_frame_chunks", 1)) < 1 or int(d.get("ema_start", 0)) < 0:
        raise ValueError("distill.lambda_frame_chunks must be >= 1 and distill.ema_start >= 0.")
    if d.student_update_freq < 1 or d.num_student_steps < 1:
        raise ValueError("distill.student_update_freq and distill.num_student_steps must be >= 1.")
    if len(d.cond_frame_probs) < 1 or min(d.cond_frame_probs) < 0 or abs(sum(d.cond_frame_probs) - 1) > 1e-6:
        raise ValueError(f"distill.cond_frame_probs={tuple(d.cond_frame_probs)} must be probabilities summing to 1.")
    if config.teacher.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"teacher.dtype={config.teacher.dtype!r}: use 'float32' or 'bfloat16'.")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Fields added after runs were saved without them, with the value that computes what those runs computed (None: any
# value, the field is read only when another one is switched on). Absent in a saved config and at that value in the
# new one, they are no change: a run saved by an older version resumes.
ADDED_FIELDS = {"distill.guidance_conditioned": False, "distill.guidance_range": None}


def config_changes(saved: dict, new: dict) -> list[str]:
    """ "key: saved -> new" for every field (dotted) that differs between two config dicts and changes the run
    (fields of RESUME_MAY_CHANGE are left out, and ADDED_FIELDS absent from `saved` at their old-behaviour value)."""
    a, b = _flatten(saved), _flatten(new)
    missing = "<absent>"

    def added(k):
        return k not in a and k in ADDED_FIELDS and ADDED_FIELDS[k] in (None, b.get(k))

    keys = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k, missing) != b.get(k, missing)
        and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)
        and not added(k)
    )
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in keys]


def read_saved_config(workdir) -> dict | None:
    """The config dict saved in <workdir>/config.json, None if there is none; ValueError naming the file if it is
    damaged."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is corrupted ({e}); restore it from a config.<time>.json beside it or from a "
            "backup, or start a new --workdir."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path} is corrupted (not a JSON object); restore it from a config.<time>.json beside it "
            "or from a backup, or start a new --workdir."
        )
    return saved


def resume_config(config, workdir, write: bool = True) -> str | None:
    """Check `config` against the one saved in `workdir` and save it as <workdir>/config.json (if `write`).

    A config that differs in a field that changes the run (not in RESUME_MAY_CHANGE) is refused with the fields
    listed, before anything is written, unless config.allow_config_change. Whenever the saved config differs, it
    is kept as config.<UTC time>.json. Returns a note for the log when the config changed, else None.
    """
    saved = read_saved_config(workdir)
    new = json.loads(config.to_json_best_effort())
    if saved == new:
        return None
    note = None
    if saved is not None:
        changes = config_changes(saved, new)
        if changes and not config.get("allow_config_change", False):
            raise ValueError(
                f"{workdir} holds a run with another config; resuming would mix two runs. Changed: "
                f"{'; '.join(changes)}. Resume with the saved config ({epath.Path(workdir) / 'config.json'}), use "
                "a new --workdir, or pass --config.allow_config_change=True to go on with the new config (the old "
                "one is kept)."
            )
        kept = epath.Path(workdir) / f"config.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        n = 1
        while kept.exists():
            kept, n = kept.with_name(f"config.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{n}.json"), n + 1
        if write:
            _write_atomic(kept, json.dumps(saved, indent=2))
        note = (
            f"config changed ({'; '.join(changes) if changes else 'only fields a resume may change'}); the "
            f"previous config is kept as {kept}."
        )
    if write:
        _write_atomic(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2))
    return note


def _write_atomic(path: epath.Path, text: str) -> None:
    """Write `text` so that a reader sees the old or the new file, never half of one (local: rename)."""
    if "://" in str(path):
        path.write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_teacher(config, workdir):
    """(net_config, teacher) with teacher = {"net", "text_proj"}, converted once and cached (docs/algorithm.md §9)."""
    cache_dir = config.teacher.cache_dir or os.path.join(workdir, "teacher_cache")
    net_config, params = teacher_cache.load_teacher(config.teacher.path, cache_dir, **dmd2.net_options(config.net))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    params = jax.tree.map(lambda x: np.asarray(x).astype(store), params)
    if "crossattn_proj" in params:  # the frozen projection stays fp32: it is applied once per batch
        params["crossattn_proj"] = jax.tree.map(lambda x: x.astype(np.float32), params["crossattn_proj"])
    return net_config, dmd2.split_teacher(params)


def setup(config, workdir, mesh, loaded=None):
    """Everything the loop needs: (algo, txs, teacher, shardings, abstract state, init fn). loaded: the
    (net_config, teacher) of `load_teacher` when already read (for the mesh choice), else read here."""
    net_config, teacher = load_teacher(config, workdir) if loaded is None else loaded
    algo = rcm.algo_from_config(config, net_config, mesh)  # distill.method: dmd2 or rcm (§14)
    student_tx, critic_tx = dmd2.make_optimizers(config)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    teacher = sharding.put_global(teacher, teacher_sh)
    init = functools.partial(
        dmd2.init_state,
        student_tx=student_tx,
        critic_tx=critic_tx,
        seed=int(config.seed),
        guidance_conditioned=algo.guidance_range is not None,
    )
    abstract = jax.eval_shape(init, teacher)
    state_sh = dmd2.state_shardings(abstract, student_tx, critic_tx, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    init = jax.jit(init, in_shardings=(teacher_sh,), out_shardings=state_sh)
    return algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init


def read_config(workdir) -> ml_collections.ConfigDict:
    """The config a training run saved as <workdir>/config.json (local or gs://)."""
    saved = read_saved_config(workdir)  # a damaged file is a ValueError naming it
    if saved is None:
        path = epath.Path(workdir) / "config.json"
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (run main.py first).")
    return ml_collections.ConfigDict(saved)


def restore_params(
    workdir, names=("student_ema",), mesh=None, step: int | None = None, group_bytes: int = 1 << 30
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
    """
    directory = checkpoint.checkpoint_dir(workdir)
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}: the run has not saved one yet.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {directory}; there are {sorted(steps)}.")
    path = directory / str(step) / "state"
    saved = ocp.PyTreeCheckpointHandler().metadata(path).tree
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{path} has no {missing}; a TrainState checkpoint has {sorted(saved)}.")
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
    return int(step), restored


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
    """(config, net_config, params) of a run's distilled student, ready for export and generation.

    params: the EMA (which="ema") or raw (which="raw") student of the latest checkpoint (`restore_params`: only
    those weights are read; numpy on the host, or sharded over `mesh`) plus the teacher's frozen text projection
    `crossattn_proj` (fp32), so it is a complete Cosmos DiT tree. net_config is the teacher's architecture with the
    run's compute options (config.net), `net_overrides` on top. The teacher comes from its converted cache
    (config.teacher.cache_dir or <workdir>/teacher_cache; converted again if missing); locally only the projection
    is read from it.
    """
    if which not in STUDENTS:
        raise ValueError(f"which={which!r}: use one of {sorted(STUDENTS)}.")
    config = read_config(workdir)
    _, restored = restore_params(workdir, (STUDENTS[which],), mesh)
    cache_dir = config.teacher.cache_dir or str(epath.Path(workdir) / "teacher_cache")
    net_config, teacher = teacher_cache.load_teacher(
        config.teacher.path, cache_dir, **dmd2.net_options(config.net, **net_overrides)
    )
    params = dict(restored[STUDENTS[which]])
    if "crossattn_proj" in teacher:
        proj = jax.tree.map(lambda x: np.array(x, np.float32), teacher["crossattn_proj"])
        params["crossattn_proj"] = proj if mesh is None else jax.device_put(proj, sharding.replicated(mesh))
    # A guidance-conditioned student (§15) has one more leaf than its teacher: its config says so (export sizes by it).
    net_config = dataclasses.replace(net_config, guidance_embedder=networks.GUIDANCE_EMBEDDER in params)
    return config, net_config, params


def load_run(workdir, students=("student_ema", "student")):
    """(config, net_config, teacher_params, student_params, ema_params) of the latest checkpoint in `workdir`, for
    evaluation: the full teacher (with its text projection `crossattn_proj`) and the students named in `students`
    (a partial restore into host memory, see `restore_params`; no optimizer state, critic or TrainState is built).
    A student not asked for is None.
    """
    config = read_config(workdir)
    _, restored = restore_params(workdir, students)
    net_config, teacher = load_teacher(config, workdir)
    teacher_params = dict(teacher["net"])
    if teacher["text_proj"] is not None:
        teacher_params["crossattn_proj"] = teacher["text_proj"]
    return config, net_config, teacher_params, restored.get("student"), restored.get("student_ema")


def open_workdir(workdir) -> epath.Path:
    """The workdir as an epath (created); ValueError when it is a file or cannot be created."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {workdir} is a file; give a directory (new, or a run to resume).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --workdir {workdir} ({e}); choose a writable location.") from None
    return path


def acquire_lock(workdir: epath.Path) -> lock.WorkdirLock | None:
    """Process 0 takes the workdir's lock (the other processes of the run share it); every process stops if it
    cannot. Returns the lock (None on other processes)."""
    held, error = None, None
    if distributed.is_main_process():
        try:
            held = lock.WorkdirLock(workdir)
            note = held.acquire()
            if note:
                print(note, flush=True)
        except WorkdirLocked as e:
            held, error = None, e
        except OSError as e:
            held, error = (
                None,
                ValueError(
                    f"--workdir {workdir} is not writable ({e}); choose a writable location or fix its permissions."
                ),
            )
    if not distributed.is_single_process():
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirLocked(f"process 0 could not lock {workdir}; see its log.")
    if error is not None:
        raise error
    return held


def check_source(source, net_config, teacher) -> None:
    """ValueError unless the records fit the networks: 16-channel latents patchifiable by the DiT (in every
    bucket), text of a width the teacher takes (raw: its projection's input; projected: the context width)."""
    for _, spec, _ in data.records.source_buckets(source):
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
        dmd2.text_width_kind(net_config, teacher, spec.text_shape[-1])
