"""main.py end to end: a run killed with SIGKILL and resumed equals an uninterrupted run, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import kill_resume  # benchmarks/ is on the pytest pythonpath: one main.py command line for both
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow  # end-to-end main.py runs in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 24, 8


def _cmd(workdir, teacher):
    return kill_resume.command(workdir, teacher, STEPS, EVERY, log_every=4, keep=None)


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a laptop
    return env


def _final_state(workdir):
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def ref_run(teacher_pt, tmp_path_factory):
    """An uninterrupted run of STEPS steps, ending with a small evaluation: (workdir, stdout)."""
    ref_dir = tmp_path_factory.mktemp("ref")
    cmd = _cmd(ref_dir, teacher_pt) + ["--config.eval.at_end=True", "--config.eval.num_samples=16"]
    out = subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True, timeout=900)
    return ref_dir, out.stdout


def test_run_ends_with_the_evaluation(ref_run):
    """The main job's smoke run: distillation, then the evaluation table, eval.json, samples and pictures."""
    ref_dir, stdout = ref_run
    assert "sampler" in stdout and "student_ema" in stdout and "floor" in stdout, stdout[-2000:]
    result = json.loads((ref_dir / "eval.json").read_text())
    names = {(r["name"], r["steps"]) for r in result["samplers"]}
    assert {("teacher", 35), ("teacher", 4), ("student", 4), ("student_ema", 1), ("data", 0)} <= names
    samples = np.load(ref_dir / "samples_student4.npz")
    assert samples["latents"].shape == (16, 16, 4, 8, 8) and samples["prompt"].shape == (16,)
    assert (ref_dir / "student_ema4.png").exists() and (ref_dir / "student_ema4.gif").exists()
    assert (ref_dir / "metrics.jsonl").read_text().count("\n") == STEPS // 4


def test_kill_and_resume_equals_uninterrupted(teacher_pt, ref_run, tmp_path):
    ref_dir, run_dir = ref_run[0], tmp_path / "run"

    proc = subprocess.Popen(
        _cmd(run_dir, teacher_pt), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first_ckpt = run_dir / "checkpoints" / str(EVERY)
    for line in proc.stdout:  # kill -9 as soon as the first checkpoint is complete on disk
        if line.startswith(f"checkpoint saved at step {EVERY}"):
            deadline = time.time() + 60
            while not (first_ckpt / "state").is_dir() and time.time() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "checkpoints" / str(STEPS)).exists()

    resumed = subprocess.run(
        _cmd(run_dir, teacher_pt), env=_env(), check=True, capture_output=True, text=True, timeout=600
    )
    assert "Resumed from" in resumed.stdout, resumed.stdout
    ref, got = _final_state(ref_dir), _final_state(run_dir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got["step"]) == STEPS


def test_missing_teacher_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--config=" + os.path.join(ROOT, "configs/predict25_4step.py"),
        f"--workdir={tmp_path}",
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "config.teacher.path is empty" in out.stderr and "Traceback" not in out.stderr


def test_unknown_config_key_is_rejected(tmp_path):
    cmd = _cmd(tmp_path, "x.pt") + ["--config.no_such_field=1"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no_such_field" in out.stderr


def test_export_student_loads_in_torch(ref_run, tmp_path):
    """The exported EMA student is a complete native Cosmos .pt (with the teacher's text projection)."""
    ref_dir = ref_run[0]
    torch = pytest.importorskip("torch")
    out = tmp_path / "student.pt"
    subprocess.run(
        [sys.executable, "-m", "trigflow_distill.inference.export", f"--workdir={ref_dir}", f"--out={out}"],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    sd = torch.load(out, weights_only=True)
    assert "net.crossattn_proj.0.weight" in sd and all(k.startswith("net.") for k in sd)
    ema = _final_state(ref_dir)["student_ema"]
    w = sd["net.blocks.0.mlp.layer1.weight"].float().numpy()
    np.testing.assert_allclose(w, np.asarray(ema["blocks"]["mlp"]["layer1"]["kernel"][0]).T, rtol=1e-2, atol=1e-3)


def test_diverging_run_stops_with_a_clear_message(teacher_pt, tmp_path):
    """Absurd learning rates blow the nets up: non-finite updates are skipped, then the run stops, exit code 1."""
    cmd = _cmd(tmp_path, teacher_pt) + [
        "--config.student_optim.lr=1e30",
        "--config.critic_optim.lr=1e30",
        "--config.max_consecutive_skips=3",
        "--config.log_every=1",
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "consecutive updates had a non-finite loss or gradient" in out.stderr and "Traceback" not in out.stderr
