"""main.py with 2 processes x 4 CPU devices on loopback (gloo collectives) against 1 process x 8 devices.

Same mesh (data 2 x fsdp 4) and global batch in both layouts: the trained states must agree, checkpoints must
resume across the two layouts, and a killed process must stop its peer within a bounded time.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert, teacher_cache

pytestmark = pytest.mark.slow  # multi-process main.py runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, LOG_EVERY = 4, 2, 2  # student steps at 0 only (freq 5); few steps: gloo on loopback is slow
HEARTBEAT_S = 15  # TRIGFLOW_HEARTBEAT_TIMEOUT_S of the runs here
LOST_BOUND_S = 60  # a survivor must have stopped within this many seconds of its peer being killed
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Folder with a random tiny teacher, its converted cache (read by every run) and a JAX compile cache."""
    root = tmp_path_factory.mktemp("multihost")
    net = cosmos_dit.get_preset("tiny", num_blocks=1)
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(1)), net, root / "teacher.pt")
    teacher_cache.load_teacher(root / "teacher.pt", root / "teacher_cache")
    return root


def _args(workdir, shared):
    return [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--config=" + os.path.join(ROOT, "configs/predict25_4step.py:tiny"),
        f"--workdir={workdir}",
        f"--config.teacher.path={shared / 'teacher.pt'}",
        f"--config.teacher.cache_dir={shared / 'teacher_cache'}",
        f"--config.total_steps={STEPS}",
        f"--config.checkpoint_every={EVERY}",
        "--config.keep_checkpoints=5",
        "--config.data.batch_size=8",
        f"--config.log_every={LOG_EVERY}",
        "--config.sample_every=0",
        "--config.eval.at_end=False",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.mesh.seq=1",
    ]


def _env(shared, devices):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TRIGFLOW_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
        # Runs of the same layout compile the same programs: compile them once.
        JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _start_one(workdir, shared, tag=""):
    log = f"{workdir}{tag}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_args(workdir, shared), env=_env(shared, 8), stdout=out, stderr=subprocess.STDOUT)
    return [(proc, log)]


def _start_two(workdir, shared, tag=""):
    """Processes 0 and 1 of one run, each with 4 CPU devices; logs in <workdir><tag>.p{0,1}.log."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        log = f"{workdir}{tag}.p{i}.log"
        cmd = _args(workdir, shared) + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
        with open(log, "w") as out:
            procs.append((subprocess.Popen(cmd, env=_env(shared, 4), stdout=out, stderr=subprocess.STDOUT), log))
    return procs


def _finish(procs):
    """Waits for every process; asserts each exited 0. Returns process 0's log."""
    try:
        for proc, log in procs:
            proc.wait(timeout=RUN_TIMEOUT_S)
            assert proc.returncode == 0, f"{log} exited {proc.returncode}:\n{_tail(log)}"
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return _read(procs[0][1])


def _state(workdir, step=STEPS):
    """The saved TrainState as numpy arrays (read on one device: the saving topology may not exist here)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as ckpt:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), ckpt.metadata(path).item_metadata.tree
        )
        return jax.tree.map(np.asarray, ckpt.restore(path, target))


def _assert_states_close(ref, got):
    assert int(got["step"]) == int(ref["step"]) == STEPS
    flat_ref, flat_got = jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree_util.tree_flatten_with_path(got)[0]
    assert [p for p, _ in flat_ref] == [p for p, _ in flat_got]
    for (path, a), (_, b) in zip(flat_ref, flat_got):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def _resume_from(source_workdir, workdir):
    """A fresh workdir holding only checkpoint EVERY of `source_workdir`."""
    shutil.copytree(
        os.path.join(source_workdir, "checkpoints", str(EVERY)), os.path.join(workdir, "checkpoints", str(EVERY))
    )


@pytest.fixture(scope="module")
def reference(shared):
    """The uninterrupted single-process 8-device run (checkpoints at EVERY and STEPS)."""
    workdir = shared / "ref"
    _finish(_start_one(workdir, shared))
    return workdir


def test_two_processes_train_like_one_and_resume_in_one(shared, reference):
    workdir = shared / "two"
    _finish(_start_two(workdir, shared))
    _assert_states_close(_state(reference), _state(workdir))
    # Metrics and logs come from process 0 only: one metrics line per LOG_EVERY steps, nothing from process 1.
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert "checkpoint saved" in _read(f"{workdir}.p0.log") and "checkpoint saved" not in _read(f"{workdir}.p1.log")

    resumed = shared / "two_then_one"
    _resume_from(workdir, resumed)
    log = _finish(_start_one(resumed, shared))
    assert f"Resumed from {resumed} at step {EVERY}" in log, log[-3000:]
    _assert_states_close(_state(reference), _state(resumed))


def test_one_process_checkpoint_resumes_in_two(shared, reference):
    resumed = shared / "one_then_two"
    _resume_from(reference, resumed)
    log = _finish(_start_two(resumed, shared))
    assert f"Resumed from {resumed} at step {EVERY}" in log, log[-3000:]
    _assert_states_close(_state(reference), _state(resumed))


def test_killed_process_stops_the_other_and_restart_resumes(shared, reference):
    workdir = shared / "killed"
    procs = _start_two(workdir, shared)
    (survivor, survivor_log), (victim, victim_log) = procs
    try:
        first_ckpt = workdir / "checkpoints" / str(EVERY)  # appears (renamed from a tmp dir) once complete
        deadline = time.time() + RUN_TIMEOUT_S
        while not first_ckpt.is_dir() and survivor.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first_ckpt.is_dir(), f"no checkpoint {EVERY}:\n{_tail(survivor_log)}"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        victim.wait(timeout=60)
        survivor.wait(timeout=LOST_BOUND_S + 30)
        lost_after = time.time() - killed_at
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (workdir / "checkpoints" / str(STEPS)).exists(), "the run ended before it could be killed"
    log = _read(survivor_log)
    assert survivor.returncode != 0, log[-3000:]
    assert lost_after < LOST_BOUND_S, f"survivor took {lost_after:.0f} s to stop"
    # JAX's coordination service names the silent task (process 1) and says that it died.
    assert "another task died" in log and "stopped sending heartbeats):\n1\n" in log, log[-3000:]

    log = _finish(_start_two(workdir, shared, tag=".restart"))
    assert f"Resumed from {workdir} at step {EVERY}" in log, log[-3000:]
    _assert_states_close(_state(reference), _state(workdir))
