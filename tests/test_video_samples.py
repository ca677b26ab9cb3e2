"""video_samples: latent samples decoded by a tiny random Wan2.1 VAE into mp4s, a GIF and metrics videos."""

import io
import os
import struct

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from trigflow_distill import data, data_kinds
from trigflow_distill.common import video
from trigflow_distill.models import cosmos_dit, torchfile, wan_vae
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import loop, video_samples

import predict25_4step

CFG = wan_vae.WanVAEConfig(dim=8, z_dim=16)


def _events(path, step=None) -> list:
    """Summary values of a TensorBoard event file (TFRecord framing: length, crc, event, crc), of `step` or all."""
    data, pos, values = open(path, "rb").read(), 0, []
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        values += [v for v in event.summary.value if step in (None, event.step)]
        pos += 12 + n + 4
    return values


class FakeWriter:
    def __init__(self):
        self.calls = []

    def write_videos(self, step, videos, fps):
        self.calls.append((step, videos, fps))


def test_samples_written_as_mp4_gif_and_metrics_videos(tmp_path):
    params = wan_vae.init_params(CFG, jax.random.key(0))
    torchfile.save(tmp_path / "wan_vae.pth", wan_vae.to_torch(params, CFG))
    samples = np.asarray(jax.random.normal(jax.random.key(1), (3, 16, 2, 4, 6)))  # 5 frames of 32x48
    writer = FakeWriter()
    samples_writer = video_samples.VideoSamples(str(tmp_path / "wan_vae.pth"), fps=8, max_videos=2, gif_height=16)
    samples_writer(samples, {"latents": samples}, str(tmp_path / "samples" / "0000500.png"), writer)

    want = np.stack([video.to_uint8(p) for p in np.asarray(wan_vae.decode(CFG, params, samples[:2]))])
    ((step, videos, fps),) = writer.calls
    assert step == 500 and fps == 8
    # decoded one at a time vs as a batch: a rare rounding difference of one level
    np.testing.assert_allclose(videos["samples/video"].astype(int), want.astype(int), atol=1)
    for i in range(2):
        frames, rate = video.read_video(tmp_path / "samples" / f"0000500_{i}.mp4")
        assert frames.shape == (5, 32, 48, 3) and rate == 8
    assert not (tmp_path / "samples" / "0000500_2.mp4").exists()  # max_videos
    gif = Image.open(io.BytesIO((tmp_path / "samples" / "0000500.gif").read_bytes()))
    assert gif.size == (2 * 24, 16) and gif.n_frames == 5  # two clips side by side, resized to 16 px high
    samples_writer(samples, {}, str(tmp_path / "samples" / "0000600.png"))  # no metrics writer: files only
    assert (tmp_path / "samples" / "0000600.gif").exists() and len(writer.calls) == 1


@pytest.mark.slow
def test_training_on_a_dataset_dir_writes_decoded_sample_videos(tmp_path):
    """data.kind "dir" + config.vae.path: the trainer's sample writer is VideoSamples (data_kinds)."""
    net = cosmos_dit.get_preset("tiny")
    convert.export_torch(cosmos_dit.init_params(net, jax.random.key(0)), net, tmp_path / "teacher.pt")
    torchfile.save(tmp_path / "wan_vae.pth", wan_vae.to_torch(wan_vae.init_params(CFG, jax.random.key(1)), CFG))
    rng = np.random.default_rng(0)
    data.write_dataset(
        str(tmp_path / "data"),
        rng.normal(size=(8, 16, 2, 4, 6)).astype(np.float32),
        rng.normal(size=(8, 8, 96)).astype(np.float32),
    )
    config = predict25_4step.get_config("tiny")
    config.data.kind, config.data.path, config.vae.path = "dir", str(tmp_path / "data"), str(tmp_path / "wan_vae.pth")
    config.teacher.path = str(tmp_path / "teacher.pt")
    config.data.batch_size = 8  # one sample per (simulated) device
    config.total_steps = config.log_every = config.checkpoint_every = config.sample_every = 1
    config.eval.at_end = False
    source, write_samples = data_kinds.get(config).open(config)
    assert isinstance(write_samples, video_samples.VideoSamples)
    loop.train(config, str(tmp_path / "run"), source, write_samples)

    samples = tmp_path / "run" / "samples"
    # max_videos; 0000001.json says what each sample is (tests/test_first_run.py)
    assert sorted(os.listdir(samples)) == ["0000001.gif", "0000001.json"] + [f"0000001_{i}.mp4" for i in range(4)]
    assert video.read_video(samples / "0000001_0.mp4")[0].shape == (5, 32, 48, 3)
    tags = {
        v.tag
        for name in os.listdir(tmp_path / "run" / "tensorboard")
        for v in _events(tmp_path / "run" / "tensorboard" / name, step=1)
        if v.HasField("image")
    }
    assert tags == {f"samples/video/{i}" for i in range(4)}  # animated GIFs through the run's metrics writer
