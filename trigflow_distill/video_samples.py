"""Samples during training on real data: the EMA student's latent samples decoded by the Wan2.1 VAE and written as
videos (docs/algorithm.md §10).

`VideoSamples(vae_src, tensorboard_dir)` loads the VAE once; `write(samples_bcthw, out_dir, step)` decodes up to
`max_videos` samples and writes `<out_dir>/<step>_<i>.mp4` (full resolution), `<out_dir>/<step>.gif` (the videos
side by side, at most `gif_height` pixels high) and the same GIF per clip to TensorBoard (image summaries
`samples/video/<i>`, which TensorBoard animates) in an event file of its own under `tensorboard_dir`; a metrics
writer with `write_videos(step, {name: (N,T,H,W,3)}, fps)` (e.g. one that also logs to W&B) can be passed
instead. Called as a train.SampleWriter `(samples, batch, path)` it writes next to `path`, the trainer's
`<workdir>/samples/<step>.png` (and TensorBoard to `<workdir>/tensorboard` by default). data_kinds uses it for
data.kind "dir" when config.vae.path is set.
"""
from __future__ import annotations

import io
import os

import numpy as np
from etils import epath
from PIL import Image

from trigflow_distill import vae, video


class VideoSamples:
    """Decodes latent samples (B, 16, T, h, w) with a Wan2.1 VAE and writes mp4s, a GIF and metrics videos."""

    def __init__(self, vae_src: str, tensorboard_dir: str | None = None, fps: float = 16.0, max_videos: int = 4,
                 gif_height: int = 192, dtype: str = "float32", writer=None):
        self.cfg, self.params = vae.load(vae_src)
        self.fps, self.max_videos, self.gif_height, self.dtype = fps, max_videos, gif_height, dtype
        self.tensorboard_dir = tensorboard_dir
        self.writer = writer  # metrics writer with write_videos(step, {name: (N,T,H,W,3)}, fps), or None

    def decode(self, samples_bcthw) -> np.ndarray:
        """Frames (N, T, H, W, 3) uint8 of the first max_videos samples, decoded one at a time (a 93-frame 720p
        decode needs tens of GB beside the training state)."""
        samples = np.asarray(samples_bcthw)[:self.max_videos]
        return np.stack([video.to_uint8(np.asarray(vae.decode(self.cfg, self.params, x[None], dtype=self.dtype))[0])
                         for x in samples])

    def write(self, samples_bcthw, out_dir: str, step: int, writer=None) -> np.ndarray:
        """Writes the videos of `step` under out_dir (and to `writer` or self.writer); returns their frames."""
        frames = self.decode(samples_bcthw)
        out = epath.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(frames):
            video.write_mp4(out / f"{step:07d}_{i}.mp4", clip, self.fps)
        (out / f"{step:07d}.gif").write_bytes(gif_bytes(side_by_side(frames, self.gif_height), self.fps))
        writer = writer or self.writer
        if writer is not None:
            writer.write_videos(step, {"samples/video": frames}, fps=self.fps)
        elif self.tensorboard_dir:
            self._tensorboard(step, frames)
        return frames

    def _tensorboard(self, step: int, frames_nthw3: np.ndarray) -> None:
        from tensorboardX import SummaryWriter  # only the process that writes samples opens an event file
        from tensorboardX.proto.summary_pb2 import Summary

        values = []
        for i, clip in enumerate(frames_nthw3):
            small = side_by_side(clip[None], self.gif_height)
            image = Summary.Image(height=small.shape[1], width=small.shape[2], colorspace=3,
                                  encoded_image_string=gif_bytes(small, self.fps))
            values.append(Summary.Value(tag=f"samples/video/{i}", image=image))
        with SummaryWriter(self.tensorboard_dir, filename_suffix=".samples") as tb:
            tb._get_file_writer().add_summary(Summary(value=values), step)

    def __call__(self, samples_bcthw, batch, path: str, writer=None) -> None:
        """train.SampleWriter: `path` is the trainer's <workdir>/samples/<step>.png; the videos go beside it and to
        the trainer's metrics `writer` (TensorBoard, W&B; any workdir), else without a tensorboard_dir to
        <workdir>/tensorboard."""
        writer = writer or self.writer
        if self.tensorboard_dir is None and writer is None:
            self.tensorboard_dir = os.path.join(os.path.dirname(os.path.dirname(path)), "tensorboard")
        self.write(samples_bcthw, os.path.dirname(path), int(os.path.splitext(os.path.basename(path))[0]), writer)


def side_by_side(frames_nthw3: np.ndarray, height: int) -> np.ndarray:
    """(T, h, N*w, 3): the N clips next to each other, each resized to at most `height` pixels high."""
    n, t, h, w, _ = frames_nthw3.shape
    if h > height:
        size = (max(1, round(w * height / h)), height)
        frames_nthw3 = np.stack([[np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in clip]
                                 for clip in frames_nthw3])
    return np.concatenate(list(frames_nthw3), axis=2)


def gif_bytes(frames_thw3: np.ndarray, fps: float) -> bytes:
    """An endlessly looping GIF of (T, H, W, 3) uint8 frames."""
    images = [Image.fromarray(f) for f in frames_thw3]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()
