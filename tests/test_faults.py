"""Faults a careless user or an unlucky operator causes, each answered by a clear error or a safe recovery.

docs/reliability.md lists the guarantees and points at the test of each. The fast tests drive the pieces
directly (checkpoint.Saver, restore, lock, config checks, CLIs' error paths); the slow ones run main.py.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import kill_resume  # benchmarks/ is on the pytest pythonpath
import numpy as np
import pytest

from trigflow_distill.common import errors, lock
from trigflow_distill.training import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's dropped reads
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------- checkpoints
def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (64, 32)), "b": jax.random.normal(k2, (5,)), "step": jnp.int32(seed)}


def _saved_run(tmp_path, steps=(1, 2, 3)):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, report=lambda m: None)
    for s in steps:
        saver.save(s, _state(s))
    saver.close()
    return manager


def test_saved_is_reported_only_once_committed(tmp_path):
    lines = []
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, report=lines.append)
    assert saver.save(1, _state(1))
    assert lines == []  # started, not yet confirmed
    saver.close()
    assert lines == ["checkpoint saved at step 1"] and saver.last_committed == 1
    assert checkpoint.checkpoint_dir(tmp_path).joinpath("1", "state").is_dir()


def test_failed_background_save_stops_naming_last_committed_step(tmp_path, monkeypatch):
    """A full disk surfaces in Orbax's background thread: the run stops at the next check, nothing says 'saved'."""
    lines = []
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, report=lines.append)
    saver.save(1, _state(1))
    saver.close()
    saver.save(2, _state(2))

    def disk_full():
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0": No space left on device')

    monkeypatch.setattr(manager, "wait_until_finished", disk_full)
    with pytest.raises(
        errors.CheckpointError,
        match=r"saving checkpoint 2 .* failed \(ValueError: RESOURCE_EXHAUSTED"
        r".*The last committed checkpoint is step 1 in",
    ):
        saver.close()
    assert lines == ["checkpoint saved at step 1"]


def test_unconfirmed_save_is_an_error(tmp_path, monkeypatch):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, report=lambda m: None)
    saver.save(1, _state(1))
    monkeypatch.setattr(checkpoint.ocp.step, "is_checkpoint_finalized", lambda path: False)
    with pytest.raises(
        errors.CheckpointError, match="checkpoint 1 .* was not committed. No checkpoint has been committed"
    ):
        saver.close()


def test_unwritable_checkpoint_folder_fails_at_once(tmp_path, monkeypatch):
    """Orbax would wait 300 s for a step folder it cannot create; the probe write fails in milliseconds."""
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, last_committed=7, report=lambda m: None)

    def read_only(directory):
        raise PermissionError(13, "Permission denied", str(directory / ".write-probe"))

    monkeypatch.setattr(checkpoint, "check_writable", read_only)
    start = time.perf_counter()
    with pytest.raises(
        errors.CheckpointError,
        match=r"cannot save checkpoint 8 .*Permission denied.*"
        r"last committed checkpoint is step 7",
    ):
        saver.save(8, _state(8))
    assert time.perf_counter() - start < 5
    assert manager.all_steps() == []


def test_check_writable_probe(tmp_path):
    checkpoint.check_writable(checkpoint.checkpoint_dir(tmp_path))
    assert os.listdir(checkpoint.checkpoint_dir(tmp_path)) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        checkpoint.check_writable(checkpoint.checkpoint_dir(tmp_path / "file"))


_LATE_CALLBACK = """
import asyncio, sys
import tensorstore as ts
from trigflow_distill.training import checkpoint
if sys.argv[1] == "quiet":
    checkpoint.quiet_late_loop_callbacks()
promise, future = ts.Promise.new()  # a TensorStore write still pending when Orbax's save thread gives up
loop = asyncio.new_event_loop()


async def write():
    await future


task = loop.create_task(write())
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
promise.set_result(None)  # its done-callback now calls the closed loop
raise SystemExit("other errors still show")
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_late_writes_of_a_failed_save_print_no_tracebacks(quiet):
    """A full disk fails one TensorStore write; the others finish after Orbax closed its event loop and Python
    printed one 'Event loop is closed' traceback each (hundreds around the error line). The Saver drops those."""
    mode = "quiet" if quiet else "loud"
    out = subprocess.run([sys.executable, "-c", _LATE_CALLBACK, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "other errors still show" in out.stderr, out.stderr
    assert ("Event loop is closed" in out.stderr) is not quiet, out.stderr
    assert ("Traceback" in out.stderr) is not quiet, out.stderr


def test_non_finite_state_is_never_saved(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    saver = checkpoint.Saver(manager, report=lambda m: None)
    saver.save(1, _state(1))
    bad = _state(2)
    bad["w"] = bad["w"].at[3, 4].set(jnp.nan)
    with pytest.raises(
        errors.TrainingStopped,
        match=r"state of step 2 has non-finite values \(\['w'\]\); it was "
        r"not saved. The last committed checkpoint is step 1",
    ):
        saver.save(2, bad)
    assert manager.all_steps() == [1]


def _damage(step_dir, how):
    state_dir = step_dir / "state"
    biggest = max((state_dir / "ocdbt.process_0" / "d").iterdir(), key=lambda p: os.path.getsize(p))
    if how == "truncated array file":
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "deleted array file":
        biggest.unlink()
    elif how == "deleted manifest":
        (state_dir / "manifest.ocdbt").unlink()
    elif how == "flipped bit in array data":  # Orbax decodes this to wrong numbers without an error
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 1
        biggest.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["truncated array file", "deleted array file", "deleted manifest", "flipped bit in array data"]
)
def test_restore_falls_back_to_newest_complete_checkpoint(tmp_path, how):
    _saved_run(tmp_path)
    ckpts = checkpoint.checkpoint_dir(tmp_path)
    _damage(ckpts / "3", how)
    lines = []
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    state, step = checkpoint.restore_latest(
        manager, checkpoint.abstract_like(_state()), set_aside=True, report=lines.append
    )
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2)["w"]))
    assert lines[0].startswith(f"checkpoint 3 in {ckpts} does not read back intact (")
    if how == "flipped bit in array data":
        assert "checksum mismatch in w: its array data changed after it was saved" in lines[0]
    assert "skipped unreadable checkpoint(s) [3], kept as unreadable-<step>" in lines[-1]
    assert (ckpts / "unreadable-3").is_dir() and not (ckpts / "3").exists()
    # the resumed run saves step 3 again, and Orbax ignores the folder set aside
    saver = checkpoint.Saver(manager, last_committed=2, report=lambda m: None)
    assert saver.save(3, _state(3))
    saver.close()
    assert checkpoint.make_manager(str(tmp_path)).all_steps() == [1, 2, 3]


def test_restore_reader_skips_without_renaming(tmp_path):
    _saved_run(tmp_path, steps=(1, 2))
    ckpts = checkpoint.checkpoint_dir(tmp_path)
    _damage(ckpts / "2", "deleted manifest")
    manager = checkpoint.make_manager(str(tmp_path))
    _, step = checkpoint.restore_latest(manager, checkpoint.abstract_like(_state()), report=lambda m: None)
    assert step == 1 and (ckpts / "2").is_dir()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """A wrong target (e.g. another teacher's shapes) fails every checkpoint: refuse, rename nothing."""
    _saved_run(tmp_path, steps=(1, 2))
    other = {
        "w": jax.ShapeDtypeStruct((8, 8), jnp.float32),
        "b": jax.ShapeDtypeStruct((5,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    manager = checkpoint.make_manager(str(tmp_path))
    with pytest.raises(errors.CheckpointError, match=r"none of the checkpoints \[2, 1\] .* reads back"):
        checkpoint.restore_latest(manager, other, set_aside=True, report=lambda m: None)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(tmp_path))) == ["1", "2"]


# ------------------------------------------------------------------------------------------------------ workdir lock
def test_second_run_is_refused_naming_the_holder(tmp_path):
    first = lock.WorkdirLock(tmp_path)
    assert first.acquire() is None
    start = time.perf_counter()
    with pytest.raises(
        errors.WorkdirLocked,
        match=rf"in use by another run: host {socket.gethostname()} pid "
        rf"{os.getpid()} \(last heartbeat \d+ s ago\)",
    ):
        lock.WorkdirLock(tmp_path).acquire()
    assert time.perf_counter() - start < 5
    first.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()
    second = lock.WorkdirLock(tmp_path)
    assert second.acquire() is None
    second.release()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / lock.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "token": "old", "heartbeat": time.time()})
    )
    taker = lock.WorkdirLock(tmp_path)
    note = taker.acquire()
    assert note is not None and f"pid {pid}" in note and f"process {pid} is gone" in note
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == taker.me["token"]
    taker.release()


def _other_host_lock(path, heartbeat, written):
    """lock.json of a run on node-7 whose heartbeat says `heartbeat` and that was last written at `written` (the
    file system's time)."""
    path.write_text(json.dumps({"host": "node-7", "pid": 1, "token": "other", "heartbeat": heartbeat}))
    os.utime(path, (written, written))


def test_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path):
    """Shared file system: a pid on another machine cannot be probed, only the heartbeat's age tells."""
    path = tmp_path / lock.LOCK_NAME
    _other_host_lock(path, time.time() - 5, time.time() - 5)
    with pytest.raises(errors.WorkdirLocked, match="host node-7 pid 1"):
        lock.WorkdirLock(tmp_path, stale_after_s=60).acquire()
    _other_host_lock(path, time.time() - 61, time.time() - 61)
    taker = lock.WorkdirLock(tmp_path, stale_after_s=60)
    assert "no heartbeat for 61 s" in taker.acquire()
    taker.release()


def test_clock_skew_between_hosts_is_judged_on_the_file_systems_clock(tmp_path):
    """node-7's clock is an hour ahead (or behind): its heartbeat is judged by the lock file's modification time
    against a probe written now, so a dead run's lock is still taken over after the stale time and a live one is
    never taken over early."""
    path, now = tmp_path / lock.LOCK_NAME, time.time()
    _other_host_lock(path, now + 3600, now - 1)  # alive, clock ahead: a fresh lock, not "-3599 s ago"
    with pytest.raises(
        errors.WorkdirLocked,
        match=r"host node-7 pid 1 \(last heartbeat [01] s ago\) \(its heartbeat"
        r" is 3[56]\d\d s ahead of the file's modification time: the hosts' clocks differ",
    ):
        lock.WorkdirLock(tmp_path, stale_after_s=60).acquire()
    _other_host_lock(path, now + 3600 - 61, now - 61)  # dead for 61 s, clock ahead: stale as promised
    taker = lock.WorkdirLock(tmp_path, stale_after_s=60)
    assert re.search(r"no heartbeat for 6[12] s \(> 60 s\) \(its heartbeat is 36\d\d s ahead", taker.acquire())
    taker.release()
    _other_host_lock(path, now - 3600, now - 1)  # alive, clock behind: not taken over
    with pytest.raises(
        errors.WorkdirLocked, match=r"last heartbeat [01] s ago\) \(its heartbeat is 3[56]\d\d s behind"
    ):
        lock.WorkdirLock(tmp_path, stale_after_s=60).acquire()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"host": "node-7", "pid": 1, "heartbeat": "soon"}', ""])
def test_malformed_lock_json_names_the_file(tmp_path, content):
    """A lock file that is not a lock is an error naming it while fresh (a run may be writing it), and is taken over
    once unmodified for the stale time."""
    path = tmp_path / lock.LOCK_NAME
    path.write_text(content)
    with pytest.raises(errors.WorkdirLocked) as refused:
        lock.WorkdirLock(tmp_path, stale_after_s=60).acquire()
    assert re.fullmatch(
        rf"the lock file {re.escape(str(path))} is malformed \(.+\) and was written [01] s ago, so a run may be "
        rf"starting; if no run uses {re.escape(str(tmp_path))}, delete it \(it is taken over once unmodified for "
        r"60 s\)\.",
        str(refused.value),
    ), str(refused.value)
    os.utime(path, (time.time() - 61, time.time() - 61))
    taker = lock.WorkdirLock(tmp_path, stale_after_s=60)
    assert "the lock file is malformed (" in taker.acquire()
    taker.release()


def test_heartbeat_refreshes_and_a_lost_lock_stops_the_holder(tmp_path):
    holder = lock.WorkdirLock(tmp_path, heartbeat_s=0.05)
    holder.acquire()
    first = json.loads((tmp_path / lock.LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["heartbeat"] > first
    holder.check()
    # e.g. this run stalled past the stale timeout and another host took over
    (tmp_path / lock.LOCK_NAME).write_text(
        json.dumps({"host": "node-2", "pid": 9, "token": "new", "heartbeat": time.time()})
    )
    time.sleep(0.3)
    with pytest.raises(errors.WorkdirLocked, match="lost the lock .* to host node-2 pid 9"):
        holder.check()
    holder.release()
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == "new"  # not ours: left alone


def test_racing_takers_of_a_stale_lock_one_wins(tmp_path):
    """Two runs find the same stale lock: the rename-aside + O_EXCL protocol lets exactly one through."""
    pid = _dead_pid()
    (tmp_path / lock.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "token": "old", "heartbeat": time.time()})
    )
    a, b = lock.WorkdirLock(tmp_path), lock.WorkdirLock(tmp_path)
    stale = a._read()
    assert a._set_stale_aside(stale) and a._create_exclusive()
    assert not b._set_stale_aside(stale)  # b read the same stale lock but now meets a's live one
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["token"] == a.me["token"]
    with pytest.raises(errors.WorkdirLocked):
        b.acquire()


# ------------------------------------------------------------------------------------------------------ data writer
def _write_inputs(tmp_path, lat_shape=(3, 16, 2, 4, 4), text_shape=(3, 5, 64)):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", rng.normal(size=lat_shape).astype(np.float32))
    np.save(tmp_path / "txt.npy", rng.normal(size=text_shape).astype(np.float32))
    return ["--latents", str(tmp_path / "lat.npy"), "--text", str(tmp_path / "txt.npy")]


def test_data_writer_needs_overwrite_and_replaces_only_when_done(tmp_path, capsys):
    from trigflow_distill.data.cli import main as write_main

    args = _write_inputs(tmp_path) + ["--net", "tiny", "--out", str(tmp_path / "ds")]
    assert write_main(args) == 0
    meta = (tmp_path / "ds" / "meta.json").read_text()
    assert write_main(args) == 1
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "ds" / "meta.json").read_text() == meta
    # a failing --overwrite write leaves the old dataset as it was
    bad = np.load(tmp_path / "lat.npy")
    bad[2, 0, 0, 0, 0] = np.nan
    np.save(tmp_path / "lat.npy", bad)
    assert write_main(args + ["--overwrite"]) == 1
    assert "input record 2: latents has 1 non-finite" in capsys.readouterr().err
    assert (tmp_path / "ds" / "meta.json").read_text() == meta and sorted(os.listdir(tmp_path)) == [
        "ds",
        "lat.npy",
        "txt.npy",
    ]
    np.save(tmp_path / "lat.npy", np.nan_to_num(bad))
    assert write_main(args + ["--overwrite", "--prompt", str(tmp_path / "p.npy")]) == 1  # missing file: old kept
    np.save(tmp_path / "p.npy", np.arange(3))
    assert write_main(args + ["--overwrite", "--prompt", str(tmp_path / "p.npy")]) == 0
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["fields"] == ["prompt"]
    (tmp_path / "file").write_text("x")
    assert write_main(args[:-1] + [str(tmp_path / "file"), "--overwrite"]) == 1
    assert "is a file; give a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lat_shape, text_shape, net, message",
    [
        (
            (3, 4, 2, 4, 4),
            (3, 5, 1024),
            "predict25_2b",
            r"shape \(3, 4, 2, 4, 4\); the trainer needs \(N, 16, T, H, W\)",
        ),
        ((3, 16, 2, 5, 4), (3, 5, 1024), "predict25_2b", "spatial size 5x4 is not even"),
        (
            (3, 16, 2, 4, 4),
            (3, 5, 4096),
            "predict25_2b",
            r"text embeddings are 4096 wide, but this teacher takes 100352 \(raw .*\) or 1024 \(projected context\)",
        ),
        (
            (3, 16, 2, 4, 4),
            (3, 5, 1024),
            "tiny",
            r"text embeddings are 1024 wide, but this teacher takes 96 \(raw .*\) or 64 \(projected context\)",
        ),
        ((3, 16, 2, 4, 4), (3, 5), "any", r"--text has shape \(3, 5\)"),
    ],
)
def test_data_writer_checks_shapes_the_trainer_needs(tmp_path, capsys, lat_shape, text_shape, net, message):
    from trigflow_distill.data.cli import main as write_main

    args = _write_inputs(tmp_path, lat_shape, text_shape) + ["--net", net, "--out", str(tmp_path / "ds")]
    assert write_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "ds").exists()


def test_data_writer_tells_text_kind_from_width(tmp_path):
    from trigflow_distill import data
    from trigflow_distill.data.cli import main as write_main

    assert write_main(_write_inputs(tmp_path) + ["--net", "tiny", "--out", str(tmp_path / "p")]) == 0
    assert data.NpyDirSource(str(tmp_path / "p")).text_kind == "projected"  # 64 = the tiny projection's width
    assert (
        write_main(_write_inputs(tmp_path, text_shape=(3, 5, 96)) + ["--net", "tiny", "--out", str(tmp_path / "r")])
        == 0
    )
    assert data.NpyDirSource(str(tmp_path / "r")).text_kind == "raw"


# ------------------------------------------------------------------------------------------- config and workdir
def _tiny_config(teacher_path, **overrides):
    import predict25_4step  # configs/ is on the pytest pythonpath

    c = predict25_4step.get_config("tiny")
    c.teacher.path = str(teacher_path)
    c.update(total_steps=6, log_every=1, checkpoint_every=2, sample_every=0)
    c.data.batch_size, c.eval.at_end, c.mesh.data = 4, False, 1
    for k, v in overrides.items():
        section, _, field = k.rpartition(".")
        (c[section] if section else c)[field] = v
    return c


def _toy_source(config):
    from trigflow_distill import data_kinds

    return data_kinds.get(config).open(config)[0]


def test_nan_learning_rate_is_refused(teacher_pt):
    from trigflow_distill.training import run_config

    with pytest.raises(ValueError, match=r"config.student_optim.lr=nan must be a finite number >= 0"):
        run_config.validate_config(_tiny_config(teacher_pt, **{"student_optim.lr": float("nan")}))
    with pytest.raises(ValueError, match=r"config.critic_optim.eps=-1.0 must be a finite number >= 0"):
        run_config.validate_config(_tiny_config(teacher_pt, **{"critic_optim.eps": -1.0}))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("total_steps", 0, "config.total_steps=0 must be >= 1"),
        ("log_every", -5, "config.log_every=-5 must be >= 1"),
        ("checkpoint_every", 0, "config.checkpoint_every=0 must be >= 1"),
        ("sample_every", -1, "config.sample_every=-1 must be >= 0"),
        ("data.batch_size", 0, "config.data.batch_size=0 must be >= 1"),
        ("distill.ema_rate", float("inf"), "config.distill.ema_rate=inf must be a finite number > 0"),
    ],
)
def test_bad_config_values_are_rejected(teacher_pt, field, value, message):
    from trigflow_distill.training import run_config

    with pytest.raises(ValueError, match=re.escape(message)):
        run_config.validate_config(_tiny_config(teacher_pt, **{field: value}))


def _trained(workdir):
    """A checkpoint folder: the workdir holds work (without one a changed config replaces the saved one,
    tests/test_first_run.py)."""
    (workdir / "checkpoints" / "3").mkdir(parents=True)


def test_resume_with_changed_batch_or_lr_is_refused(teacher_pt, tmp_path):
    from trigflow_distill.training import run_config

    assert run_config.resume_config(_tiny_config(teacher_pt), tmp_path) is None
    _trained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    changed = _tiny_config(teacher_pt, **{"data.batch_size": 8, "student_optim.lr": 1e-3})
    with pytest.raises(
        ValueError,
        match=r"another config.* Changed: data.batch_size: 4 -> 8; student_optim.lr: "
        r"0.0001 -> 0.001\. .*--config.allow_config_change=True",
    ):
        run_config.resume_config(changed, tmp_path)
    assert (tmp_path / "config.json").read_text() == saved
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json", "teacher_source.json"]
    # how long and how often may change: accepted, the previous config kept beside the new one
    note = run_config.resume_config(
        _tiny_config(teacher_pt, total_steps=100, log_every=7, **{"eval.num_samples": 8}), tmp_path
    )
    assert "only fields a resume may change" in note
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 100
    kept = [n for n in os.listdir(tmp_path) if n.startswith("config.") and n != "config.json"]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == json.dumps(json.loads(saved), indent=2)


def test_run_saved_before_a_field_was_added_resumes(teacher_pt, tmp_path):
    """A config.json without fields added later is read with those fields at the recipe's defaults (which keep the
    old behaviour), and with renamed fields under their new names: the same run as the new config; switching such a
    feature on is still a change. read_config gives the completed config."""
    from trigflow_distill.training import run_config

    old = json.loads(_tiny_config(teacher_pt).to_json_best_effort())
    del old["distill"]["guidance_conditioned"], old["distill"]["guidance_range"]
    old["distill"]["tangent_warmup"] = old["distill"].pop("student_warmup")  # the name before the layout move
    old["distill"]["rcm"]["tangent_ramp"] = old["distill"]["rcm"].pop("tangent_warmup")  # its name in between
    del old["distill"]["backward_simulation"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert run_config.config_changes(old, json.loads(_tiny_config(teacher_pt).to_json_best_effort())) == []
    switched = _tiny_config(teacher_pt, **{"distill.guidance_conditioned": True})
    assert run_config.config_changes(old, json.loads(switched.to_json_best_effort())) == [
        "distill.guidance_conditioned: False -> True"
    ]
    read = run_config.read_config(tmp_path)
    assert read.distill.guidance_conditioned is False and read.distill.student_warmup == 1
    assert read.distill.rcm.tangent_warmup == 100 and "tangent_ramp" not in read.distill.rcm
    assert "tangent_warmup" not in read.distill and read.distill.backward_simulation == "fixed"


def test_allowed_config_change_keeps_both_versions(teacher_pt, tmp_path):
    from trigflow_distill.training import run_config

    run_config.resume_config(_tiny_config(teacher_pt), tmp_path)
    note = run_config.resume_config(
        _tiny_config(teacher_pt, allow_config_change=True, **{"critic_optim.lr": 5e-4}), tmp_path
    )
    assert "critic_optim.lr: 0.0002 -> 0.0005" in note
    versions = sorted(n for n in os.listdir(tmp_path) if n.startswith("config"))
    assert len(versions) == 2 and "config.json" in versions
    lrs = {n: json.loads((tmp_path / n).read_text())["critic_optim"]["lr"] for n in versions}
    assert lrs.pop("config.json") == 5e-4 and list(lrs.values()) == [2e-4]


def test_resume_with_another_teacher_is_refused_before_anything_is_written(teacher_pt, tmp_path):
    from trigflow_distill.training import loop, run_config

    run_config.resume_config(_tiny_config(teacher_pt), tmp_path)
    _trained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    other = tmp_path.parent / "other_teacher.pt"
    other.write_bytes(teacher_pt.read_bytes())
    config = _tiny_config(other)
    with pytest.raises(ValueError, match=r"Changed: teacher.path: .*teacher.pt' -> .*other_teacher.pt'"):
        loop.train(config, str(tmp_path), _toy_source(config))
    # no teacher cache, no lock left
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json", "teacher_source.json"]
    assert (tmp_path / "config.json").read_text() == before


def test_another_teacher_file_at_the_same_path_is_refused_like_a_config_change(teacher_pt, tmp_path):
    """teacher_source.json records the teacher file's sizes and SHA-256 at the first start: a file replaced at the
    same path is refused before anything is written; touching it (same bytes) is fine; allow_config_change accepts
    the new file and keeps the old record."""
    import shutil

    from trigflow_distill.training import loop, run_config

    teacher = tmp_path / "teacher" / "teacher.pt"
    teacher.parent.mkdir()
    shutil.copy(teacher_pt, teacher)
    workdir = tmp_path / "run"
    workdir.mkdir()
    assert run_config.resume_config(_tiny_config(teacher), workdir) is None
    _trained(workdir)
    record = json.loads((workdir / "teacher_source.json").read_text())
    digest = __import__("hashlib").sha256(teacher.read_bytes()).hexdigest()
    assert record["files"]["teacher.pt"]["sha256"] == digest and record["path"] == str(teacher)
    os.utime(teacher, ns=(1, 1))  # same bytes, new mtime: the same teacher
    assert run_config.resume_config(_tiny_config(teacher), workdir) is None
    data = bytearray(teacher.read_bytes())
    data[len(data) // 2] ^= 1  # e.g. another checkpoint of the same size downloaded over the old one
    teacher.write_bytes(bytes(data))
    before = {n: (workdir / n).read_text() for n in os.listdir(workdir) if (workdir / n).is_file()}
    config = _tiny_config(teacher)
    with pytest.raises(
        ValueError,
        match=rf"the teacher file {re.escape(str(teacher))} is not the one .* Changed: teacher.pt: \d+ bytes sha256 "
        rf"{digest[:12]} -> \d+ bytes sha256 [0-9a-f]{{12}}\. .*--config.allow_config_change=True",
    ):
        loop.train(config, str(workdir), _toy_source(config))
    assert {
        n: (workdir / n).read_text() for n in os.listdir(workdir) if (workdir / n).is_file()
    } == before  # nothing written, no lock left
    note = run_config.resume_config(_tiny_config(teacher, allow_config_change=True), workdir)
    assert "teacher file changed (teacher.pt: " in note
    kept = [n for n in os.listdir(workdir) if n.startswith("teacher_source.") and n != "teacher_source.json"]
    assert len(kept) == 1 and json.loads((workdir / kept[0]).read_text())["files"]["teacher.pt"]["sha256"] == digest
    assert json.loads((workdir / "teacher_source.json").read_text())["files"]["teacher.pt"]["sha256"] != digest


def _dataset(path, seed, text_kind=None, width=8):
    from trigflow_distill import data

    rng = np.random.default_rng(seed)
    lat, txt = rng.normal(size=(4, 16, 3, 4, 4)).astype(np.float32), rng.normal(size=(4, 5, width)).astype(np.float32)
    return data.NpyDirSource(data.write_dataset(str(path), lat, txt, text_kind=text_kind))


def test_resume_on_another_dataset_is_refused_like_a_config_change(teacher_pt, tmp_path):
    """The dataset's fingerprint is recorded at the first start (dataset.json); a resumed run (a checkpoint) on
    other records is refused before anything is written (the saved iterator position would index another dataset),
    also through `train`; a workdir without checkpoints is fresh; allow_config_change accepts and keeps the record."""
    from trigflow_distill.training import loop, run_config

    a, b, workdir = _dataset(tmp_path / "a", 0), _dataset(tmp_path / "b", 1), tmp_path / "run"
    workdir.mkdir()
    rec_a, rec_b = run_config.dataset_record(a), run_config.dataset_record(b)
    assert rec_a["fingerprint"] != rec_b["fingerprint"]
    assert run_config.resume_config(_tiny_config(teacher_pt), workdir, dataset=rec_a) is None
    assert json.loads((workdir / "dataset.json").read_text()) == rec_a
    assert run_config.resume_config(_tiny_config(teacher_pt), workdir, dataset=rec_b) is None  # nothing trained yet
    assert json.loads((workdir / "dataset.json").read_text()) == rec_b
    run_config.resume_config(_tiny_config(teacher_pt), workdir, dataset=rec_a)
    _trained(workdir)
    moved = {**rec_a, "path": str(tmp_path / "elsewhere")}  # the same records at another path resume
    assert run_config.resume_config(_tiny_config(teacher_pt), workdir, dataset=moved) is None
    before = sorted(os.listdir(workdir))
    message = f"the dataset {rec_b['path']} is not the one {workdir} was trained on"
    with pytest.raises(ValueError, match=re.escape(message) + ".*allow_config_change=True"):
        run_config.resume_config(_tiny_config(teacher_pt), workdir, dataset=rec_b)
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.train(_tiny_config(teacher_pt), str(workdir), b)
    assert sorted(os.listdir(workdir)) == before and json.loads((workdir / "dataset.json").read_text()) == moved
    note = run_config.resume_config(_tiny_config(teacher_pt, allow_config_change=True), workdir, dataset=rec_b)
    assert "dataset changed" in note
    assert json.loads((workdir / "dataset.json").read_text()) == rec_b
    kept = [n for n in os.listdir(workdir) if n.startswith("dataset.") and n != "dataset.json"]
    assert len(kept) == 1 and json.loads((workdir / kept[0]).read_text()) == moved


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projected_context_of_another_teacher_is_refused_even_at_equal_widths(teacher_pt, tmp_path, dtype):
    """A projected-context dataset records its teacher's projection (meta["teacher"], as prepare writes it); the
    run's teacher (loaded at any teacher.dtype) matches it, another teacher of the same widths is refused, naming
    both and the fix."""
    from trigflow_distill.data.format import projection_fingerprint
    from trigflow_distill.models import cosmos_dit
    from trigflow_distill.prepare import encoders
    from trigflow_distill.training import builder

    config = _tiny_config(teacher_pt, **{"teacher.dtype": dtype})
    _, teacher = builder.load_teacher(config, str(tmp_path / "run"))
    proj = teacher["text_proj"]
    source = _dataset(tmp_path / "d", 0, "projected", width=proj["kernel"].shape[1])
    made_by = {"path": str(teacher_pt), "crossattn_proj": projection_fingerprint(*encoders.load_projection(teacher_pt))}
    meta = {**source.meta, "teacher": made_by}
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    source = type(source)(str(tmp_path / "d"))
    builder.check_projection(source, proj, str(teacher_pt))  # its own teacher: accepted
    other = cosmos_dit.init_params(cosmos_dit.get_preset("tiny", num_blocks=1), jax.random.PRNGKey(1))
    other = {k: np.asarray(v) for k, v in other["crossattn_proj"].items()}
    assert other["kernel"].shape == proj["kernel"].shape
    with pytest.raises(ValueError) as e:
        builder.check_projection(source, other, "/teachers/other.pt")
    text = str(e.value)
    assert "\n" not in text and str(teacher_pt) in text and "/teachers/other.pt" in text
    assert "re-run prepare with --teacher /teachers/other.pt" in text and f"--config.teacher.path={teacher_pt}" in text
    builder.check_projection(_dataset(tmp_path / "raw", 0), other)  # raw text: nothing to compare


def test_corrupted_config_json_names_the_file(teacher_pt, tmp_path):
    from trigflow_distill.training import loop

    (tmp_path / "config.json").write_text('{"seed": 0, "total_st')
    config = _tiny_config(teacher_pt)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))} is corrupted \("):
        loop.train(config, str(tmp_path), _toy_source(config))
    assert (tmp_path / "config.json").read_text() == '{"seed": 0, "total_st'
    from trigflow_distill.training import run_config

    with pytest.raises(ValueError, match=r"config.json is corrupted"):  # export / evaluate / generate read it too
        run_config.read_config(tmp_path)


def test_workdir_that_is_a_file_or_unwritable(teacher_pt, tmp_path, monkeypatch):
    from trigflow_distill.training import loop

    config = _tiny_config(teacher_pt)
    source = _toy_source(config)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--workdir .*file is a file; give a directory"):
        loop.train(config, str(tmp_path / "file"), source)
    with pytest.raises(ValueError, match="cannot create --workdir .*file/run"):
        loop.train(config, str(tmp_path / "file" / "run"), source)

    def read_only(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(lock.WorkdirLock, "acquire", read_only)
    with pytest.raises(ValueError, match=r"--workdir .*ro is not writable \(\[Errno 13\] Permission denied"):
        loop.train(config, str(tmp_path / "ro"), source)


def test_train_refuses_a_locked_workdir_before_writing(teacher_pt, tmp_path):
    from trigflow_distill.training import loop

    holder = lock.WorkdirLock(tmp_path)
    holder.acquire()
    config = _tiny_config(teacher_pt)
    try:
        with pytest.raises(errors.WorkdirLocked, match=f"pid {os.getpid()}"):
            loop.train(config, str(tmp_path), _toy_source(config))
        assert os.listdir(tmp_path) == [lock.LOCK_NAME]
    finally:
        holder.release()


def test_misspelled_mesh_axis_is_refused():
    """`dict(dta=-1, fsdp=1, seq=1)` used to train with every device computing the same full batch."""
    from trigflow_distill.common import sharding

    with pytest.raises(ValueError, match="unknown mesh axis 'dta'"):
        sharding.make_mesh(dict(dta=-1, fsdp=1, seq=1))


# --------------------------------------------------------------------------------------------- main.py end to end
def _main_cmd(workdir, teacher, *extra, steps=6):
    return kill_resume.command(workdir, teacher, steps, 2, *extra, keep=None)


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    return env


def _one_line_error(out, fragment):
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and lines[-1].startswith("error: ") and fragment in lines[-1], out.stderr
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing config file", "No such file or directory: 'configs/nope.py'"),
        ("unknown field", "--config.no_such_field: the config has no field 'no_such_field'"),
        ("mistyped value", "--config.seed=abc: invalid literal for int()"),
        ("total_steps 0", "config.total_steps=0 must be >= 1"),
        ("log_every 0", "config.log_every=0 must be >= 1"),
        ("nan lr", "config.student_optim.lr=nan must be a finite number >= 0"),
        ("workdir is a file", "is a file; give a directory"),
        ("corrupted config.json", "config.json is corrupted"),
        ("misspelled mesh axis in a config file", "unknown mesh axis 'dta'"),
    ],
)
def test_main_py_errors_are_one_line(teacher_pt, tmp_path, case, fragment):
    workdir = tmp_path / "run"
    cmd = _main_cmd(workdir, teacher_pt)
    if case == "missing config file":
        cmd[2] = "--config=configs/nope.py"
    extra = {
        "unknown field": ["--config.no_such_field=1"],
        "mistyped value": ["--config.seed=abc"],
        "log_every 0": ["--config.log_every=0"],
        "nan lr": ["--config.student_optim.lr=nan"],
    }.get(case, [])
    if case == "workdir is a file":
        workdir.write_text("x")
    if case == "corrupted config.json":
        workdir.mkdir()
        (workdir / "config.json").write_text("{not json")
    if case == "total_steps 0":
        cmd = _main_cmd(workdir, teacher_pt, steps=0)
    if case == "misspelled mesh axis in a config file":
        config_file, base = tmp_path / "my_config.py", os.path.join(ROOT, "configs/predict25_4step.py")
        config_file.write_text(
            "import importlib.util\nimport ml_collections\n"
            f"spec = importlib.util.spec_from_file_location('base', {base!r})\n"
            "base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n\n\n"
            "def get_config():\n    c = base.get_config('tiny')\n"
            "    c.mesh = ml_collections.ConfigDict(dict(dta=-1, fsdp=1, seq=1))\n    return c\n"
        )
        cmd = [a for a in cmd if not a.startswith("--config.mesh.")]
        cmd[2] = f"--config={config_file}"
    out = subprocess.run(cmd + extra, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    _one_line_error(out, fragment)


@pytest.mark.slow
def test_second_main_py_on_a_workdir_is_refused(teacher_pt, tmp_path):
    """Two runs on one workdir: the second exits 1 at once naming the first; after a kill -9 the lock is taken over
    and the run resumes."""
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        _main_cmd(workdir, teacher_pt, steps=100000), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "2").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run(_main_cmd(workdir, teacher_pt), env=_env(), capture_output=True, text=True, timeout=300)
        _one_line_error(second, f"in use by another run: host {socket.gethostname()} pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    resumed = subprocess.run(
        _main_cmd(workdir, teacher_pt, steps=4), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"took over the stale lock {workdir / lock.LOCK_NAME} of host {socket.gethostname()} pid {first.pid}"
        in resumed.stdout
        and "Resumed from" in resumed.stdout
    )
    assert not (workdir / lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_overflowing_parameters_are_never_saved(teacher_pt, tmp_path):
    """lr=1e39 is a finite config value but inf in float32: the gradients stay finite, the parameters do not. The
    run stops at the next save naming the last good checkpoint; no checkpoint holds a non-finite value."""
    workdir = tmp_path / "run"
    good = subprocess.run(
        _main_cmd(workdir, teacher_pt, steps=2), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert good.returncode == 0 and "checkpoint saved at step 2" in good.stdout, good.stderr[-2000:]
    bad = subprocess.run(
        _main_cmd(
            workdir,
            teacher_pt,
            "--config.student_optim.lr=1e39",
            "--config.critic_optim.lr=1e39",
            "--config.allow_config_change=True",
            "--config.max_consecutive_skips=1000",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = _one_line_error(bad, "the train state of step 4 has non-finite values")
    assert f"The last committed checkpoint is step 2 in {workdir / 'checkpoints'}" in line
    import orbax.checkpoint as ocp

    steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert steps == [2]
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))


# ------------------------------------------------------------------------------------------ teacher cache integrity
def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_teacher_cache_is_detected_and_rebuilt(teacher_pt, tmp_path, capsys):
    from trigflow_distill.models.cosmos_dit import convert, teacher_cache

    cache = tmp_path / "cache"
    _, first = teacher_cache.load_teacher(teacher_pt, cache, progress=False)
    expected = jax.tree.map(np.array, first)
    (entry,) = cache.iterdir()
    leaf = max((entry / "params").iterdir(), key=lambda p: p.stat().st_size)
    _flip_middle_byte(leaf)
    with pytest.raises(ValueError, match=rf"params/{re.escape(leaf.name)} does not match the CRC-32 recorded at"):
        convert.load_converted(entry)
    capsys.readouterr()
    _, again = teacher_cache.load_teacher(teacher_pt, cache, progress=False)
    err = capsys.readouterr().err
    assert f"teacher cache {entry} is incomplete or corrupted (ValueError: " in err and "converting again" in err
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, again), expected)
    # a converted folder written by the CLI: the flipped byte is a one-line error, nothing is exported
    folder = tmp_path / "converted"
    assert convert.main([str(teacher_pt), str(folder)]) == 0
    _flip_middle_byte(folder / "params" / leaf.name)
    capsys.readouterr()
    assert convert.main([str(folder), str(tmp_path / "out.pt"), "--export-torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: params/{leaf.name} does not match") and err.count("\n") == 1
    assert not (tmp_path / "out.pt").exists()


def test_converted_folder_without_hashes_loads_unverified_and_the_cache_rebuilds_it(teacher_pt, tmp_path, capsys):
    from trigflow_distill.models.cosmos_dit import convert, teacher_cache

    cache = tmp_path / "cache"
    teacher_cache.load_teacher(teacher_pt, cache, progress=False)
    (entry,) = cache.iterdir()
    meta = json.loads((entry / "source.json").read_text())
    for leaf in meta["params"].values():
        del leaf["crc32"]
    (entry / "source.json").write_text(json.dumps(meta))
    capsys.readouterr()
    convert.load_converted(entry)
    assert "converted before content hashes were recorded: not verified" in capsys.readouterr().err
    teacher_cache.load_teacher(teacher_pt, cache, progress=False)
    assert "(no content hashes, converted by an older version); converting again" in capsys.readouterr().err
    assert all("crc32" in v for v in json.loads((entry / "source.json").read_text())["params"].values())


# Issue 22 item 7: conditioning images of every PIL mode, scaled by the mode's range; decompression bombs refused.


@pytest.mark.parametrize(
    "mode, make, gray",
    [
        ("I;16", lambda: np.full((6, 8), 32896, np.uint16), 128),  # 16-bit PNG: 32896 = 128 * 257, not white
        ("I;16", lambda: np.full((6, 8), 65535, np.uint16), 255),
        ("I", lambda: np.full((6, 8), 257 * 200, np.int32), 200),  # 32-bit integers, taken as 16-bit
        ("F", lambda: np.full((6, 8), 0.5, np.float32), 128),  # float in [0, 1]
        ("F", lambda: np.full((6, 8), 7.0, np.float32), 255),  # clipped
    ],
)
def test_wide_image_modes_are_scaled_not_clipped(tmp_path, mode, make, gray):
    """PIL's convert("RGB") clips I;16 / I / F to 0..255: a 16-bit grayscale PNG became white."""
    from PIL import Image

    from trigflow_distill.inference import inputs

    img = Image.fromarray(make())
    assert img.mode == mode
    path = tmp_path / ("image.png" if mode == "I;16" else "image.tif")
    img.save(path)
    frames = inputs.read_image(str(path))
    assert frames.shape == (1, 6, 8, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, np.full((1, 6, 8, 3), gray, np.uint8))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1"])
def test_other_image_modes_become_rgb_with_transparency_over_white(tmp_path, mode):
    from PIL import Image

    from trigflow_distill.inference import inputs

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # top: opaque red
    rgba[2:] = (0, 0, 255, 0)  # bottom: fully transparent (blue stored under alpha 0)
    img = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        img = img.convert("P")
        img.info["transparency"] = img.getpixel((0, 3))
    elif mode != "RGBA":
        img = img.convert(mode)
    img.save(tmp_path / "image.png" if mode != "CMYK" else tmp_path / "image.tif")
    frames = inputs.read_image(str(tmp_path / ("image.png" if mode != "CMYK" else "image.tif")))
    assert frames.shape == (1, 4, 4, 3) and frames.dtype == np.uint8
    if mode in ("RGBA", "LA", "P"):
        np.testing.assert_array_equal(frames[0, 2:], 255)  # transparent pixels over white, not the stored blue/black
    if mode in ("RGBA", "P", "CMYK"):
        np.testing.assert_array_equal(frames[0, :2], np.broadcast_to([255, 0, 0], (2, 4, 3)))


@pytest.mark.parametrize("pixels", [40 * 40, 100 * 100])  # PIL's warning (1x..2x the limit) and its error (> 2x)
def test_decompression_bomb_image_is_a_one_line_error(tmp_path, monkeypatch, pixels):
    from PIL import Image

    from trigflow_distill.inference import inputs

    side = int(pixels**0.5)
    Image.new("L", (side, side)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"bomb\.png: too large to decode safely") as e:
        inputs.read_image(str(tmp_path / "bomb.png"))
    assert "\n" not in str(e.value)


# Issue 22 item 4: sizes a DiT checkpoint implies are bounded before the loader builds anything from them.


def test_dit_block_count_from_a_damaged_name_is_refused_before_anything_is_built(tmp_path):
    from trigflow_distill.models import cosmos_dit, torchfile
    from trigflow_distill.models.cosmos_dit import convert
    from trigflow_distill.models.cosmos_dit import names as sdmap

    shapes = sdmap.native_shapes(cosmos_dit.get_preset("tiny"))
    damaged = {**shapes, "blocks.999999999.mlp.layer1.weight": shapes["blocks.0.mlp.layer1.weight"]}
    # Without the limit this returns a config of a billion blocks, whose tensor list is an out-of-memory kill.
    with pytest.raises(ValueError, match=r"num_blocks = 1000000000 .* out of range \(1\.\.512\)"):
        sdmap.infer_config(damaged)

    # Through the loader (20000 blocks: small enough not to hurt without the limit), naming the file.
    state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    state["blocks.19999.mlp.layer1.weight"] = state["blocks.0.mlp.layer1.weight"]
    torchfile.save(tmp_path / "teacher.pt", state)
    with pytest.raises(ValueError, match=r"teacher\.pt: num_blocks = 20000 .* out of range") as e:
        convert.load_torch_checkpoint(tmp_path / "teacher.pt")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_full_disk_during_a_save_prints_one_error_line(teacher_pt, tmp_path):
    """A real full disk (a 12 MiB tmpfs: the teacher cache and checkpoint 1 fit, checkpoint 2 does not): one
    `error:` line naming the last committed step, none of the hundreds of Orbax 'Event loop is closed' tracebacks.
    Needs the right to mount (root in a container that allows it), else skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        cmd = kill_resume.command(disk / "run", teacher_pt, 4, 1, keep=None)
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
        line = _one_line_error(out, "saving checkpoint 2 in ")
        assert "No space left on device" in line and "The last committed checkpoint is step 1" in line
        assert "Event loop is closed" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
