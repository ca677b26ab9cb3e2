"""Training metrics: clu.metrics aggregation; TensorBoard (tensorboardX, no TensorFlow), a JSONL file and optionally
Weights & Biases; a console line.

Only process 0 writes (the caller passes `enabled=False` elsewhere). The workdir may be local or remote (`gs://...`,
anything etils.epath opens). tensorboardX and W&B write local files, and object stores cannot append, so for a
remote workdir the writer keeps `metrics.jsonl` and the TensorBoard event files in a local temporary folder and
copies them to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` at most every `sync_every_s` seconds and at
`close` (an existing remote metrics.jsonl is fetched first, so a resumed run appends to it). TensorBoard reads
`gs://` log folders directly (`tensorboard --logdir=gs://bucket/run/tensorboard`).

W&B (config.wandb, off by default; `pip install -e ".[wandb]"`): `wandb` is imported only when enabled; the run id
is drawn here (wandb.util.generate_id is gone in wandb 0.31) and kept in `<workdir>/wandb_run_id` so a resumed job
continues the same W&B run.

Speed and ETA (`Rate`): the loop reports the seconds of each step that compiled (the first step of each update and
bucket) with `Writer.exclude`; those steps and seconds are left out of it/s and of the ETA, which otherwise swing
with every compile.
"""

import io
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid

import numpy as np
from clu import metrics as clu_metrics
from etils import epath
from PIL import Image

from trigflow_distill.common import cli, paths

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB_ID = "wandb_run_id"


def new_run_id() -> str:
    """A W&B run id: 8 lowercase hex characters (W&B ids are [a-z0-9], what generate_id drew)."""
    return secrets.token_hex(4)


def format_duration(seconds: float) -> str:
    """42s, 17m42s, 3h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Rate:
    """Steps per second between log points and since the start, without the steps that compiled.

    `start(step, now)` marks where timing begins (else the first `update` does); `exclude(seconds, steps)` takes
    a compile step out of the current interval; `update(step, now)` -> (rate of the interval, rate so far), each
    None while no plain step has been timed. The ETA uses the rate so far: steady across buckets of different size.
    """

    def __init__(self):
        self._last = None  # (step, time) of the previous log point
        self._skip_steps = 0
        self._skip_s = 0.0
        self._steps = 0
        self._seconds = 0.0

    def start(self, step: int, now: float):
        self._last = (step, now)
        self._skip_steps, self._skip_s = 0, 0.0

    def exclude(self, seconds: float, steps: int = 1):
        self._skip_steps += steps
        self._skip_s += seconds

    def update(self, step: int, now: float) -> tuple[float | None, float | None]:
        if self._last is None:
            self.start(step, now)
            return None, None
        steps = step - self._last[0] - self._skip_steps
        seconds = now - self._last[1] - self._skip_s
        self.start(step, now)
        interval = None
        if steps > 0 and seconds > 0:
            interval = steps / seconds
            self._steps += steps
            self._seconds += seconds
        overall = self._steps / self._seconds if self._seconds > 0 else None
        return interval, overall


class Aggregator:
    """Averages per-step scalar metrics between two log points with clu.metrics.Average."""

    def __init__(self):
        self._avg = {}

    def add(self, step_metrics):
        for name, value in step_metrics.items():
            m = clu_metrics.Average.from_model_output(np.asarray(value, np.float32))
            self._avg[name] = self._avg[name].merge(m) if name in self._avg else m

    def compute_and_reset(self):
        out = {name: float(m.compute()) for name, m in self._avg.items()}
        self._avg = {}
        return out


def gif_bytes(video_thwc: np.ndarray, fps: float = 4.0) -> bytes:
    """An animated GIF of uint8 frames (T,H,W,3)."""
    frames = [Image.fromarray(f) for f in _uint8(video_thwc)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def _uint8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"pictures must be uint8 RGB arrays (..., H, W, 3), got dtype {x.dtype}.")
    if x.shape[-1] != 3:
        raise ValueError(f"pictures must be (..., H, W, 3) RGB, got shape {x.shape}.")
    return x


class Writer:
    """Writes scalars (and pictures) to `workdir/tensorboard`, `workdir/metrics.jsonl` and, when `wandb_config`
    says so, Weights & Biases; prints a progress line per `write`.

    wandb_config: config.wandb (fields enabled, project, entity, name, mode) or None. run_config: a dict recorded as
    the W&B run's config.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        tokens_per_step: int,
        enabled: bool = True,
        wandb_config=None,
        run_config: dict | None = None,
        sync_every_s: float = 60.0,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.sync_every_s = sync_every_s
        self._rate = Rate()
        self._wandb = self._run = None  # the wandb module and its run, when enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # optional heavy import kept local

        self._workdir = epath.Path(workdir)
        self._remote = paths.is_remote(os.fspath(workdir))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._local = tempfile.mkdtemp(prefix="trigflow_metrics_") if self._remote else os.fspath(workdir)
        if self._remote and (self._workdir / JSONL).exists():
            (self._workdir / JSONL).copy(epath.Path(self._local, JSONL), overwrite=True)
        # a unique event file per job: remote copies of two jobs started in the same second must not collide
        self._tb = SummaryWriter(os.path.join(self._local, TENSORBOARD), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        self._jsonl = open(os.path.join(self._local, JSONL), "a")
        self._synced = time.monotonic()
        if wandb_config is not None and wandb_config.enabled:
            self._start_wandb(wandb_config, run_config)

    def _start_wandb(self, cfg, run_config):
        try:
            import wandb  # optional dependency: imported only when config.wandb.enabled
        except ImportError as e:
            raise ValueError(
                'config.wandb.enabled=True but the `wandb` package is not installed: `pip install -e ".[wandb]"` '
                '(or `pip install "wandb>=0.25,<0.32"`), or run with --config.wandb.enabled=False.'
            ) from e
        id_file = self._workdir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else new_run_id()
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.project or None,
            entity=cfg.entity or None,
            name=cfg.name or None,
            mode=cfg.mode,
            id=run_id,
            resume="allow",
            dir=self._local,
            config=run_config,
        )
        if not id_file.exists():
            id_file.write_text(run_id)

    def start(self, step: int):
        """Timing starts now, at `step` (the loop calls it before its first step)."""
        self._rate.start(step, time.perf_counter())

    def exclude(self, seconds: float, steps: int = 1):
        """Leave `steps` steps taking `seconds` (a compile) out of it/s and the ETA."""
        self._rate.exclude(seconds, steps)

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        rate, overall = self._rate.update(step, time.perf_counter())
        if rate is not None:
            scalars = dict(scalars, steps_per_sec=rate, tokens_per_sec=rate * self.tokens_per_step)
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log(dict(scalars), step=step)
        self._maybe_sync()
        eta = format_duration((self.total_steps - step) / overall) if overall else "?"
        shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()) if k.endswith(("loss", "grad_norm")))
        speed = f"{rate:.2f} it/s {rate * self.tokens_per_step:.3g} tok/s" if rate else "compiling"
        cli.say(f"[{step:6d}/{self.total_steps}] {speed} eta {eta} | {shown}")

    def write_images(self, step: int, images: dict):
        """images: {name: uint8 RGB (H,W,3) or a batch (N,H,W,3)}, e.g. a sample grid."""
        if not self.enabled:
            return
        for name, img in images.items():
            img = _uint8(img)
            batch = img[None] if img.ndim == 3 else img
            self._tb.add_images(name, batch, step, dataformats="NHWC")
            if self._run is not None:
                self._run.log({name: [self._wandb.Image(x) for x in batch]}, step=step)
        self._tb.flush()
        self._maybe_sync()

    def write_videos(self, step: int, videos: dict, fps: float = 4.0):
        """videos: {name: uint8 RGB (T,H,W,3) or a batch (N,T,H,W,3)}. TensorBoard shows each as an animated GIF
        (in its images tab), W&B as a video."""
        if not self.enabled:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        for name, vid in videos.items():
            vid = _uint8(vid)
            batch = vid[None] if vid.ndim == 4 else vid
            gifs = [gif_bytes(v, fps) for v in batch]
            values = [
                Summary.Value(
                    tag=f"{name}/{i}",
                    image=Summary.Image(height=v.shape[1], width=v.shape[2], colorspace=3, encoded_image_string=g),
                )
                for i, (v, g) in enumerate(zip(batch, gifs))
            ]
            self._tb._get_file_writer().add_summary(Summary(value=values), step)
            if self._run is not None:  # encoded here: wandb would need moviepy to encode raw frames
                self._run.log({name: [self._wandb.Video(io.BytesIO(g), format="gif") for g in gifs]}, step=step)
        self._tb.flush()
        self._maybe_sync()

    def _maybe_sync(self, force: bool = False):
        """Remote workdir: copy the local metrics.jsonl and event files there (every sync_every_s seconds)."""
        if not self._remote or (not force and time.monotonic() - self._synced < self.sync_every_s):
            return
        epath.Path(self._local, JSONL).copy(self._workdir / JSONL, overwrite=True)
        tb = self._workdir / TENSORBOARD
        tb.mkdir(parents=True, exist_ok=True)
        for f in epath.Path(self._local, TENSORBOARD).iterdir():
            f.copy(tb / f.name, overwrite=True)
        self._synced = time.monotonic()

    def close(self):
        if not self.enabled:
            return
        self._tb.close()
        self._jsonl.close()
        if self._run is not None:
            self._run.finish()
        self._maybe_sync(force=True)
        if self._remote:
            shutil.rmtree(self._local, ignore_errors=True)
