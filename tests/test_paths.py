"""Remote paths: a short tiny job whose workdir is gs://bucket/run, served by a fake gs:// (tests/remote_fs.py), writes
everything there (config, metrics, TensorBoard, samples, teacher cache, checkpoints) and nothing into a local folder
named after the URL; export reads the run from gs:// and writes to gs://; datasets are read from gs://.

Orbax saves cannot be served by the fake (see remote_fs), so the job's CheckpointManager is pointed at the fake's
folder for gs://bucket/run/checkpoints; Orbax *reads* (export's partial restore) do go through gs://.
"""

import json
import os

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import tensorstore_utils

from tests import remote_fs
from tests.test_metrics import summaries
from trigflow_distill import data, data_kinds
from trigflow_distill.inference import export
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import checkpoint, loop, restore

import predict25_4step  # configs/ is on the pytest pythonpath


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    root.mkdir()
    remote_fs.serve_gs(root, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
    return root


def _no_local_url_folders(tmp_path):
    assert sorted(os.listdir(tmp_path)) == ["gcs", "teacher"], os.listdir(tmp_path)


@pytest.mark.slow
def test_tiny_job_on_a_remote_workdir(tmp_path, gcs, monkeypatch, capsys):
    net = cosmos_dit.get_preset("tiny", num_blocks=2)
    teacher_pt = tmp_path / "teacher" / "teacher.pt"
    teacher_pt.parent.mkdir()
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(0)), net, teacher_pt)
    remote_fs.redirect_checkpoints(gcs, monkeypatch)

    config = predict25_4step.get_config("tiny")
    config.teacher.path = str(teacher_pt)
    config.data.batch_size = 8  # one record per simulated device
    config.total_steps = 1  # one (student) update: one compile
    config.log_every = config.checkpoint_every = config.sample_every = 1
    config.eval.at_end = False
    source, write_samples = data_kinds.get(config).open(config)
    loop.train(config, "gs://bucket/run", source, write_samples)

    rundir = gcs / "bucket" / "run"
    assert json.loads((rundir / "config.json").read_text())["teacher"]["path"] == str(teacher_pt)
    assert json.loads((rundir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert [f.startswith("events.out.tfevents") for f in os.listdir(rundir / "tensorboard")] == [True]
    assert {("samples", 1), ("student/loss", 1)} <= set(summaries(rundir / "tensorboard"))  # the grid too
    assert sorted(os.listdir(rundir / "samples")) == ["0000001.json", "0000001.png"]  # the picture and what it shows
    assert len(os.listdir(rundir / "teacher_cache")) == 1
    assert "1" in os.listdir(rundir / "checkpoints")

    assert export.main(["--workdir=gs://bucket/run", "--out=gs://bucket/student.pt"]) == 0
    assert export.main(["--workdir=gs://bucket/run", "--out=gs://bucket/student.pt"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export.main(["--workdir=gs://bucket/run", "--out=gs://bucket/student.pt", "--overwrite"]) == 0
    _, _, student = restore.load_student("gs://bucket/run")
    ema = {**student["net"], "crossattn_proj": student["text_proj"]}
    exported_config, exported = convert.load_torch_checkpoint(gcs / "bucket" / "student.pt")
    assert exported_config == net and set(exported) == set(ema)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype))  # bf16 export of the EMA
    _no_local_url_folders(tmp_path)


def test_dataset_on_a_remote_path(tmp_path, gcs):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((5, 16, 2, 4, 4), np.float32)
    text = rng.standard_normal((5, 3, 8), np.float32)
    data.write_dataset("gs://bucket/data", latents, text, num_cond_frames=np.array([0, 1, 0, 1, 0]), shard_size=2)
    assert "meta.json" in os.listdir(gcs / "bucket" / "data")
    remote, local = data.NpyDirSource("gs://bucket/data"), data.NpyDirSource(str(gcs / "bucket" / "data"))
    assert len(remote) == 5 and remote.spec == local.spec
    for i in range(5):
        a, b = remote[i], local[i]
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{i} {k}")
    np.testing.assert_array_equal(remote[3]["latents"], latents[3])
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing/meta.json not found"):
        data.NpyDirSource("gs://bucket/nothing")
    assert sorted(os.listdir(tmp_path)) == ["gcs"]


def test_orbax_gets_the_url():
    """What the fake cannot serve: Orbax's own gs:// I/O. Our checkpoint folder reaches it as a gs:// URL (not made
    absolute as a local path), which TensorStore opens with its GCS driver on the right bucket and path."""
    directory = checkpoint.checkpoint_dir("gs://bucket/run")
    assert os.fspath(directory) == "gs://bucket/run/checkpoints"
    spec = tensorstore_utils.build_kvstore_tspec(os.fspath(directory / "1" / "state"), use_ocdbt=True)
    assert spec["base"] == {"driver": "gcs", "bucket": "bucket", "path": "run/checkpoints/1/state"}
