"""The inputs of a prepare job (docs/algorithm.md §12): the videos of a folder or list file, their captions, and
their evenly spaced clips decoded with PyAV and preprocessed into their buckets.

- `list_videos(videos) -> (paths, root)`, `read_captions(jsonl) -> {key: caption}`, `make_items(paths, root,
  captions) -> [Item]` (JSONL key = relative name, bare file name or full path; else a sidecar .txt);
- `clip_starts(num_frames, frames, clips)`: first frames of the evenly spaced clips;
- `read_clip_frames(path, frames, clips)`: decodes only the frames of those clips;
- `load_clips(item, resolution, frames, clips) -> [Clip]`: the clips resized and padded into their bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import av
import jax
import numpy as np
from etils import epath

from trigflow_distill.common import paths, video

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input video: its path, its name relative to the videos root (the caption key) and its caption."""

    path: str
    name: str
    caption: str | None


def list_videos(videos: str) -> tuple[list[str], str]:
    """(sorted video paths, root they are named relative to) of a folder or a list file."""
    p = epath.Path(videos)
    if not p.exists():
        raise FileNotFoundError(f"--videos {videos}: no such folder or list file")
    if p.is_dir():
        video_paths = sorted(
            os.fspath(d / f)
            for d, _, files in p.walk()
            for f in files
            if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS
        )
        if not video_paths:
            raise ValueError(f"--videos {videos}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in the folder")
        return video_paths, os.fspath(p)
    root = os.fspath(p.parent)
    video_paths = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            video_paths.append(line if paths.is_remote(line) or os.path.isabs(line) else os.path.join(root, line))
    if not video_paths:
        raise ValueError(f"--videos {videos}: the list file names no videos")
    return video_paths, root


def read_captions(path: str | None) -> dict[str, str]:
    """{"video" key: caption} of a captions JSONL file (empty without one)."""
    if path is None:
        return {}
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--captions {path}: no such file")
    out = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {path} line {n}: not JSON ({e})") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("video"), str)
            or not isinstance(entry.get("caption"), str)
        ):
            raise ValueError(f'--captions {path} line {n}: expected {{"video": "name.mp4", "caption": "..."}}')
        out[entry["video"]] = entry["caption"]
    return out


def _sidecar_caption(path: str) -> str | None:
    txt = epath.Path(os.path.splitext(path)[0] + ".txt")
    return txt.read_text().strip() if txt.exists() else None


def make_items(video_paths: Sequence[str], root: str, captions: dict[str, str]) -> list[Item]:
    """Items with their captions: JSONL key = relative name, bare file name or full path; else a sidecar .txt.
    Warns (stderr) about JSONL keys that name no video: a wrong key layout would otherwise skip every video."""
    items, used = [], set()
    for path in video_paths:
        name = os.path.relpath(path, root) if not paths.is_remote(path) else path[len(root) :].lstrip("/")
        key = next((k for k in (name, os.path.basename(path), path) if k in captions), None)
        used.add(key)
        caption = captions[key] if key is not None else _sidecar_caption(path)
        items.append(Item(path, name, caption))
    unused = [k for k in captions if k not in used]
    if unused and jax.process_index() == 0:
        print(
            f"warning: {len(unused)} of {len(captions)} --captions entries name no video of --videos (e.g. "
            f"{unused[0]!r}); keys are paths relative to {root}, bare file names or full paths",
            file=sys.stderr,
        )
    return items


def clip_starts(num_frames: int, frames: int, clips: int) -> list[int]:
    """First frames of `clips` evenly spaced clips of `frames` frames in a video of `num_frames` ([] if too short)."""
    if num_frames < frames:
        return []
    if clips == 1:
        return [0]
    span = num_frames - frames
    return sorted({int(round(k * span / (clips - 1))) for k in range(clips)})


@dataclasses.dataclass
class Clip:
    """A preprocessed clip: frames (T, H, W, 3) uint8 in its bucket, padding mask (1, H, W) uint8 (1 = padded)."""

    item: Item
    start: int
    frames_thw3: np.ndarray
    mask_1hw: np.ndarray
    bucket: tuple[int, int]
    fps: float


def read_clip_frames(path: str, frames: int, clips: int) -> tuple[dict[int, np.ndarray], float, int]:
    """({start: frames (frames, H, W, 3) uint8}, fps, frames decoded) of the evenly spaced clips of a video.

    Decodes with PyAV only as far as the last clip needs (one clip: its first `frames` frames), keeping only the
    frames of the clips, so that long videos cost neither the decoding of their tail nor memory for all their
    frames. When the container does not state its frame count (or states it wrongly) every frame is decoded.
    ValueError: corrupt, unreadable or too short (the reason is reported).
    """
    p = epath.Path(path)
    if not p.exists():
        raise ValueError("unreadable: no such file")
    kept: dict[int, np.ndarray] = {}
    n, fps = 0, 0.0
    try:
        with p.open("rb") as f, av.open(f) as container:
            if not container.streams.video:
                raise ValueError("unreadable: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            stated = int(stream.frames or 0)
            starts = [0] if clips == 1 else (clip_starts(stated, frames, clips) or None)
            if starts is not None:
                wanted = {i for s in starts for i in range(s, s + frames)}
                stop = max(wanted) + 1
            for frame in container.decode(stream):
                if starts is None or n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if starts is not None and n >= stop:
                    break
    except (av.FFmpegError, EOFError, OSError, RuntimeError) as e:  # whatever FFmpeg throws at a bad file
        raise ValueError(f"corrupt or unreadable: {type(e).__name__}: {e}") from None
    if n == 0:
        raise ValueError("corrupt or unreadable: no decodable frames")
    if starts is None or n < stop:  # frame count unknown or overstated: place the clips on what was decoded
        if starts is not None and len(kept) < n:  # frames were dropped on the way: decode everything
            return read_clip_frames_all(path, frames, clips)
        starts = clip_starts(n, frames, clips)
    if not starts:
        raise ValueError(f"too short: {n} frames, fewer than --frames {frames}")
    return {s: np.stack([kept[i] for i in range(s, s + frames)]) for s in starts}, fps, n


def read_clip_frames_all(path: str, frames: int, clips: int) -> tuple[dict[int, np.ndarray], float, int]:
    """As `read_clip_frames`, decoding every frame first (`video.read_video`)."""
    try:
        all_frames, fps = video.read_video(path)
    except FileNotFoundError as e:
        raise ValueError(f"unreadable: {e}") from None
    except ValueError as e:
        raise ValueError(f"corrupt or unreadable: {e}") from None
    starts = clip_starts(len(all_frames), frames, clips)
    if not starts:
        raise ValueError(f"too short: {len(all_frames)} frames, fewer than --frames {frames}")
    return {s: all_frames[s : s + frames] for s in starts}, fps, len(all_frames)


def load_clips(item: Item, resolution: str, frames: int, clips: int) -> list[Clip]:
    """The preprocessed clips of one video (§12); ValueError with the reason when it cannot give any (the video is
    skipped and reported)."""
    if item.caption is None:
        raise ValueError("no caption (no --captions entry and no sidecar .txt)")
    by_start, fps, _ = read_clip_frames(item.path, frames, clips)
    out = []
    for s, clip_frames in by_start.items():
        bucket = video.choose_bucket(clip_frames.shape[2], clip_frames.shape[1], resolution)
        pixels_3thw, mask_1hw = video.resize_and_pad(clip_frames, bucket)
        out.append(Clip(item, s, video.to_uint8(pixels_3thw), mask_1hw.astype(np.uint8), bucket, fps))
    return out
