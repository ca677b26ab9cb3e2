"""Opening a run: check a config, load and convert the teacher, build the sharded pieces the loop needs, and
re-open a finished run's latest checkpoint for inference (export, evaluation, generation: `load_student`,
`load_run`, `restore_params` read only the student weights they need, never the whole TrainState).

docs/algorithm.md §9: the teacher is converted once into <workdir>/teacher_cache (or config.teacher.cache_dir) and
re-used; the run's config is saved as <workdir>/config.json by the trainer and read back by `read_config`.
Workdirs may be local or remote (gs://...): every path here goes through etils.epath.
"""

import hashlib
import json
import math
import os
import time

import ml_collections
from etils import epath

from configs import predict25_4step
from trigflow_distill.common import paths
from trigflow_distill.data import format as data_format
from trigflow_distill.training import checkpoint

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
    "sample",
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
    if paths.is_local(config.teacher.path) and not os.path.exists(config.teacher.path):
        raise FileNotFoundError(f"config.teacher.path={config.teacher.path!r} does not exist.")
    if config.data.kind == "dir" and not config.data.path:
        raise ValueError(
            "config.data.path is empty: point it at a dataset written by "
            "`python -m trigflow_distill.data.cli` (see trigflow_distill/data/__init__.py)."
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
    if d.guidance_conditioned:
        lo_hi = tuple(d.guidance_range)
        if len(lo_hi) != 2 or not all(math.isfinite(float(g)) and float(g) > 0 for g in lo_hi) or lo_hi[0] > lo_hi[1]:
            raise ValueError(
                f"distill.guidance_range={lo_hi} must be two finite scales 0 < lo <= hi, e.g. (1.0, 6.0) (§15)."
            )
    if int(d.lambda_frame_chunks) < 1 or int(d.ema_start) < 0:
        raise ValueError("distill.lambda_frame_chunks must be >= 1 and distill.ema_start >= 0.")
    if d.backward_simulation not in ("fixed", "random"):
        raise ValueError(f"distill.backward_simulation={d.backward_simulation!r}: use 'fixed' or 'random' (§3).")
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


# Fields renamed since runs were saved under the old names: a saved config.json is read under today's names.
RENAMED_FIELDS = {
    "distill.tangent_warmup": "distill.student_warmup",
    "distill.rcm.tangent_ramp": "distill.rcm.tangent_warmup",
}


def default_config() -> ml_collections.ConfigDict:
    """The recipe's defaults (configs/predict25_4step.py `get_config()`): what a field absent from an older run's
    config.json computed (a field is added at the value that keeps the old behaviour)."""
    return predict25_4step.get_config()


def complete_saved(saved: dict, defaults: dict | None = None) -> dict:
    """A saved config dict under today's field names (RENAMED_FIELDS), with the fields it lacks filled from
    `defaults` (None: `default_config()`). Fields the defaults do not know are kept as saved."""
    flat = _flatten(saved)
    for old, new in RENAMED_FIELDS.items():
        if old in flat and new not in flat:
            flat[new] = flat.pop(old)
    defaults = json.loads(default_config().to_json_best_effort()) if defaults is None else defaults
    merged = {**_flatten(defaults), **flat}
    out: dict = {}
    for key, value in merged.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def config_changes(saved: dict, new: dict) -> list[str]:
    """ "key: saved -> new" for every field (dotted) that differs between two config dicts and changes the run
    (fields of RESUME_MAY_CHANGE are left out; `saved` is read through `complete_saved`, so a field added since it
    was written is compared at its default)."""
    a, b = _flatten(complete_saved(saved)), _flatten(new)
    missing = "<absent>"
    keys = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k, missing) != b.get(k, missing)
        and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)
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


TEACHER_SOURCE = "teacher_source.json"  # beside config.json: what file the run's teacher.path held at the first start


def _local_teacher_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".json", ".safetensors")))


def _sha256(name: str) -> str:
    h = hashlib.sha256()
    with open(name, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(path: str, known: dict | None = None) -> dict | None:
    """{"path", "files": {name: {"size", "mtime_ns", "sha256"}}} of a local `.pt` or diffusers folder (its .json and
    .safetensors files); None for hf:// (the Hub revision names the content) and other remote sources. The full
    SHA-256 of each file is read only when the file's size or mtime differs from `known` (an earlier fingerprint),
    so a resume costs a stat (a first start: one read of the teacher, ~2 s per GB on a loaded CPU)."""
    if not paths.is_local(path) or not os.path.exists(path):
        return None
    path = os.path.abspath(path)
    before = (known or {}).get("files") or {}
    files = {}
    for name in _local_teacher_files(path):
        st, rel = os.stat(name), os.path.relpath(name, path) if os.path.isdir(path) else os.path.basename(name)
        old = before.get(rel) or {}
        same_stat = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and "sha256" in old
        sha = old["sha256"] if same_stat else _sha256(name)
        files[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return {"path": path, "files": files}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    a, b = old.get("files") or {}, new.get("files") or {}
    out = []
    for rel in sorted(a.keys() | b.keys()):
        if rel not in a or rel not in b:
            out.append(f"{rel}: {'added' if rel in b else 'removed'}")
        elif (a[rel]["size"], a[rel]["sha256"]) != (b[rel]["size"], b[rel]["sha256"]):
            out.append(
                f"{rel}: {a[rel]['size']} bytes sha256 {a[rel]['sha256'][:12]} -> {b[rel]['size']} bytes sha256 "
                f"{b[rel]['sha256'][:12]}"
            )
    return out


def _check_teacher_source(config, workdir) -> tuple[dict | None, dict | None, str | None]:
    """(record to write, previous record to keep, note) for the teacher file of `config`; ValueError when the file
    at the run's teacher.path holds other contents than at the first start (unless config.allow_config_change)."""
    record_path = epath.Path(workdir) / TEACHER_SOURCE
    try:
        old = json.loads(record_path.read_text()) if record_path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record_path} is corrupted ({e}); delete it to record the teacher file again.") from None
    # Only a local teacher is fingerprinted (teacher_fingerprint); a gs:// or hf:// path is compared as written.
    here = os.path.abspath(config.teacher.path) if paths.is_local(config.teacher.path) else config.teacher.path
    same_path = old is not None and old.get("path") == here
    new = teacher_fingerprint(config.teacher.path, old if same_path else None)
    if new is None or new == old:
        return None, None, None
    if old is None or not same_path:  # a first start, a run from before the record, or a teacher.path change
        return new, old, None
    changes = _fingerprint_changes(old, new)
    if not changes:  # touched or copied back: same contents, new mtimes
        return new, None, None
    if not config.allow_config_change:
        raise ValueError(
            f"the teacher file {config.teacher.path} is not the one {workdir} was started with; resuming would mix "
            f"two runs. Changed: {'; '.join(changes)}. Put the original file back, use a new --workdir, or pass "
            "--config.allow_config_change=True to go on with this file (the old record is kept)."
        )
    return new, old, f"teacher file changed ({'; '.join(changes)}); the previous record is kept beside {record_path}."


def _kept_name(workdir, stem: str) -> epath.Path:
    """<workdir>/<stem>.<UTC time>.json, numbered if taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept, n = epath.Path(workdir) / f"{stem}.{stamp}.json", 1
    while kept.exists():
        kept, n = epath.Path(workdir) / f"{stem}.{stamp}.{n}.json", n + 1
    return kept


def has_checkpoints(workdir) -> bool:
    """Whether `workdir` holds any checkpoint (complete, damaged, set aside or half-written): work a changed config
    would mix with. Without one, config.json and teacher_source.json describe a start that trained nothing."""
    directory = checkpoint.checkpoint_dir(workdir)
    return directory.exists() and any(True for _ in directory.iterdir())


DATASET_SOURCE = "dataset.json"  # beside config.json: the dataset (path, fingerprint) the run's iterator indexes


def dataset_record(source) -> dict | None:
    """{"path", "fingerprint"} of a record source read from a dataset directory (`data.NpyDirSource`: its
    meta.json's `data.format.dataset_fingerprint`); None for in-memory sources (synthetic, toy)."""
    directory = getattr(source, "directory", None)
    if directory is None:
        return None
    return {"path": os.fspath(directory), "fingerprint": data_format.dataset_fingerprint(directory)}


def _check_dataset(config, workdir, dataset: dict | None) -> tuple[dict | None, dict | None, str | None]:
    """(record to write, previous record to keep, note) for the run's dataset; ValueError when a run with
    checkpoints is resumed on a dataset of another fingerprint (its saved iterator position would index other
    records), unless config.allow_config_change. A workdir without checkpoints is fresh: its record is replaced."""
    if dataset is None:
        return None, None, None
    record_path = epath.Path(workdir) / DATASET_SOURCE
    try:
        old = json.loads(record_path.read_text()) if record_path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record_path} is corrupted ({e}); delete it to record the dataset again.") from None
    if old == dataset:
        return None, None, None
    if old is None or old.get("fingerprint") == dataset["fingerprint"] or not has_checkpoints(workdir):
        return dataset, None, None  # a first start, a run from before the record, a moved dataset, or no work yet
    if not config.allow_config_change:
        raise ValueError(
            f"the dataset {dataset['path']} is not the one {workdir} was trained on ({old.get('path')}: fingerprint "
            f"{str(old.get('fingerprint'))[:19]} -> {dataset['fingerprint'][:19]}); the saved iterator position would "
            "index other records. Resume with the original dataset, use a new --workdir, or pass "
            "--config.allow_config_change=True to go on with this dataset (the old record is kept)."
        )
    return dataset, old, f"dataset changed ({old.get('path')} -> {dataset['path']}); the previous record is kept."


def _write_dataset_record(workdir, record: dict | None, previous: dict | None, write: bool) -> None:
    if not write or record is None:
        return
    if previous is not None:
        paths.write_text_atomic(_kept_name(workdir, "dataset"), json.dumps(previous, indent=2))
    paths.write_text_atomic(epath.Path(workdir) / DATASET_SOURCE, json.dumps(record, indent=2))


def resume_config(config, workdir, write: bool = True, dataset: dict | None = None) -> str | None:
    """Check `config` against the one saved in `workdir` and save it as <workdir>/config.json (if `write`).

    A config that differs in a field that changes the run (not in RESUME_MAY_CHANGE) is refused with the fields
    listed, before anything is written, unless config.allow_config_change. Whenever the saved config differs, it
    is kept as config.<UTC time>.json. The teacher file itself (sizes and SHA-256 of a local `.pt` or diffusers
    folder, `teacher_fingerprint`) is recorded as <workdir>/teacher_source.json at the first start; other contents
    at the same path are refused the same way, and so is another dataset (`dataset`: `dataset_record(source)`,
    recorded as <workdir>/dataset.json). A workdir without checkpoints is fresh: a start that failed before
    its first checkpoint (bad data, a typo) left records nothing depends on, so the corrected rerun replaces them.
    Returns a note for the log when something changed, else None.
    """
    saved = read_saved_config(workdir)
    new = json.loads(config.to_json_best_effort())
    fresh = saved is not None and not has_checkpoints(workdir)
    checked = _allowing_change(config) if fresh else config  # config.json keeps the config as given
    data_record, data_previous, data_note = _check_dataset(config, workdir, dataset)  # may refuse: before any write
    if saved == new:
        record, previous, teacher_note = _check_teacher_source(checked, workdir)
        _write_teacher_record(workdir, record, previous, write)
        _write_dataset_record(workdir, data_record, data_previous, write)
        return "; ".join(n for n in (teacher_note, data_note) if n) or None
    note = None
    if saved is not None:
        changes = config_changes(saved, new)
        if changes and not checked.allow_config_change:
            raise ValueError(
                f"{workdir} holds a run with another config; resuming would mix two runs. Changed: "
                f"{'; '.join(changes)}. Resume with the saved config ({epath.Path(workdir) / 'config.json'}), use "
                "a new --workdir, or pass --config.allow_config_change=True to go on with the new config (the old "
                "one is kept)."
            )
    record, previous, teacher_note = _check_teacher_source(checked, workdir)  # may refuse: before any write
    if saved is not None:
        kept = _kept_name(workdir, "config")
        if write:
            paths.write_text_atomic(kept, json.dumps(saved, indent=2))
        what = "; ".join(changes) if changes else "only fields a resume may change"
        note = (
            f"{workdir} has no checkpoint: the config of an earlier start that trained nothing is replaced ({what})"
            if fresh
            else f"config changed ({what})"
        ) + f"; the previous config is kept as {kept}."
    if write:
        paths.write_text_atomic(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2))
    _write_teacher_record(workdir, record, previous, write)
    _write_dataset_record(workdir, data_record, data_previous, write)
    return "; ".join(n for n in (note, teacher_note, data_note) if n) or None


def _allowing_change(config) -> ml_collections.ConfigDict:
    """`config` with allow_config_change set (for the checks only: config.json keeps what the user gave)."""
    checked = ml_collections.ConfigDict(config.to_dict())
    checked.allow_config_change = True
    return checked


def _write_teacher_record(workdir, record: dict | None, previous: dict | None, write: bool) -> None:
    if not write or record is None:
        return
    if previous is not None:
        paths.write_text_atomic(_kept_name(workdir, "teacher_source"), json.dumps(previous, indent=2))
    paths.write_text_atomic(epath.Path(workdir) / TEACHER_SOURCE, json.dumps(record, indent=2))


def read_config(workdir) -> ml_collections.ConfigDict:
    """The config a training run saved as <workdir>/config.json (local or gs://)."""
    saved = read_saved_config(workdir)  # a damaged file is a ValueError naming it
    if saved is None:
        path = epath.Path(workdir) / "config.json"
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (run main.py first).")
    return ml_collections.ConfigDict(complete_saved(saved))
