"""The inputs of a prepare job (docs/algorithm.md §12): the videos of a folder or list file, their caption windows,
and the clips NVIDIA's Video2World dataset samples from them, decoded with PyAV and preprocessed into their buckets.

- `list_videos(videos) -> (paths, root)`, `read_captions(jsonl) -> {key: [Window]}`, `make_items(paths, root,
  captions) -> [Item]` (JSONL key = relative name, bare file name or full path; else a sidecar .txt);
- `clip_ranges(start, end, frames, stride, clips)`: the frame indices of the clips of one window;
- `plan_clips(windows, num_frames, fps, frames, stride, clips)`: the windows' clips and the skipped windows;
- `read_clip_frames(path, windows, frames, stride, clips)`: decodes only the frames of those clips;
- `load_clips(item, resolution, frames, clips, stride) -> ([Clip], skipped windows)`: the clips resized and
  padded into their bucket.

The reference's rule (`use_native_fps=True`, caption windows): sources outside [10, 60] fps are skipped; with more
than one window the last is dropped; a window needs >= 4 s and >= `frames` frames; stride = window frames //
`frames`; the `frames`·stride span is centred in the window. The reference draws one window per epoch; offline we
take every usable window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import av
import jax
import numpy as np
from etils import epath

from trigflow_distill.common import paths, video

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
FPS_RANGE = (10.0, 60.0)  # the reference's min_fps / max_fps filter (--frame-stride auto)
MIN_WINDOW_SECONDS = 4.0  # the reference's min_duration of a caption window (--frame-stride auto)
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Window:
    """A caption window: its caption and its [start, end) in seconds (`unit` "s") or frames (`unit` "frame");
    None = the video's first frame / its end."""

    caption: str
    start: float | None = None
    end: float | None = None
    unit: str = "s"

    def to_frames(self, fps: float, num_frames: int) -> tuple[int, int]:
        """[start, end) in frames (seconds rounded to the nearest frame), the end cut at the video's end."""
        if self.unit == "frame":
            start, end = int(self.start or 0), num_frames if self.end is None else int(self.end)
        else:
            if fps <= 0 and (self.start or self.end is not None):
                raise ValueError("the video states no frame rate: give its windows in frames (start_frame/end_frame)")
            start = math.floor((self.start or 0.0) * fps + 0.5)
            end = num_frames if self.end is None else math.floor(self.end * fps + 0.5)
        return start, min(end, num_frames)


@dataclasses.dataclass(frozen=True)
class Item:
    """One input video: its path, its name relative to the videos root (the caption key) and its caption windows
    in file order (empty: no caption)."""

    path: str
    name: str
    windows: tuple[Window, ...]
    refused: str | None = None  # why the video is skipped before decoding (a link out of --videos)


def read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file; ValueError naming the file and the first line that is not UTF-8."""
    lines = epath.Path(path).read_bytes().splitlines()
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{what} {path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "save the file as UTF-8"
            ) from None
    return out


def outside(path: str, root: str) -> str | None:
    """Where `path` really is when a symbolic link takes it out of the folder `root` (local paths), else None."""
    if paths.is_remote(path):
        return None
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real if os.path.commonpath([real, real_root]) != real_root else None


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
    for line in read_lines(videos, "--videos"):
        line = line.strip()
        if line and not line.startswith("#"):
            video_paths.append(line if paths.is_remote(line) or os.path.isabs(line) else os.path.join(root, line))
    if not video_paths:
        raise ValueError(f"--videos {videos}: the list file names no videos")
    return video_paths, root


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def parse_window(entry: object) -> tuple[str, Window]:
    """(video key, Window) of one captions JSONL object; ValueError naming what is wrong."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("video"), str)
        or not isinstance(entry.get("caption"), str)
    ):
        raise ValueError('expected {"video": "name.mp4", "caption": "..."} (optionally "start"/"end" seconds)')
    seconds = [k for k in ("start", "end") if entry.get(k) is not None]
    frames = [k for k in ("start_frame", "end_frame") if entry.get(k) is not None]
    if seconds and frames:
        raise ValueError(
            'give the window in seconds ("start"/"end") or in frames ("start_frame"/"end_frame"), not both'
        )
    unit = "frame" if frames else "s"
    keys = ("start_frame", "end_frame") if frames else ("start", "end")
    start, end = (entry.get(k) for k in keys)
    for k, v in zip(keys, (start, end), strict=True):
        if v is not None and not (_is_number(v) and (unit == "s" or isinstance(v, int))):
            kind = "a whole number of frames" if unit == "frame" else "a number of seconds"
            raise ValueError(f'"{k}": {v!r} is not {kind} >= 0')
    if start is not None and end is not None and end <= start:
        raise ValueError(f"the window ends ({keys[1]} {end}) before it starts ({keys[0]} {start})")
    return entry["video"], Window(entry["caption"], start, end, unit)


def read_captions(path: str | None) -> dict[str, list[Window]]:
    """{"video" key: its caption windows in file order} of a captions JSONL file (empty without one). A line without
    start/end is the whole video; several lines of one video are several windows."""
    if path is None:
        return {}
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--captions {path}: no such file")
    out: dict[str, list[Window]] = {}
    for n, line in enumerate(read_lines(path, "--captions"), 1):
        if not line.strip():
            continue
        try:
            key, window = parse_window(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {path} line {n}: not JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"--captions {path} line {n}: {e}") from None
        out.setdefault(key, []).append(window)
    return out


_FOLLOW = "pass --follow-links to take files that links lead out of --videos"


def _sidecar_caption(path: str, confine: str | None) -> tuple[str | None, str | None]:
    """(the caption of the sidecar .txt of a video, or None; why it is refused, or None)."""
    txt = os.path.splitext(path)[0] + ".txt"
    if not epath.Path(txt).exists():
        return None, None
    if confine is not None and (real := outside(txt, confine)):
        return None, f"refused: its sidecar caption {txt} links to {real}, outside --videos ({_FOLLOW})"
    try:
        return "\n".join(read_lines(txt, "sidecar caption")).strip(), None
    except ValueError as e:
        return None, str(e)


def make_items(
    video_paths: Sequence[str], root: str, captions: dict[str, list[Window]], confine: bool = False
) -> list[Item]:
    """Items with their windows: JSONL key = relative name, bare file name or full path; else a sidecar .txt (one
    whole-video window). Warns (stderr) about JSONL keys that name no video: a wrong key layout would otherwise skip
    every video. `confine`: a video or sidecar that a symbolic link takes out of the folder `root` is refused (the
    item is skipped and reported); a non-UTF-8 sidecar is reported the same way."""
    items, used = [], set()
    for path in video_paths:
        name = os.path.relpath(path, root) if not paths.is_remote(path) else path[len(root) :].lstrip("/")
        key = next((k for k in (name, os.path.basename(path), path) if k in captions), None)
        used.add(key)
        refused = None
        if confine and (real := outside(path, root)):
            refused = f"refused: links to {real}, outside --videos ({_FOLLOW})"
        if key is not None:
            windows = tuple(captions[key])
        else:
            caption, why = _sidecar_caption(path, root if confine else None)
            windows = () if caption is None else (Window(caption),)
            refused = refused or why
        items.append(Item(path, name, windows, refused))
    unused = [k for k in captions if k not in used]
    if unused and jax.process_index() == 0:
        print(
            f"warning: {len(unused)} of {len(captions)} --captions entries name no video of --videos (e.g. "
            f"{unused[0]!r}); keys are paths relative to {root}, bare file names or full paths",
            file=sys.stderr,
        )
    return items


def parse_stride(stride: str | int) -> str | int:
    """ "auto" or a positive int, from the CLI's text."""
    if stride == AUTO:
        return AUTO
    try:
        value = int(stride)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"--frame-stride {stride}: give auto (the reference's rule) or a whole number >= 1")
    return value


def clip_ranges(start: int, end: int, frames: int, stride: str | int = AUTO, clips: int = 1) -> list[range]:
    """Frame indices of the clips of the window [start, end): `frames` frames at `stride` ("auto": window frames //
    `frames`, the reference's), over a span of frames·stride; one clip = the span centred in the window (the
    reference's), several = spans evenly spaced from the window's start to its end (identical ones kept once).
    [] when the window is shorter than the span."""
    total = end - start
    step = max(total // frames, 1) if stride == AUTO else int(stride)
    span = frames * step
    if total < span:
        return []
    room = total - span
    if clips == 1:
        offsets = [room // 2]
    else:
        offsets = sorted({int(round(k * room / (clips - 1))) for k in range(clips)})
    return [range(start + o, start + o + span, step) for o in offsets]


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """Where one clip comes from: its caption window (index in the item's windows, [start, end) frames) and its
    frame indices."""

    window: int
    window_frames: tuple[int, int]
    indices: range


def plan_clips(
    windows: Sequence[Window], num_frames: int, fps: float, frames: int, stride: str | int, clips: int
) -> tuple[list[ClipPlan], list[dict]]:
    """(the clips of a video's usable windows, {"window", "frames", "reason"} of each window skipped).

    With more than one window the last is dropped (the reference's rule). With stride "auto" the reference's
    filters apply: fps in [10, 60] and windows of >= 4 s; a fixed stride takes any fps and duration. ValueError with
    the reason when the video gives no clip (it is skipped and reported)."""
    if not windows:
        raise ValueError("no caption (no --captions entry and no sidecar .txt)")
    if stride == AUTO and not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ValueError(
            f"fps {fps:g} outside [{FPS_RANGE[0]:g}, {FPS_RANGE[1]:g}] (the reference's filter with --frame-stride "
            "auto; a fixed --frame-stride N takes any fps)"
        )
    plans, skipped = [], []
    for k, window in enumerate(windows):
        try:
            start, end = window.to_frames(fps, num_frames)
        except ValueError as e:
            skipped.append({"window": k, "reason": str(e)})
            continue
        reason = None
        if not window.caption.strip():  # nothing to condition on: a blank caption would train unconditional clips
            reason = "empty caption"
        elif k == len(windows) - 1 and len(windows) > 1:
            reason = f"dropped: the last of {len(windows)} caption windows (the reference drops it)"
        elif end - start < frames:
            reason = f"too short: {max(end - start, 0)} frames, fewer than --frames {frames}"
        elif stride == AUTO and end - start < MIN_WINDOW_SECONDS * fps:
            reason = f"too short: {(end - start) / fps:.2f} s, under the reference's {MIN_WINDOW_SECONDS:g} s minimum"
        else:
            ranges = clip_ranges(start, end, frames, stride, clips)
            if not ranges:
                reason = f"too short: {end - start} frames, fewer than --frames {frames} x --frame-stride {stride}"
            plans.extend(ClipPlan(k, (start, end), r) for r in ranges)
        if reason is not None:
            skipped.append({"window": k, "frames": [start, end], "reason": reason})
    if not plans:
        if len(windows) == 1:
            raise ValueError(skipped[0]["reason"])
        detail = "; ".join(f"window {s['window']}: {s['reason']}" for s in skipped)
        raise ValueError(f"no caption window long enough ({detail})")
    return plans, skipped


@dataclasses.dataclass
class Clip:
    """A preprocessed clip: frames (T, H, W, 3) uint8 in its bucket, padding mask (1, H, W) uint8 (1 = padded)."""

    item: Item
    plan: ClipPlan
    frames_thw3: np.ndarray
    mask_1hw: np.ndarray
    bucket: tuple[int, int]
    fps: float

    @property
    def caption(self) -> str:
        return self.item.windows[self.plan.window].caption


def _count_frames(path: str) -> int:
    """Frames of a video whose container does not state them, counted from its packets (no decoding)."""
    with epath.Path(path).open("rb") as f, av.open(f) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


_DECODE_ERRORS = (av.FFmpegError, EOFError, OSError, RuntimeError)  # whatever FFmpeg throws at a bad file


def read_clip_frames(
    path: str, windows: Sequence[Window], frames: int, stride: str | int = AUTO, clips: int = 1
) -> tuple[list[tuple[ClipPlan, np.ndarray]], list[dict], float, int]:
    """([(clip, its frames (frames, H, W, 3) uint8)], skipped windows, fps, frames decoded) of a video.

    The clips are placed on the frame count the container states (else on its packet count), then PyAV decodes
    only as far as the last clip needs, keeping only the clips' frames, so that long videos cost neither the
    decoding of their tail nor memory for all their frames. If the count was overstated the clips are placed again
    on what was decoded (decoding everything if frames they need were dropped on the way).
    ValueError: empty, corrupt, unreadable, fps out of range or no usable window (the reason is reported).
    """
    p = epath.Path(path)
    if not p.exists():
        raise ValueError("unreadable: no such file")
    if p.is_file() and p.stat().length == 0:  # PyAV reports it as "OSError: [Errno 22] Invalid argument"
        raise ValueError("empty file (0 bytes), not a video")
    kept: dict[int, np.ndarray] = {}
    n = 0
    try:
        with p.open("rb") as f, av.open(f) as container:
            if not container.streams.video:
                raise ValueError("unreadable: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            stated = int(stream.frames or 0) or _count_frames(path)
            plans, skipped = plan_clips(windows, stated, fps, frames, stride, clips)
            wanted = {i for plan in plans for i in plan.indices}
            stop = max(wanted) + 1
            for frame in container.decode(stream):
                if n in wanted:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if n >= stop:
                    break
    except _DECODE_ERRORS as e:
        raise ValueError(f"corrupt or unreadable: {type(e).__name__}: {e}") from None
    if n == 0:
        raise ValueError("corrupt or unreadable: no decodable frames")
    if n < stop:  # the stated count was too high: place the clips on what was decoded
        plans, skipped = plan_clips(windows, n, fps, frames, stride, clips)
        if any(i not in kept for plan in plans for i in plan.indices):
            return _read_clip_frames_all(path, windows, frames, stride, clips)
    return [(plan, np.stack([kept[i] for i in plan.indices])) for plan in plans], skipped, fps, n


def _read_clip_frames_all(
    path: str, windows: Sequence[Window], frames: int, stride: str | int, clips: int
) -> tuple[list[tuple[ClipPlan, np.ndarray]], list[dict], float, int]:
    """As `read_clip_frames`, decoding every frame first (`video.read_video`)."""
    try:
        all_frames, fps = video.read_video(path)
    except FileNotFoundError as e:
        raise ValueError(f"unreadable: {e}") from None
    except ValueError as e:
        raise ValueError(f"corrupt or unreadable: {e}") from None
    plans, skipped = plan_clips(windows, len(all_frames), fps, frames, stride, clips)
    return (
        [(plan, all_frames[plan.indices.start : plan.indices.stop : plan.indices.step]) for plan in plans],
        skipped,
        fps,
        len(all_frames),
    )


def load_clips(
    item: Item, resolution: str, frames: int, clips: int, stride: str | int = AUTO
) -> tuple[list[Clip], list[dict]]:
    """(the preprocessed clips of one video (§12), its skipped windows); ValueError with the reason when it gives no
    clip (the video is skipped and reported)."""
    if item.refused:
        raise ValueError(item.refused)
    if not item.windows:
        raise ValueError("no caption (no --captions entry and no sidecar .txt)")
    decoded, skipped, fps, _ = read_clip_frames(item.path, item.windows, frames, stride, clips)
    out = []
    for plan, clip_frames in decoded:
        bucket = video.choose_bucket(clip_frames.shape[2], clip_frames.shape[1], resolution)
        pixels_3thw, mask_1hw = video.resize_and_pad(clip_frames, bucket)
        out.append(Clip(item, plan, video.to_uint8(pixels_3thw), mask_1hw.astype(np.uint8), bucket, fps))
    return out, skipped
