"""The real `wandb` package (the `[wandb]` extra, installed by `.[test]`) in offline mode, driven through
metrics.Writer exactly as the training loop drives it: the run config of the tiny recipe, scalars, a sample grid,
sample videos, close, then a resumed job. tests/test_metrics.py checks the calls against a fake module."""

import glob
import os

import numpy as np
import pytest
from PIL import Image

from trigflow_distill.training import metrics

import predict25_4step  # configs/ is on the pytest pythonpath

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, every folder it would write under tmp_path, no key, no network."""
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    yield
    wandb.teardown()  # stops the wandb-core service this test started


def _train_like(workdir, config, step):
    """What loop.train does with its Writer: the run config, start, a log line, pictures, videos, close."""
    writer = metrics.Writer(
        str(workdir), int(config.total_steps), 100, wandb_config=config.wandb, run_config=config.to_dict()
    )
    writer.start(step - 5)
    writer.write(step, {"student/loss": 0.625, "critic/loss": 2.5})
    rng = np.random.default_rng(step)
    grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    writer.write_images(step, {"samples": grid})
    writer.write_videos(step, {"clips": rng.integers(0, 256, (2, 5, 6, 8, 3), dtype=np.uint8)}, fps=5)
    writer.close()
    wandb.teardown()  # the wandb-core service writes the run file asynchronously; as at the end of training
    return grid


def test_real_wandb_offline_run_and_resume(tmp_path, offline):
    config = predict25_4step.get_config("tiny")
    config.wandb.enabled = True
    config.wandb.mode = "offline"
    grid = _train_like(tmp_path, config, 5)

    run_id = (tmp_path / metrics.WANDB_ID).read_text()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    log = open(os.path.join(run_dir, f"run-{run_id}.wandb"), "rb").read()
    assert b"student/loss" in log and b"critic/loss" in log and b"trigflow-distill" in log  # history and config
    (png,) = glob.glob(os.path.join(run_dir, "files", "media", "images", "samples_5_*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), grid)
    gifs = glob.glob(os.path.join(run_dir, "files", "media", "videos", "clips_5_*.gif"))
    assert len(gifs) == 2 and Image.open(gifs[0]).n_frames == 5

    # the resumed job logs to the same W&B run
    _train_like(tmp_path, config, 10)
    assert (tmp_path / metrics.WANDB_ID).read_text() == run_id
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)
