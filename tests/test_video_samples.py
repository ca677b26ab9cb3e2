"""video_samples: latent samples decoded by a tiny random Wan2.1 VAE into mp4s, a GIF and metrics videos."""
import io

import jax
import numpy as np
from PIL import Image

from trigflow_distill import torchfile, vae, video, video_samples
from trigflow_distill.networks import wan_vae

CFG = wan_vae.WanVAEConfig(dim=8, z_dim=16)


class FakeWriter:
    def __init__(self):
        self.calls = []

    def write_videos(self, step, videos, fps):
        self.calls.append((step, videos, fps))


def test_samples_written_as_mp4_gif_and_metrics_videos(tmp_path):
    params = wan_vae.init_params(CFG, jax.random.key(0))
    torchfile.save(tmp_path / "vae.pth", wan_vae.to_torch(params, CFG))
    samples = np.asarray(jax.random.normal(jax.random.key(1), (3, 16, 2, 4, 6)))  # 5 frames of 32x48
    writer = FakeWriter()
    samples_writer = video_samples.VideoSamples(str(tmp_path / "vae.pth"), fps=8, max_videos=2, gif_height=16,
                                                writer=writer)
    samples_writer(samples, {"latents": samples}, str(tmp_path / "samples" / "0000500.png"))

    want = np.stack([video.to_uint8(p) for p in np.asarray(vae.decode(CFG, params, samples[:2]))])
    (step, videos, fps), = writer.calls
    assert step == 500 and fps == 8
    np.testing.assert_array_equal(videos["samples/video"], want)
    for i in range(2):
        frames, rate = video.read_video(tmp_path / "samples" / f"0000500_{i}.mp4")
        assert frames.shape == (5, 32, 48, 3) and rate == 8
    assert not (tmp_path / "samples" / "0000500_2.mp4").exists()  # max_videos
    gif = Image.open(io.BytesIO((tmp_path / "samples" / "0000500.gif").read_bytes()))
    assert gif.size == (2 * 24, 16) and gif.n_frames == 5  # two clips side by side, resized to 16 px high
