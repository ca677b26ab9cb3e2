"""Video files in and out (PyAV) and the reference's frame preprocessing (docs/algorithm.md §12).

- `read_video(path) -> (frames (T,H,W,3) uint8, fps)`, `write_mp4(path, frames, fps)` (libx264, yuv420p);
- `buckets(resolution)`, `choose_bucket(width, height, resolution)`: the (width, height) bucket of nearest aspect;
- `resize_and_pad(frames, bucket_wh) -> (video (3,T,H,W) float32 in [-1, 1], padding_mask (1,H,W) float32)`:
  aspect-preserving bicubic antialiased resize to fit inside the bucket, centre reflection padding (edge padding
  when a pad is not smaller than the frame), mask 1 on padded pixels;
- `resize_and_crop(frames, size_wh) -> (video, padding_mask of zeros)`: NVIDIA's inference CLI preprocessing, resize
  to cover the target and centre-crop;
- `to_uint8(video (3,T,H,W)) -> frames (T,H,W,3) uint8`, clamping to [-1, 1].
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import av
import numpy as np
from etils import epath
from PIL import Image

# docs/algorithm.md §12: aspect name -> (width, height) per resolution
_BUCKETS = {
    "720": {"1:1": (960, 960), "4:3": (960, 704), "3:4": (704, 960), "16:9": (1280, 704), "9:16": (704, 1280)},
    "480": {"1:1": (480, 480), "4:3": (640, 480), "3:4": (480, 640), "16:9": (768, 432), "9:16": (432, 768)},
    "256": {"1:1": (256, 256), "4:3": (320, 256), "3:4": (256, 320), "16:9": (320, 192), "9:16": (192, 320)},
}
_ASPECTS = {"1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "16:9": 16 / 9, "9:16": 9 / 16}
RESOLUTIONS = tuple(_BUCKETS)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of the first video stream as (T, H, W, 3) uint8 RGB, and its frame rate."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such video file")
    if p.is_file() and p.stat().length == 0:
        # FFmpeg's own answer is a bare "[Errno 22] Invalid argument" without the file's name.
        raise ValueError(f"{path}: empty file (0 bytes), not a video; an interrupted copy or download?")
    frames, fps = [], None
    try:
        with p.open("rb") as f, av.open(f) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.FFmpegError, EOFError, OSError) as e:  # OSError: what FFmpeg's I/O errors come out as
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e}); is it a valid video file?") from e
    if not frames:
        raise ValueError(f"{path}: the video has no decodable frames")
    return np.stack(frames), fps


def write_mp4(path: str | os.PathLike, frames_thw3: np.ndarray, fps: float) -> None:
    """Writes (T, H, W, 3) uint8 RGB frames as H.264 (yuv420p) mp4; H and W must be even."""
    frames = np.asarray(frames_thw3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 needs (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4: frame size {w}x{h} must be even for yuv420p (crop or pad one pixel)")
    if fps <= 0:
        raise ValueError(f"write_mp4: fps must be positive, got {fps}")
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rate = round(fps * 1000)
    with p.open("wb") as f, av.open(f, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(rate, 1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = None  # the encoder numbers the frames at the stream rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def buckets(resolution: str) -> dict[str, tuple[int, int]]:
    """Aspect name -> (width, height) of a resolution ("720", "480" or "256")."""
    if str(resolution) not in _BUCKETS:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    return dict(_BUCKETS[str(resolution)])


def choose_bucket(width: int, height: int, resolution: str) -> tuple[int, int]:
    """(width, height) of the bucket whose aspect ratio is nearest to width / height."""
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size {width}x{height} must be positive")
    table = buckets(resolution)
    name = min(table, key=lambda a: abs(width / height - _ASPECTS[a]))
    return table[name]


def resize_and_pad(frames_thw3: np.ndarray, bucket_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T,H,W,3) uint8 -> (video (3,T,Hb,Wb) float32 in [-1,1], padding mask (1,Hb,Wb) float32).

    Resize keeping the aspect ratio so the frame fits inside (r = min(Wb/W, Hb/H), size int(r*H + 0.5) x
    int(r*W + 0.5), PIL bicubic, which is antialiased), then centre reflection padding (left = (Wb - w')//2, top
    likewise; edge padding when a pad is not smaller than the frame). The mask is 1 on padded pixels.
    """
    frames = np.asarray(frames_thw3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"resize_and_pad needs (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    bw, bh = bucket_wh
    _, h, w, _ = frames.shape
    r = min(bw / w, bh / h)
    nh, nw = min(int(r * h + 0.5), bh), min(int(r * w + 0.5), bw)
    if (nh, nw) != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BICUBIC)) for f in frames])
    left, top = (bw - nw) // 2, (bh - nh) // 2
    pads = ((top, bh - nh - top), (left, bw - nw - left))
    reflect = max(pads[0]) < nh and max(pads[1]) < nw
    video = np.pad(frames, ((0, 0), *pads, (0, 0)), mode="reflect" if reflect else "edge")
    video = np.transpose(video, (3, 0, 1, 2)).astype(np.float32) / 127.5 - 1.0
    mask = np.ones((1, bh, bw), np.float32)
    mask[:, top : top + nh, left : left + nw] = 0.0
    return video, mask


def resize_and_crop(frames_thw3: np.ndarray, size_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T,H,W,3) uint8 -> (video (3,T,Hs,Ws) float32 in [-1,1], padding mask (1,Hs,Ws) of zeros).

    NVIDIA's inference CLI (`resize_input` in cosmos-predict2.5 `_src/predict2/inference/video2world.py`): scale by
    r = max(Ws/W, Hs/H) so the frame covers the target, size ceil(r*H) x ceil(r*W), bilinear with antialiasing
    (torchvision's default on uint8; PIL's BILINEAR is the same filter), then torchvision's centre crop: top =
    int(round((h' - Hs)/2)), left likewise (Python's round, half to even). Nothing is padded, so the mask is zeros.
    """
    frames = np.asarray(frames_thw3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"resize_and_crop needs (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    sw, sh = size_wh
    _, h, w, _ = frames.shape
    r = max(sw / w, sh / h)
    nh, nw = math.ceil(r * h), math.ceil(r * w)
    if (nh, nw) != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in frames])
    top, left = int(round((nh - sh) / 2.0)), int(round((nw - sw) / 2.0))
    video = frames[:, top : top + sh, left : left + sw]
    video = np.transpose(video, (3, 0, 1, 2)).astype(np.float32) / 127.5 - 1.0
    return video, np.zeros((1, sh, sw), np.float32)


def to_uint8(video_3thw: np.ndarray) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] (clamped) -> (T, H, W, 3) uint8."""
    v = np.clip(np.asarray(video_3thw, np.float32), -1.0, 1.0)
    return np.round((v + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)
