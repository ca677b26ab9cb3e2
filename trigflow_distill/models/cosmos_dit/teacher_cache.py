"""The teacher cache: a `.pt` / diffusers teacher converted once into a shared cache folder and re-used.

An entry is a converted folder (`convert`'s format) named after the source and its `source_key` (sizes, mtimes and a
header hash of its files), so a changed source gets a new entry. One process of a job converts; the others wait for
the entry's COMPLETE marker. An incomplete or corrupted entry (a leaf whose bytes no longer match the CRC-32 recorded
at conversion included), or one converted before those were recorded, is converted again, saying so. Local entries
are read back as read-only memory maps (`convert.load_converted`): a cache hit copies nothing until the caller casts or
places them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import jax
from etils import epath

from trigflow_distill.models.cosmos_dit import DiTConfig, convert

_HASH_BYTES = 1 << 20
WAIT_TIMEOUT_S = 1800.0  # how long processes > 0 wait for process 0's conversion (TRIGFLOW_TEACHER_WAIT_S)


def source_key(path: str | os.PathLike) -> str:
    """Cache key of a local `.pt` file or diffusers folder (`sources.resolve` has fetched hf:// sources): sizes,
    mtimes and a hash of each file's first MiB."""
    path = os.path.abspath(os.fspath(path))
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".json", ".safetensors"))
        )
    )
    h = hashlib.sha256()
    for name in files:
        st = os.stat(name)
        h.update(f"{os.path.relpath(name, path)}:{st.st_size}:{st.st_mtime_ns}:".encode())
        with open(name, "rb") as f:
            h.update(f.read(_HASH_BYTES))
    return h.hexdigest()[:20]


def load_teacher(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    prefix: str = "auto",
    progress: bool = True,
    *,
    process_index: int | None = None,
    num_processes: int | None = None,
    wait_timeout_s: float | None = None,
    poll_s: float = 0.5,
    **config_overrides,
) -> tuple[DiTConfig, dict]:
    """(net_config, params) of a `.pt` or diffusers teacher (local or `hf://`), converted once into `cache_dir`
    (local or `gs://`, shared by all hosts) and re-used while the source's size, mtime and header hash are unchanged.

    One conversion per job: process 0 (`process_index`, default `jax.process_index()`) converts; the others wait
    for the entry's COMPLETE marker (at most `wait_timeout_s`, default TRIGFLOW_TEACHER_WAIT_S or 1800 s). An
    incomplete or corrupted entry is converted again by process 0, saying so. A conversion of a source of at least
    64 MiB shows a progress bar unless `progress=False`.
    """
    local = convert.local_source(path)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if num_processes is None else num_processes
    name = os.path.basename(os.path.normpath(local))
    entry = epath.Path(cache_dir) / f"{name}-{prefix.strip('.') or 'noprefix'}-{source_key(local)}"
    if index == 0 or count == 1:
        problem = convert.check_converted(entry, require_hashes=True)
        if problem is None:
            try:
                return convert.load_converted(entry, **config_overrides)
            except (OSError, ValueError) as e:
                problem = f"{type(e).__name__}: {e}"
        if entry.exists():
            print(f"teacher cache {entry} is incomplete or corrupted ({problem}); converting again", file=sys.stderr)
        else:
            print(f"converting teacher {path} into {entry}", file=sys.stderr)
        convert.convert(local, entry, prefix=prefix, overwrite=True, progress=progress)
        return convert.load_converted(entry, **config_overrides)

    timeout = (
        wait_timeout_s
        if wait_timeout_s is not None
        else float(os.environ.get("TRIGFLOW_TEACHER_WAIT_S", WAIT_TIMEOUT_S))
    )
    deadline, failed_marker, error = time.monotonic() + timeout, None, None
    while True:
        marker = convert.complete_marker(entry)
        if marker is not None and marker != failed_marker:
            try:
                return convert.load_converted(entry, **config_overrides)
            except (OSError, ValueError) as e:  # process 0 may be replacing a corrupted entry: wait for the new one
                failed_marker, error = marker, e
        if time.monotonic() > deadline:
            why = f"the entry there is unreadable ({error})" if error else f"no {convert.COMPLETE} marker appeared"
            raise TimeoutError(
                f"process {index}: waited {timeout:.0f} s for process 0 to convert the teacher into {entry}, but "
                f"{why}; check process 0's log and that teacher.cache_dir is shared by all hosts (e.g. under a gs:// "
                "workdir); raise TRIGFLOW_TEACHER_WAIT_S for slow conversions"
            )
        time.sleep(poll_s)
