"""metrics.Writer: JSONL + TensorBoard contents, pictures and videos, the optional W&B writer (a fake `wandb` module:
the real package offline is tests/test_wandb.py), remote workdirs (a fake gs://)."""

import importlib.abc
import io
import json
import os
import re
import struct
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from tests import remote_fs
from trigflow_distill import data_kinds
from trigflow_distill.training import metrics

import predict25_4step  # configs/ is on the pytest pythonpath


def read_events(folder) -> list:
    """Every Event in the TensorBoard event files of `folder` (TFRecord framing: len, crc, data, crc)."""
    events = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
            pos += 12 + n + 4
    return events


def summaries(folder) -> dict:
    """{(tag, step): Summary.Value}."""
    return {(v.tag, e.step): v for e in read_events(folder) for v in e.summary.value}


def wandb_config(**kw):
    return ml_collections.ConfigDict(
        dict(dict(enabled=True, project="proj", entity="", name="run1", mode="offline"), **kw)
    )


class FakeWandb(types.ModuleType):
    """Records init / log / finish, and the Image / Video objects built."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.calls.append(("log", data, step))

            def finish(self):
                fake.calls.append(("finish",))

        class Image:
            def __init__(self, data):
                self.data = np.asarray(data)

        class Video:
            def __init__(self, data_or_path, format=None):
                self.data, self.format = data_or_path.getvalue(), format

        self.Image, self.Video, self._Run = Image, Video, Run
        self.util = types.SimpleNamespace()  # as in wandb 0.31: no generate_id

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self._Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_scalars_pictures_and_videos(tmp_path, fake_wandb, capsys):
    writer = metrics.Writer(
        str(tmp_path), total_steps=10, tokens_per_step=100, wandb_config=wandb_config(), run_config={"seed": 0}
    )
    writer.write(1, {"student/loss": 0.5})
    writer.write(3, {"student/loss": 0.25, "critic/loss": 2.0})
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (2, 5, 6, 8, 3), dtype=np.uint8)  # (N,T,H,W,3)
    writer.write_images(3, {"samples": grid})
    writer.write_videos(3, {"clips": video}, fps=5)
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "student/loss": 0.5}
    assert lines[1]["step"] == 3 and lines[1]["critic/loss"] == 2.0 and lines[1]["steps_per_sec"] > 0
    assert lines[1]["tokens_per_sec"] == pytest.approx(100 * lines[1]["steps_per_sec"])
    assert "[     3/10]" in capsys.readouterr().out

    tb = summaries(tmp_path / "tensorboard")
    assert tb[("student/loss", 1)].simple_value == 0.5 and tb[("critic/loss", 3)].simple_value == 2.0
    png = Image.open(io.BytesIO(tb[("samples", 3)].image.encoded_image_string))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), grid)
    gif = Image.open(io.BytesIO(tb[("clips/1", 3)].image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5
    gif.seek(2)
    np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), video[1, 2])

    init, *logs, finish = fake_wandb.calls
    run_id = init[1]["id"]
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    assert init == (
        "init",
        dict(
            project="proj",
            entity=None,
            name="run1",
            mode="offline",
            id=run_id,
            resume="allow",
            dir=str(tmp_path),
            config={"seed": 0},
        ),
    )
    assert finish == ("finish",)
    assert logs[0] == ("log", {"student/loss": 0.5}, 1)
    assert logs[1][1]["critic/loss"] == 2.0 and logs[1][2] == 3
    ((name, images),) = logs[2][1].items()
    assert name == "samples" and logs[2][2] == 3
    np.testing.assert_array_equal(images[0].data, grid)
    ((name, videos),) = logs[3][1].items()
    assert name == "clips" and len(videos) == 2 and videos[0].format == "gif"
    assert videos[1].data == tb[("clips/1", 3)].image.encoded_image_string
    assert (tmp_path / "wandb_run_id").read_text() == run_id

    # a resumed job continues the same W&B run; a new workdir gets a new one
    metrics.Writer(str(tmp_path), 10, 100, wandb_config=wandb_config()).close()
    assert fake_wandb.calls[-2][1]["id"] == run_id
    metrics.Writer(str(tmp_path / "other"), 10, 100, wandb_config=wandb_config()).close()
    assert fake_wandb.calls[-2][1]["id"] not in (run_id, None)


class _RecordImports(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def test_wandb_not_imported_when_off(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    finder = _RecordImports()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for config in (None, wandb_config(enabled=False)):
        writer = metrics.Writer(str(tmp_path), 4, 1, wandb_config=config)
        writer.write(1, {"loss": 1.0})
        writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
        writer.close()
    assert "wandb" not in finder.names and "wandb" not in sys.modules
    assert not (tmp_path / "wandb_run_id").exists()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match="wandb.enabled=True but the `wandb` package is not installed"):
        metrics.Writer(str(tmp_path), 4, 1, wandb_config=wandb_config())


def test_pictures_must_be_uint8_rgb(tmp_path):
    writer = metrics.Writer(str(tmp_path), 4, 1)
    with pytest.raises(ValueError, match="uint8"):
        writer.write_images(1, {"x": np.zeros((4, 4, 3), np.float32)})
    writer.close()


def test_remote_workdir(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    remote_fs.serve_gs(root, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
    writer = metrics.Writer("gs://bucket/run", 4, 1, sync_every_s=3600)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    assert not (root / "bucket" / "run" / "metrics.jsonl").exists()  # synced at most every sync_every_s
    writer.close()
    run = root / "bucket" / "run"
    assert [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1.0, 0.5]
    assert summaries(run / "tensorboard")[("loss", 2)].simple_value == 0.5

    writer = metrics.Writer("gs://bucket/run", 4, 1, sync_every_s=0)  # a resumed job appends
    writer.write(3, {"loss": 0.25})
    assert (run / "metrics.jsonl").read_text().count("\n") == 3  # synced at once with sync_every_s=0
    writer.close()
    assert len(os.listdir(run / "tensorboard")) == 2  # one event file per job, both kept
    assert sorted(os.listdir(tmp_path)) == ["gcs"]


def test_toy_sample_writer_sends_its_grid(tmp_path, fake_wandb):
    config = predict25_4step.get_config("tiny")
    source, write_samples = data_kinds.get(config).open(config)
    records = [source[i] for i in range(8)]
    x = np.stack([r["latents"] for r in records])
    (tmp_path / "samples").mkdir()
    writer = metrics.Writer(str(tmp_path), 10, 1, wandb_config=wandb_config())
    write_samples(
        x, {"prompt": np.stack([r["prompt"] for r in records])}, str(tmp_path / "samples" / "0000007.png"), writer
    )
    writer.close()
    png = np.asarray(Image.open(tmp_path / "samples" / "0000007.png").convert("RGB"))
    tb = Image.open(io.BytesIO(summaries(tmp_path / "tensorboard")[("samples", 7)].image.encoded_image_string))
    np.testing.assert_array_equal(np.asarray(tb.convert("RGB")), png)
    ((_, data, step),) = [c for c in fake_wandb.calls if c[0] == "log"]
    assert step == 7
    np.testing.assert_array_equal(data["samples"][0].data, png)
