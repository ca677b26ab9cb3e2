"""A run written before the layout move (commit 4183af3, by the old flat modules) still exports and resumes.

tests/data/run_before_layout_move.tgz holds that run: the tiny config on a random 1-block teacher (`teacher.pt`),
2 iterations, its config.json (with the old field names distill.tangent_warmup / distill.rcm.tangent_warmup) and
the step-2 TrainState checkpoint. Made with, at 4183af3:

    python main.py --config=configs/predict25_4step.py:tiny --workdir=W --config.teacher.path=teacher.pt \
        --config.total_steps=2 --config.checkpoint_every=2 --config.keep_checkpoints=1 --config.eval.at_end=False \
        --config.sample_every=0 --config.data.batch_size=8 --config.log_every=1
"""

import json
import pathlib
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from trigflow_distill.inference import export
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import restore, run_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / "tests" / "data" / "run_before_layout_move.tgz"


@pytest.fixture
def old_run(tmp_path):
    """The old run unpacked, its config.json pointing at the unpacked teacher (the user's files moved with it)."""
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    workdir = tmp_path / "workdir"
    saved = json.loads((workdir / "config.json").read_text())
    assert "tangent_warmup" in saved["distill"] and "student_warmup" not in saved["distill"]  # the old names
    saved["teacher"]["path"] = str(tmp_path / "teacher.pt")
    (workdir / "config.json").write_text(json.dumps(saved, indent=2))
    return workdir


def test_old_run_reads_and_exports(old_run, tmp_path):
    config = run_config.read_config(old_run)
    assert config.distill.student_warmup == 1 and config.distill.rcm.tangent_warmup == 100
    step, restored = restore.restore_params(old_run)
    assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    export.export_student(str(old_run), str(tmp_path / "student.pt"))
    _, params = convert.load_torch_checkpoint(str(tmp_path / "student.pt"))
    ema = restored["student_ema"]
    np.testing.assert_allclose(
        np.asarray(params["x_embedder"]["kernel"], np.float32),
        np.asarray(ema["x_embedder"]["kernel"]).astype(np.float32),
        rtol=1e-2,  # the export is bfloat16
        atol=1e-2,
    )


@pytest.mark.slow
def test_old_run_resumes_with_main_py(old_run):
    """`python main.py` with the tiny config (the saved run's) goes on from step 2 to step 3."""
    saved = json.loads((old_run / "config.json").read_text())
    cmd = [
        sys.executable,
        "main.py",
        "--config=configs/predict25_4step.py:tiny",
        f"--workdir={old_run}",
        f"--config.teacher.path={saved['teacher']['path']}",
        "--config.total_steps=3",
        "--config.checkpoint_every=2",
        "--config.keep_checkpoints=1",
        "--config.eval.at_end=False",
        "--config.sample_every=0",
        "--config.data.batch_size=8",
        "--config.log_every=1",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from" in out.stdout and "at step 2" in out.stdout, out.stdout[-2000:]
    assert restore.restore_params(old_run)[0] == 3
