"""One writer per folder (a training workdir, a prepare --out): an exclusive lock file `lock.json` with the holder's
host, pid and a heartbeat.

The holder rewrites the heartbeat every `heartbeat_s` seconds from a background thread (so a long compile or
teacher conversion keeps it fresh). A second run refuses at once, naming the holder. A lock is stale, and is
taken over, when its process is gone (same host: the pid is dead or now belongs to another process) or when its
heartbeat is older than `stale_after_s` (any host: the only test that works across the machines of a shared file
system; TRIGFLOW_LOCK_STALE_S, default 120 s).

The heartbeat's age is judged on the file system's own clock: the lock file's modification time against that of a
probe file written beside it just now, so hosts whose clocks differ (a heartbeat "from the future", or one that looks
old while its run is alive) judge a lock alike. Where the storage gives no modification times, the heartbeat written
in the lock is compared with this host's clock. A lock file that is not a JSON object with a numeric heartbeat is
taken over only once unmodified for `stale_after_s`; before that it is an error naming the file.

Local and network file systems: the lock is created exclusively (written aside and hard-linked into place, or
O_EXCL); a stale one is first renamed aside (one taker wins the rename) and checked to be the stale lock that was
read, then re-created exclusively, so two runs that find the same stale lock cannot both win. Object stores (gs://)
have no exclusive create: there the lock is written, re-read after a settle time, and the holder re-checks its token
at every heartbeat and before every save (`check`), so a run that lost a race stops before it writes a checkpoint.
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
SKEW_TOLERANCE_S = 5.0  # heartbeat vs file time differences below this are write latency, not clock skew


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


def describe(holder: dict, age: float | None = None) -> str:
    """'host H pid P (last heartbeat N s ago)'; `age` as judged by `WorkdirLock.heartbeat_age` (default: the holder's
    heartbeat against this host's clock)."""
    if age is None:
        age = time.time() - _number(holder.get("heartbeat"), 0.0)
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (last heartbeat {max(age, 0):.0f} s ago)"


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def malformed(holder: dict) -> str | None:
    """Why a lock's content is not a lock (None when it is one)."""
    if not holder:
        return "not a JSON object"
    try:
        float(holder["heartbeat"])
        int(holder.get("pid", 0))
    except (KeyError, TypeError, ValueError) as e:
        return f"no numeric heartbeat and pid ({type(e).__name__}: {e})"
    return None


class WorkdirLock:
    """Exclusive lock of a workdir; `acquire()` at start, `check()` before every save, `release()` at the end."""

    def __init__(
        self,
        workdir,
        stale_after_s: float | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        flag: str = "--workdir",
    ):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.flag = flag  # the CLI option that names the folder, for the messages (prepare: --out)
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

    def _file_age(self) -> float | None:
        """Seconds since the lock file was last written, on the file system's clock (the modification time of a
        probe written now beside it); None where the storage has no modification times."""
        probe = self.path.parent / f".lock-clock.{self.me['token']}"
        try:
            if paths.is_local(self.path):
                lock_mtime = os.stat(self.path).st_mtime_ns / 1e9
                with open(probe, "w"):
                    pass
                now = os.stat(probe).st_mtime_ns / 1e9
            else:
                lock_mtime = float(self.path.stat().mtime)
                probe.write_text("")
                now = float(probe.stat().mtime)
        except (OSError, AttributeError, TypeError, ValueError, NotImplementedError):
            return None
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
        return now - lock_mtime if lock_mtime > 0 and now > 0 else None  # 0: a storage that reports no times

    def heartbeat_age(self, holder: dict) -> tuple[float, str]:
        """(seconds since the holder's last heartbeat, a note when the holder's clock differs from the file
        system's). The file system's clock decides where it has one: hosts' clocks may differ by minutes."""
        clock_age = time.time() - _number(holder.get("heartbeat"), 0.0)
        age = self._file_age()
        if age is None:
            return clock_age, ""
        skew = age - clock_age  # > 0: the heartbeat is later than the file's time says
        note = (
            f" (its heartbeat is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the file's modification "
            "time: the hosts' clocks differ; judged by the file)"
            if abs(skew) > SKEW_TOLERANCE_S
            else ""
        )
        return age, note

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder`'s lock may be taken over, or None when its run looks alive; WorkdirLocked naming the file
        when it is malformed and was written less than `stale_after_s` ago."""
        age, skew = self.heartbeat_age(holder)
        problem = malformed(holder)
        if problem:
            if age > self.stale_after_s:
                return f"the lock file is malformed ({problem}) and unmodified for {age:.0f} s"
            raise WorkdirLocked(
                f"the lock file {self.path} is malformed ({problem}) and was written {max(age, 0):.0f} s ago, so a "
                f"run may be starting; if no run uses {self.path.parent}, delete it (it is taken over once "
                f"unmodified for {self.stale_after_s:.0f} s)."
            )
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s){skew}"
        if holder.get("host") == self.me["host"] and not _pid_alive(
            int(holder.get("pid", -1)), holder.get("pid_start")
        ):
            return f"process {holder.get('pid')} is gone"
        return None

    def _content(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    # -- writing -----------------------------------------------------------------------------------------------------
    def _create_exclusive(self) -> bool:
        """Local: exclusive create. False when another run created it first. The content is written first and
        hard-linked into place, so a lock file is never seen empty (a run killed between an O_EXCL create and its
        write would leave a malformed lock that blocks the resume for the stale time); O_EXCL where links fail."""
        tmp = f"{self.path}.{self.me['token']}.tmp"
        with open(tmp, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            pass
        finally:
            os.remove(tmp)
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
        moved = moved if isinstance(moved, dict) else {}
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
                age = self.heartbeat_age(holder)[0]
                note = f"took over the stale lock {self.path} of {describe(holder, age)}: {reason}"
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
        age, skew = self.heartbeat_age(holder) if holder else (None, "")
        return WorkdirLocked(
            f"{self.path.parent} is in use by another run: {describe(holder, age)}{skew}. Wait for it to end or use "
            f"another {self.flag}; a lock whose process is gone (same host) or without heartbeat for "
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


def acquire_lock(workdir: epath.Path, flag: str = "--workdir") -> WorkdirLock | None:
    """Process 0 takes the workdir's lock (the other processes of the run share it); every process stops if it
    cannot. Returns the lock (None on other processes). `flag` names the folder's CLI option in the messages."""
    held, error = None, None
    if distributed.is_main_process():
        try:
            held = WorkdirLock(workdir, flag=flag)
            note = held.acquire()
            if note:
                print(note, flush=True)
        except WorkdirLocked as e:
            held, error = None, e
        except OSError as e:
            held, error = (
                None,
                ValueError(
                    f"{flag} {workdir} is not writable ({e}); choose a writable location or fix its permissions."
                ),
            )
    if not distributed.is_single_process():
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirLocked(f"process 0 could not lock {workdir}; see its log.")
    if error is not None:
        raise error
    return held
