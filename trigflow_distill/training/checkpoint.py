"""Orbax checkpoints of the train state and the data iterator: periodic, keep-last-K, async, atomic, confirmed.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items written together: `state` (the TrainState
pytree, StandardSave: every host writes its own shards) and `data` (the grain iterator state as JSON; it is the
same on every process, see `data.pipeline`, so a checkpoint resumes on any process count). Orbax writes into a
temporary directory and renames it when complete, so a save interrupted by a crash is never picked up.

The trainer saves through a `Saver`: it refuses to save a state with non-finite values, checks that the folder
can be written before every save (an unwritable folder otherwise stalls Orbax for minutes), and reports
"checkpoint saved at step N" only once Orbax has committed step N; a failed save raises CheckpointError naming
the last committed step. `restore_latest` falls back to the newest checkpoint that reads back completely.

Orbax stores no checksums, and a flipped bit in its compressed array files mostly decodes to wrong numbers without
an error. So every save also writes a third item, `checksums`: per leaf of the state two 32-bit sums of its raw
words (plain, and weighted by 2i+1 at flat index i, so any single flipped bit changes both), computed on the devices
before the save and checked after every restore (`verify`). A mismatch is damage like a truncated file. A checkpoint
written before checksums existed is restored and reported "not verified".
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill.common import distributed, paths
from trigflow_distill.common.errors import CheckpointError, TrainingStopped


def checkpoint_dir(workdir) -> epath.Path:
    """`<workdir>/checkpoints` (absolute for local paths; gs:// and other remote paths as given)."""
    workdir = str(workdir)
    return epath.Path(os.path.abspath(workdir) if paths.is_local(workdir) else workdir) / "checkpoints"


def make_manager(
    workdir, max_to_keep: int = 3, save_interval_steps: int = 1, enable_async: bool = True
) -> ocp.CheckpointManager:
    """CheckpointManager over `<workdir>/checkpoints` (created). `save` writes exactly the steps divisible by
    `save_interval_steps` (and any step when JAX reports a preemption, or when forced); leftovers of interrupted
    saves are deleted at start."""
    if max_to_keep < 1 or save_interval_steps < 1:
        raise ValueError(f"max_to_keep ({max_to_keep}) and save_interval_steps ({save_interval_steps}) must be >= 1.")
    policies = ocp.checkpoint_managers
    # Orbax's default policy also saves the first step it sees; saving on the interval only keeps runs regular.
    when = policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_decision_policy=when,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=enable_async,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    """Save `state` (pytree of jax arrays) and `data_iterator.get_state()` (its position now) as `step`.

    Returns whether a save was started (False between `save_interval_steps`). With async checkpointing the
    arrays are copied off the devices before this returns, so `state` may be donated right after. Nothing is
    confirmed here: use a `Saver` (or `wait_until_finished`) for that.
    """
    if not (force or manager.should_save(int(step))):
        return False
    items = {"state": ocp.args.StandardSave(state), CHECKSUMS: ocp.args.JsonSave(checksums(state))}
    if data_iterator is not None:
        items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    return manager.save(int(step), args=ocp.args.Composite(**items), force=True)


# ----------------------------------------------------------------------------------------------------- checksums
CHECKSUMS = "checksums"  # the Composite item: {leaf name: [sum, weighted sum]} of the state's raw words
_NP_CHUNK = 1 << 20  # host leaves are summed in chunks of this many elements (temporaries of ~20 MiB)


def leaf_name(path) -> str:
    """'student_ema/net/blocks/...': the same name for a TrainState field and a dict key of that name, so a partial
    restore ({name: subtree}) finds its leaves' checksums."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _words(x):
    """x's raw bits as uint32 (narrower types widened; 8-byte elements folded: both halves count)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return w[..., 0] + w[..., 1] * jnp.uint32(0x9E3779B1)
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _leaf_sums(x):
    # The flat index from per-axis iotas: a reshape of a sharded leaf could gather it; sums mod 2**32 are exact in
    # any reduction order, so every mesh gives the same numbers.
    w = _words(x)
    index, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for axis in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= w.shape[axis]
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])


_device_sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def _host_sums(a: np.ndarray) -> list[int]:
    """`_leaf_sums` of a host array, in numpy (restore_params reads into host memory)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        w = a.astype(np.uint32).reshape(-1)
    elif a.dtype.itemsize == 8:
        pair = a.reshape(-1).view(np.uint32).reshape(-1, 2)
        w = pair[:, 0] + pair[:, 1] * np.uint32(0x9E3779B1)
    else:
        w = a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])
    plain = weighted = 0
    for start in range(0, w.size, _NP_CHUNK):
        part = w[start : start + _NP_CHUNK].astype(np.uint32)
        odd = 2 * (np.arange(start, start + part.size, dtype=np.uint64) % (1 << 32)).astype(np.uint32) + 1
        plain += int(part.sum(dtype=np.uint32))
        weighted += int((part * odd).sum(dtype=np.uint32))
    return [plain % (1 << 32), weighted % (1 << 32)]


def checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf name: [sum, weighted sum]} of `tree`'s leaves: jax arrays on their devices (one small jitted
    reduction, any sharding), numpy arrays on the host; both give the same numbers."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(p) for p, _ in flat]
    groups: dict = {}  # one jitted call per set of devices: a restored state may hold leaves on different ones
    sums = {}
    for i, (_, x) in enumerate(flat):
        if isinstance(x, jax.Array):
            groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
        else:
            sums[i] = _host_sums(np.asarray(x))
    for members in groups.values():
        sums.update(zip(members, jax.device_get(_device_sums([flat[i][1] for i in members]))))
    return {names[i]: [int(v) for v in sums[i]] for i in range(len(flat))}


def verify(tree: Any, saved: dict, prefix: str = "") -> list[str]:
    """Names of the leaves of `tree` whose checksums differ from (or are missing in) `saved`; `prefix`: the name
    of the subtree `tree` is (a partial restore)."""
    now = checksums(tree)
    # A subtree that is itself a leaf (e.g. "step") has the empty name: its saved name is the prefix alone.
    full = {name: f"{prefix}{name}" if name else prefix.rstrip("/") for name in now}
    return [full[name] for name, sums in now.items() if saved.get(full[name]) != sums]


def read_checksums(step_dir) -> dict | None:
    """The checksums saved with a checkpoint, None when it has none (saved before they were recorded)."""
    folder = epath.Path(step_dir) / CHECKSUMS
    if not folder.exists():
        return None
    return ocp.JsonCheckpointHandler().restore(folder)


def mismatch_message(bad: list[str]) -> str:
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return f"checksum mismatch in {shown}: its array data changed after it was saved"


NOT_VERIFIED = "has no checksums (saved before they were recorded): its data is not verified"


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, the target of `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def report(message: str) -> None:
    """Print on the main process."""
    if distributed.is_main_process():
        print(message, flush=True)


_OS_REASON = re.compile(
    r"No space left on device|Permission denied|Read-only file system|Disk quota exceeded|"
    r"Input/output error|No such file or directory|Too many open files"
)


def short_error(e: BaseException) -> str:
    """First line of an exception, capped (TensorStore errors carry pages of spec), with the OS reason if it was
    cut off."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(text) > 200:
        reason = _OS_REASON.search(text)
        text = text[:200] + " ..." + (f" {reason.group(0)}" if reason and reason.start() >= 200 else "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename unreadable step folders to `unreadable-<step>` (kept for inspection, ignored by Orbax), so that
    the resumed run can save those steps again."""
    if distributed.is_main_process():
        for step in steps:
            src = epath.Path(manager.directory) / str(step)
            dst = epath.Path(manager.directory) / f"unreadable-{step}"
            n = 1
            while dst.exists():
                dst, n = epath.Path(manager.directory) / f"unreadable-{step}.{n}", n + 1
            src.rename(dst)
    if not distributed.is_single_process():
        multihost_utils.sync_global_devices("trigflow_distill.training.checkpoint.set_aside")
    manager.reload()


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: Any = None,
    set_aside: bool = False,
    report: Callable[[str], None] = report,
) -> tuple[Any, int]:
    """(state, step) of the newest complete checkpoint that reads back completely, or (None, 0) when there is
    none at all.

    A checkpoint that fails to read (a truncated or deleted array file, a deleted manifest or item) or whose
    data does not match its checksums is skipped with a message saying which and why, and the next older one is
    tried; with `set_aside` (the trainer) the
    skipped folders are renamed `unreadable-<step>`. If checkpoints exist but none reads back, CheckpointError
    lists them all (nothing is renamed: a wrong `abstract_state` must not look like damage).
    `abstract_state`: the TrainState tree of jax.ShapeDtypeStruct with the shardings to restore into (any mesh,
    not necessarily the one that saved it; see `abstract_like`). `data_iterator`, if given, is moved to the
    saved position.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        verified = (epath.Path(manager.directory) / str(step) / CHECKSUMS).exists()
        if verified:
            items[CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
            if data_iterator is not None and restored["data"] is None:
                raise ValueError("it has no data iterator state")
            bad = verify(restored["state"], restored[CHECKSUMS] or {}) if verified else []
            if bad:
                raise ValueError(mismatch_message(bad))
        except Exception as e:  # noqa: BLE001 - TensorStore raises plain Exception for missing/truncated files
            skipped.append(step)
            report(
                f"checkpoint {step} in {manager.directory} does not read back intact ({short_error(e)}); "
                "trying the previous one."
            )
            continue
        if not verified:
            report(f"checkpoint {step} in {manager.directory} {NOT_VERIFIED}.")
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        if skipped:
            if set_aside:
                _set_aside(manager, skipped)
            report(
                f"skipped unreadable checkpoint(s) {skipped}"
                + (f", kept as unreadable-<step> in {manager.directory}" if set_aside else "")
                + f"; restored step {step}."
            )
        return restored["state"], int(step)
    if steps:
        raise CheckpointError(
            f"none of the checkpoints {steps} in {manager.directory} reads back (see the messages "
            "above). If the run's shapes changed (teacher, network), use a new --workdir; "
            "otherwise restore the folder from a backup."
        )
    return None, 0


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Block until pending async saves are written (call before exiting and before reading checkpoints)."""
    manager.wait_until_finished()


@jax.jit
def _finite_leaves(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def non_finite_leaves(state: Any) -> list[str]:
    """Paths of the floating-point leaves of `state` holding a NaN or inf (one small device reduction)."""
    leaf_paths = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    ok = jax.device_get(_finite_leaves(state))
    return [p for p, good in zip(leaf_paths, ok) if not good]


def check_writable(directory: epath.Path) -> None:
    """Write and delete a probe file in `directory` (created); OSError when it cannot be written."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


def _late_loop_callback(unraisable) -> bool:
    """The RuntimeError of a TensorStore write finishing after the asyncio loop of Orbax's failed save thread
    closed: `call_soon_threadsafe` -> `_check_closed`. Nothing is lost (the save already failed and says so)."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def quiet_late_loop_callbacks() -> None:
    """On a failed async save (a full disk) every still-pending TensorStore write reports to Orbax's closed event
    loop, which Python prints through sys.unraisablehook: hundreds of identical tracebacks around the one-line
    error. Drop exactly those; everything else still reaches the previous hook. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_late_loop_callbacks", False):
        return

    def hook(unraisable):
        if not _late_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_late_loop_callbacks = True
    sys.unraisablehook = hook


class Saver:
    """The trainer's saves: finite state only, writable folder checked first, "saved" reported once committed.

    `last_committed`: the step restored from (None: no checkpoint yet). Call `save` at every step, `poll` now
    and then (it confirms a finished async save without blocking) and `close` at the end (waits for the last
    save). Failures raise CheckpointError (or TrainingStopped for a non-finite state) naming the last committed
    step; `report` gets the progress lines.
    """

    def __init__(
        self, manager: ocp.CheckpointManager, last_committed: int | None = None, report: Callable[[str], None] = report
    ):
        self.manager, self.last_committed, self.report = manager, last_committed, report
        self.pending: int | None = None
        self.directory = epath.Path(manager.directory)
        quiet_late_loop_callbacks()

    def last_good(self) -> str:
        if self.last_committed is None:
            return f"No checkpoint has been committed in {self.directory} yet."
        return f"The last committed checkpoint is step {self.last_committed} in {self.directory}."

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Start an async save of `step` if the policy (or `force`) asks for one; returns whether one started."""
        if not (force or self.manager.should_save(step)):
            return False
        self.confirm()  # Orbax would wait for the previous save here anyway; surface its failure first
        bad = non_finite_leaves(state)
        if bad:
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise TrainingStopped(
                f"the train state of step {step} has non-finite values ({shown}); it was not "
                f"saved. {self.last_good()} Lower the learning rates or check the data."
            )
        try:
            check_writable(self.directory)
            # force: the policy was asked once above (its preemption check is a sync point of all processes)
            started = save(self.manager, step, state, data_iterator, force=True)
        except Exception as e:  # noqa: BLE001 - any storage failure ends the run the same way
            raise CheckpointError(
                f"cannot save checkpoint {step} in {self.directory} ({short_error(e)}). "
                f"{self.last_good()} Free disk space or fix the folder's permissions, then "
                "re-run the same command to resume."
            ) from e
        if started:
            self.pending = step
        return started

    def poll(self) -> None:
        """Confirm the pending save if it has finished (never blocks)."""
        if self.pending is not None and not self.manager.is_saving_in_progress():
            self.confirm()

    def confirm(self) -> None:
        """Wait for the pending save, check that Orbax committed it, report it."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
            committed = ocp.step.is_checkpoint_finalized(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 - TensorStore/OS errors of the background write
            raise CheckpointError(
                f"saving checkpoint {step} in {self.directory} failed ({short_error(e)}). "
                f"{self.last_good()} Free disk space or fix the folder's permissions, then "
                "re-run the same command to resume."
            ) from e
        if not committed:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was not committed. {self.last_good()} "
                "Re-run the same command to resume."
            )
        self.last_committed = step
        self.report(f"checkpoint saved at step {step}")

    close = confirm
