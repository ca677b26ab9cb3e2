"""Samples during training on real data: the EMA student's latent samples decoded by the Wan2.1 VAE and written as
videos (docs/algorithm.md §10).

`VideoSamples(vae_src)` loads the VAE once. As a train.SampleWriter `(samples, batch, path, writer)` it decodes up
to `max_videos` samples (one at a time: a 93-frame 720p decode needs tens of GB beside the training state) and
writes, next to the trainer's `<workdir>/samples/<step>.png` path, `<step>_<i>.mp4` (full resolution) and
`<step>.gif` (the videos side by side, at most `gif_height` pixels high); the run's metrics writer gets the clips
(`write_videos`: animated GIFs `samples/video/<i>` in TensorBoard, videos in W&B when it is on). The trainer writes
`<step>.json` beside them: what sample i is (record, caption, conditioning frames, seed; `loop.validation_batch`).
data_kinds uses it for data.kind "dir" when config.vae.path is set.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from PIL import Image

from trigflow_distill.common import video
from trigflow_distill.models import wan_vae
from trigflow_distill.training import metrics


class VideoSamples:
    """Decodes latent samples (B, 16, T, h, w) with a Wan2.1 VAE and writes mp4s, a GIF and metrics videos."""

    def __init__(
        self, vae_src: str, fps: float = 16.0, max_videos: int = 4, gif_height: int = 192, dtype: str = "float32"
    ):
        self.cfg, self.params = wan_vae.load(vae_src)
        self.fps, self.max_videos, self.gif_height, self.dtype = fps, max_videos, gif_height, dtype

    def decode(self, samples_bcthw) -> np.ndarray:
        """Frames (N, T, H, W, 3) uint8 of the first max_videos samples, decoded one at a time."""
        samples = np.asarray(samples_bcthw)[: self.max_videos]
        return np.stack(
            [
                video.to_uint8(np.asarray(wan_vae.decode(self.cfg, self.params, x[None], dtype=self.dtype))[0])
                for x in samples
            ]
        )

    def write(self, samples_bcthw, out_dir: str, step: int, writer=None) -> np.ndarray:
        """Writes the videos of `step` under out_dir and to `writer` (a metrics.Writer or None); returns them."""
        frames = self.decode(samples_bcthw)
        out = epath.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(frames):
            video.write_mp4(out / f"{step:07d}_{i}.mp4", clip, self.fps)
        (out / f"{step:07d}.gif").write_bytes(metrics.gif_bytes(side_by_side(frames, self.gif_height), self.fps))
        if writer is not None:
            writer.write_videos(step, {"samples/video": frames}, fps=self.fps)
        return frames

    def __call__(self, samples_bcthw, batch, path: str, writer=None) -> None:
        """train.SampleWriter: `path` is the trainer's <workdir>/samples/<step>.png; the videos go beside it."""
        self.write(samples_bcthw, os.path.dirname(path), int(os.path.splitext(os.path.basename(path))[0]), writer)


def side_by_side(frames_nthw3: np.ndarray, height: int) -> np.ndarray:
    """(T, h, N*w, 3): the N clips next to each other, each resized to at most `height` pixels high."""
    _, _, h, w, _ = frames_nthw3.shape
    if h > height:
        size = (max(1, round(w * height / h)), height)
        frames_nthw3 = np.stack(
            [[np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in clip] for clip in frames_nthw3]
        )
    return np.concatenate(list(frames_nthw3), axis=2)
