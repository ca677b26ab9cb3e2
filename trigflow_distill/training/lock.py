"""One writer per workdir: an exclusive lock file `<workdir>/lock.json` with the holder's host, pid and a heartbeat.

The holder rewrites the heartbeat every `heartbeat_s` seconds from a background thread (so a long compile or
teacher conversion keeps it fresh). A second run refuses at once, naming the holder. A lock is stale, and is
taken over, when its process is gone (same host: the pid is dead or now belongs to another process) or when its
heartbeat is older than `stale_after_s` (any host: the only test that works across the machines of a shared file
system; TRIGFLOW_LOCK_STALE_S, default 120 s).

Local and network file systems: the lock is created with O_EXCL; a stale one is first renamed aside (one taker
wins the rename) and checked to be the stale lock that was read, then re-created with O_EXCL, so two runs that
find the same stale lock cannot both win. Object stores (gs://) have no exclusive create: there the lock is
written, re-read after a settle time, and the holder re-checks its token at every heartbeat and before every
save (`check`), so a run that lost a race stops before it writes a checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill.common import distributed, paths
from trigflow_distill.common.errors import WorkdirLocked

LOCK_NAME = "lock.json"
DEFAULT_STALE_AFTER_S = 120.0
DEFAULT_HEARTBEAT_S = 10.0
_SETTLE_S = 2.0  # object stores: how long a racing writer may take to show up


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (last heartbeat {age:.0f} s ago)"


class WorkdirLock:
    """Exclusive lock of a workdir; `acquire()` at start, `check()` before every save, `release()` at the end."""

    def __init__(self, workdir, stale_after_s: float | None = None, heartbeat_s: float = DEFAULT_HEARTBEAT_S):
        self.path = epath.Path(workdir) / LOCK_NAME
        if stale_after_s is None:
            stale_after_s = float(os.environ.get("TRIGFLOW_LOCK_STALE_S", DEFAULT_STALE_AFTER_S))
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        pid = os.getpid()
        self.me = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _proc_start(pid),
            "token": uuid.uuid4().hex,
            "started": time.time(),
        }
        self.lost: dict | None = None  # the holder that replaced us, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading and judging a lock -------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        """The lock's content; None when there is no lock; {} when it cannot be parsed (after a short wait: a
        lock is written right after its O_EXCL create)."""
        for attempt in range(3):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict):
                    return holder
            except json.JSONDecodeError:
                pass
            time.sleep(0.2 * (attempt + 1))
        return {}

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None when its run looks alive."""
        if not holder:
            return "the lock file is unreadable"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s)"
        if holder.get("host") == self.me["host"] and not _pid_alive(
            int(holder.get("pid", -1)), holder.get("pid_start")
        ):
            return f"process {holder.get('pid')} is gone"
        return None

    def _content(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    # -- writing -----------------------------------------------------------------------------------------------------
    def _create_exclusive(self) -> bool:
        """Local: O_EXCL create. False when another run created it first."""
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _write(self) -> None:
        """Replace the lock's content with ours (atomic rename where the file system has one)."""
        if paths.is_local(self.path):
            tmp = f"{self.path}.{self.me['token']}.tmp"
            with open(tmp, "w") as f:
                f.write(self._content())
            os.replace(tmp, self.path)
        else:
            self.path.write_text(self._content())

    def _set_stale_aside(self, holder: dict) -> bool:
        """Local: rename the stale lock aside; True if we renamed exactly the lock we judged stale."""
        aside = f"{self.path}.stale.{self.me['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another taker was first
        try:
            with open(aside) as f:
                moved = json.loads(f.read() or "{}")
        except (OSError, json.JSONDecodeError):
            moved = {}
        if moved.get("token") != holder.get("token"):
            try:  # we moved a newer, live lock of another taker: put it back unless yet another lock exists
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    # -- public ------------------------------------------------------------------------------------------------------
    def acquire(self) -> str | None:
        """Take the lock or raise WorkdirLocked naming the holder. Returns a note when a stale lock was taken
        over (for the log), else None. Starts the heartbeat thread."""
        note = None
        for _ in range(5):
            holder = self._read()
            if holder is not None:
                reason = self.stale_reason(holder)
                if reason is None:
                    raise self._locked_error(holder)
                note = f"took over the stale lock {self.path} of {describe(holder)}: {reason}"
                if paths.is_local(self.path) and not self._set_stale_aside(holder):
                    continue  # someone else moved it first: look again
            if paths.is_local(self.path):
                if not self._create_exclusive():
                    continue
            else:
                self._write()
                time.sleep(_SETTLE_S)
                now = self._read()
                if now is not None and now.get("token") != self.me["token"]:
                    raise self._locked_error(now)
            self._start_heartbeat()
            return note
        raise self._locked_error(self._read() or {})

    def _locked_error(self, holder: dict) -> WorkdirLocked:
        return WorkdirLocked(
            f"{self.path.parent} is in use by another run: {describe(holder)}. Wait for it to end or use another "
            f"--workdir; a lock whose process is gone (same host) or without heartbeat for "
            f"{self.stale_after_s:.0f} s is taken over automatically (lock file: {self.path})."
        )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat if we still hold the lock; remember who replaced us otherwise."""
        if self.lost is not None:
            return
        try:
            holder = self._read()
            if holder is None or holder.get("token") != self.me["token"]:
                self.lost = holder or {}
                return
            self._write()
        except OSError:  # a transient storage error: the next beat retries; staleness needs many misses
            pass

    def check(self) -> None:
        """Raise WorkdirLocked if another run has taken the lock over (e.g. after a long stall of this one)."""
        if self.lost is not None:
            raise WorkdirLocked(
                f"this run lost the lock {self.path} to {describe(self.lost)}; stopping so that "
                "only one run writes the workdir."
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)


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


def acquire_lock(workdir: epath.Path) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock (the other processes of the run share it); every process stops if it
    cannot. Returns the lock (None on other processes)."""
    held, error = None, None
    if distributed.is_main_process():
        try:
            held = WorkdirLock(workdir)
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
