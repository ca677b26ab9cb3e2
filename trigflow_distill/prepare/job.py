r"""From a folder of videos and captions to a training set (docs/algorithm.md §7, §9, §11, §12).

    python -m trigflow_distill.prepare --videos VIDEOS_DIR --captions captions.jsonl \
        --vae hf://nvidia/Cosmos-Predict2.5-2B/tokenizer.pth \
        --text-encoder hf://nvidia/Cosmos-Reason1-7B@3210bec0495fdc7a8d3dbb8d58da5711eab4b423 \
        --teacher /ckpts/Cosmos-Predict2.5-2B/base/pre-trained/<uuid>_ema_bf16.pt --out DATASET

What it does, per video: decode it with PyAV; choose the bucket of nearest aspect ratio (`--resolution`), resize
to fit, reflection-pad and record the padding mask (§12); cut clips of `--frames` frames from its caption windows
as NVIDIA's Video2World dataset samples them (`--frame-stride auto`, the default): a video outside [10, 60] fps is
skipped; with several windows the last is dropped; a window needs >= 4 s and >= `--frames` frames; the stride is
window frames // `--frames` and the `--frames`·stride span is centred in the window (the reference draws one
window per epoch, we take every usable one). `--frame-stride N` fixes the stride instead (no fps or duration
filter; 1 = consecutive frames). `--clips-per-video K` > 1 cuts K spans per window evenly spaced from its start to
its end (identical ones kept once: a window with no room gives one). Only the frames the clips need are decoded.
Then encode the clips with the Wan2.1 VAE into normalised latents (§9, §10); embed each window's caption with the
Reason1 text encoder (§11) and project it ONCE with the teacher's frozen `crossattn_proj` into the (512, 1024)
context, stored bfloat16. The raw (512, 28·3584) embedding is not stored unless `--keep-raw-text` (then float32,
beside each shard as `SHARD.text_raw.npy`, outside the dataset format: the trainer reads the projected context).

Inputs:
- `--videos DIR` (every .mp4/.mov/.mkv/.webm/.avi/.m4v below it, sorted) or `--videos LIST.txt` (one path a line,
  relative to the list's folder or absolute; blank lines and `#` comments ignored). Local paths or gs:// (epath).
- `--captions FILE.jsonl`: one caption window a line, `{"video": "clip_001.mp4", "caption": "A red car ...",
  "start": 3.5, "end": 9.0}` with start/end in SECONDS (rounded to the nearest frame), or `"start_frame"` /
  `"end_frame"` in frames (end exclusive); either bound may be left out (the video's start / end), a line with
  neither is the whole video; several lines of one video are its windows, in file order. "video" is the path
  relative to DIR (or to the list's folder), the bare file name, or the absolute path. A video without an entry
  uses a sidecar text file next to it (`clip_001.txt`, the whole file is the caption of the whole video).
  A blank caption's window is skipped and reported; in a --videos folder, videos and sidecars that symbolic links
  take out of it are skipped and reported unless `--follow-links`; a non-UTF-8 captions or list file is an error
  naming the file and line.

Output `DATASET/`, a dataset of format 2 (see `trigflow_distill.data`) that `main.py` trains on
(`--config.data.path=DATASET`; every batch holds one bucket):
- `unit-NNNNN/`: the shards of unit N, one per bucket, written by `data.DatasetWriter`; a unit is `--shard-videos`
  consecutive videos of the sorted list. Every record holds the latents, the projected context and the padding
  mask (pixel resolution); its info (`NpyDirSource.info(i)`) {"caption", "source": the video file, "frames":
  [start, stop) and "frame_stride" (the indices range(start, stop, stride)), "window": [start, end) frames of
  its caption window and "window_index" (its line among the video's windows), "fps", "bucket": "WxH"};
- `units/unit-NNNNN.json`: the completion marker of a unit (its shards and its skipped videos), written after
  its folder is complete;
- `meta.json`: every unit's shards (`unit-NNNNN/shard-MMMMM`) with their files' sizes and CRC-32s, the records'
  `fingerprint` and the projecting `teacher` (data.format.dataset_fingerprint), written last by process 0;
- `lock.json`: held while a job runs (common.lock, as a training workdir's): a second job on --out is refused;
- `job.json`: the arguments that determine the content; a rerun with the same ones RESUMES (finished units are
  skipped, an unfinished one is redone), different ones are refused unless `--overwrite` (which deletes what a
  previous job wrote there) or unless the previous job finished no unit (it failed at its start: replaced);
- `report.jsonl`: one line per skipped video, `{"video": PATH, "reason": "..."}` (corrupt, unreadable, fps out
  of range, too short, no caption window long enough, no caption), and per skipped window of a video that gave
  clips, `{"video": PATH, "window": K, "frames": [start, end), "reason": "..."}` (too short, the dropped last
  window); the job goes on without them.

Devices and hosts: all local devices are used (mesh {"data": 1, "fsdp": all}): the clip and caption batches are
split over them, the text encoder's parameters are FSDP-sharded. With several processes (TPU pods are detected;
else --coordinator-address/--num-processes/--process-id) process p takes units p, p + P, p + 2P, ... and writes
their shards; once every unit's marker is there (the hosts poll the shared --out) process 0 writes report.jsonl
and meta.json. Units do not depend on the process count, so a job can resume on another number of hosts.

From Python: `prepare_videos([(path, caption), ...], out, vae=..., text_encoder=..., teacher=..., **options)`
(`trigflow_distill.prepare`), the same job.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import errno
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill.common import cli, distributed, errors, lock, paths, video
from trigflow_distill.data import DatasetWriter
from trigflow_distill.data.format import fingerprint_of, projection_fingerprint
from trigflow_distill.models import wan_vae
from trigflow_distill.prepare.clips import (
    AUTO,
    Clip,
    Item,
    Window,
    list_videos,
    load_clips,
    make_items,
    parse_stride,
    read_captions,
)
from trigflow_distill.prepare.encoders import Encoders

JOB_FILE = "job.json"
REPORT_FILE = "report.jsonl"
UNITS_DIR = "units"
JOB_FORMAT = "trigflow_distill.prepare/2"  # 2: caption windows and strided clips (§12)


# ----------------------------------------------------------------------------------------------------------------
# Output: shards, unit markers, job file


def _unit_dir(out: epath.Path, unit: int) -> epath.Path:
    return out / f"unit-{unit:05d}"


def _unit_marker(out: epath.Path, unit: int) -> epath.Path:
    return out / UNITS_DIR / f"unit-{unit:05d}.json"


def _read_marker(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_record(args: argparse.Namespace, items: Sequence[Item]) -> dict:
    """What determines the dataset's content (batch size, workers and device count do not)."""
    listing = "\n".join(f"{it.path}\t{json.dumps([dataclasses.astuple(w) for w in it.windows])}" for it in items)
    return {
        "format": JOB_FORMAT,
        "videos": args.videos,
        "captions": args.captions,
        "num_videos": len(items),
        "videos_and_captions_sha256": _digest(listing),
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "teacher": args.teacher,
        "resolution": str(args.resolution),
        "frames": args.frames,
        "clips_per_video": args.clips_per_video,
        "frame_stride": parse_stride(args.frame_stride),
        "shard_videos": args.shard_videos,
        "teacher_prefix": args.teacher_prefix,
        "keep_raw_text": args.keep_raw_text,
        "text_dtype": args.text_dtype,
        "vae_dtype": args.vae_dtype,
        # only when given, so that the job.json of earlier jobs still matches (links were followed then)
        **({"follow_links": True} if getattr(args, "follow_links", False) else {}),
    }


def _owned_entries(out: epath.Path) -> list[epath.Path]:
    """What a prepare job writes into its output folder."""
    names = {JOB_FILE, REPORT_FILE, UNITS_DIR, "meta.json"}  # and the unit-NNNNN folders
    return [p for p in out.iterdir() if p.name in names or p.name.startswith(("unit-", ".tmp-"))]


def _is_lock_file(p: epath.Path) -> bool:
    return p.name.startswith((lock.LOCK_NAME, ".lock-clock."))


def _finished_units(out: epath.Path) -> list[epath.Path]:
    """The completion markers (`units/unit-*.json`) in `out`."""
    units = out / UNITS_DIR
    return sorted(units.glob("unit-*.json")) if units.is_dir() else []


def start_job(out: epath.Path, job: dict, overwrite: bool) -> bool:
    """Claims `out` for this job (process 0 only, holding its lock); True when it resumes a previous run of the
    same job. Another job's output is refused unless `overwrite`, or unless that job finished no unit (no marker
    in `units/`): then it is replaced, so that the corrected rerun of a job that failed at its start is accepted."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    if out.exists() and any(not _is_lock_file(p) for p in out.iterdir()):
        previous = _read_marker(out / JOB_FILE)
        # A previous job that finished no unit (it failed at its start: a wrong path, a bad argument) left nothing
        # worth keeping: its job.json does not bind the corrected rerun, which replaces what it wrote.
        unfinished = previous is not None and previous != job and not _finished_units(out)
        if unfinished:
            print(f"{out}: replacing the {JOB_FILE} of an earlier job that finished no unit", file=sys.stderr)
        if overwrite or unfinished:
            for p in _owned_entries(out):
                p.rmtree() if p.is_dir() else p.unlink()
        elif previous == job:
            return True
        elif previous is None:
            raise FileExistsError(
                f"--out {out} exists, is not empty and holds no {JOB_FILE}; choose a new folder (or pass --overwrite)"
            )
        else:
            changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise FileExistsError(
                f"--out {out} holds another prepare job (different {', '.join(changed)}); pass "
                "the same arguments to resume it, or --overwrite to replace it"
            )
    (out / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(out / JOB_FILE, json.dumps(job, indent=1))
    return False


# ----------------------------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass(frozen=True)
class Options:
    resolution: str
    frames: int
    clips_per_video: int
    frame_stride: str | int
    batch_size: int
    workers: int


def _prefetched(
    items: Sequence[Item], opts: Options, pool
) -> Iterator[tuple[Item, tuple[list[Clip], list[dict]] | str]]:
    """(item, (its clips, its skipped windows) or the reason it is skipped), in order, decoding up to 2 x workers
    videos ahead."""
    load = functools.partial(
        load_clips,
        resolution=opts.resolution,
        frames=opts.frames,
        clips=opts.clips_per_video,
        stride=opts.frame_stride,
    )
    queue = collections.deque()
    it = iter(items)

    def submit():
        item = next(it, None)
        if item is not None:
            queue.append((item, pool.submit(load, item)))

    for _ in range(2 * opts.workers):
        submit()
    while queue:
        item, future = queue.popleft()
        submit()
        try:
            yield item, future.result()
        except ValueError as e:
            yield item, str(e)


def process_unit(
    unit: int,
    items: Sequence[Item],
    enc: Encoders,
    opts: Options,
    out: epath.Path,
    pool,
    bar: tqdm.tqdm,
    skipped_before: int = 0,
) -> dict:
    """Encodes the clips of one unit, writes one shard per bucket and then the unit's completion marker.
    `bar` counts clips (its total is corrected when a video gives another number of clips than expected)."""
    pending: dict[tuple, list[Clip]] = collections.defaultdict(list)
    done: dict[tuple, list[tuple[Clip, np.ndarray]]] = collections.defaultdict(list)
    skipped = []

    def flush(bucket):
        clips = pending.pop(bucket)
        z = enc.latents(np.stack([c.frames_thw3 for c in clips]), opts.batch_size)
        done[bucket].extend(zip(clips, z))
        bar.update(len(clips))

    for item, loaded in _prefetched(items, opts, pool):
        if isinstance(loaded, str):
            skipped.append({"video": item.path, "reason": loaded})
            bar.total -= expected_clips(item, opts.clips_per_video)
            bar.set_postfix(skipped=skipped_before + len(skipped), refresh=True)
            continue
        clips, skipped_windows = loaded
        skipped.extend({"video": item.path, **w} for w in skipped_windows)
        bar.total -= expected_clips(item, opts.clips_per_video) - len(clips)
        for clip in clips:
            pending[clip.bucket].append(clip)
            if len(pending[clip.bucket]) == opts.batch_size:
                flush(clip.bucket)
    for bucket in list(pending):
        flush(bucket)

    captions = list(dict.fromkeys(c.caption for clips in done.values() for c, _ in clips))
    contexts, raws = [], []
    for i in range(0, len(captions), opts.batch_size):
        context, raw = enc.context(captions[i : i + opts.batch_size], opts.batch_size)
        contexts.append(context)
        raws.append(raw)
    row = {c: i for i, c in enumerate(captions)}
    context = np.concatenate(contexts) if contexts else None
    raw = np.concatenate(raws) if raws and raws[0] is not None else None

    # One dataset-format-2 directory per unit (data.DatasetWriter), one shard per bucket; leftovers of an
    # interrupted attempt are removed first (the unit has no marker, so nothing refers to them).
    folder = _unit_dir(out, unit)
    if folder.exists():
        folder.rmtree()
    try:
        shards = _write_unit(folder, done, context, raw, row, opts)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        need = sum(z.nbytes + c.mask_1hw.nbytes for clips in done.values() for c, z in clips)
        need += 0 if context is None else sum(len(clips) for clips in done.values()) * context[0].nbytes
        folder.rmtree(missing_ok=True)  # frees what it held; the unit has no marker, so the rerun redoes it
        raise no_space(unit, folder, need, e) from None
    marker = {
        "unit": unit,
        "process": jax.process_index(),
        "videos": [it.path for it in items],
        "shards": shards,
        "skipped": skipped,
    }
    paths.write_text_atomic(_unit_marker(out, unit), json.dumps(marker))
    return marker


def no_space(unit: int, folder: epath.Path, need: int, e: OSError) -> OSError:
    """The one-line error of a full disk while unit `unit` was written: the unit, the bytes it needs, the resume."""
    error = OSError(
        f"no space left on the disk of {folder.parent} while writing unit {unit} ({folder.name}: its clips need "
        f"about {need} bytes; {e}); free space and rerun the same command: finished units are kept, this one is "
        "redone"
    )
    error.errno = errno.ENOSPC
    return error


def _write_unit(folder: epath.Path, done: dict, context, raw, row: dict, opts: Options) -> list[dict]:
    """The unit's folder: one shard per bucket (data.DatasetWriter), the raw text embeddings beside them."""
    shards = []
    if done:
        writer = DatasetWriter(os.fspath(folder), text_kind="projected")
        order = list(video.buckets(opts.resolution).values())
        for bucket in sorted(done, key=order.index):
            clips = done[bucket]
            rows = [row[c.caption] for c, _ in clips]
            info = [
                {
                    "caption": c.caption,
                    "source": c.item.path,
                    "frames": [c.plan.indices.start, c.plan.indices.stop],
                    "frame_stride": c.plan.indices.step,
                    "window": list(c.plan.window_frames),
                    "window_index": c.plan.window,
                    "fps": c.fps,
                }
                for c, _ in clips
            ]
            name = writer.write_shard(
                np.stack([z for _, z in clips]),
                context[rows],
                bucket=list(bucket),
                padding_mask=np.stack([c.mask_1hw for c, _ in clips]),
                info=info,
            )
            if raw is not None:  # beside the shard, outside the format: not read by the trainer
                with (folder / f"{name}.text_raw.npy").open("wb") as f:
                    np.save(f, raw[rows])
            shards.append({"name": name, "bucket": list(bucket), "num_records": len(clips)})
        writer.close()
    return shards


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _wait_for_units(out: epath.Path, num_units: int, poll_s: float = 5.0) -> None:
    """Blocks until every unit has its marker. Hosts may finish hours apart, longer than a collective barrier
    waits, so they poll the shared output instead (a host that dies stops the others through the distributed
    heartbeat)."""
    while True:
        missing = [u for u in range(num_units) if not _unit_marker(out, u).exists()]
        if not missing:
            return
        time.sleep(poll_s)


def finish(out: epath.Path, num_units: int, teacher: dict | None = None) -> dict:
    """Process 0, after every unit is done: report.jsonl (the skipped videos) and the dataset's meta.json, which
    lists the shards of every unit's folder (`unit-NNNNN/shard-MMMMM`), the teacher whose projection made the
    context (`teacher`: {"path", "crossattn_proj": data.format.projection_fingerprint}) and the records'
    `fingerprint` (data.format.dataset_fingerprint)."""
    markers = [_read_marker(_unit_marker(out, u)) for u in range(num_units)]
    missing = [u for u, m in enumerate(markers) if m is None]
    if missing:
        raise ValueError(
            f"units {missing[:10]} of {out} are not finished (a process failed?); rerun the same command to resume them"
        )
    skipped = [s for m in markers for s in m["skipped"]]
    paths.write_text_atomic(out / REPORT_FILE, "".join(json.dumps(s) + "\n" for s in skipped))
    metas = [
        (u, json.loads((_unit_dir(out, u) / "meta.json").read_text())) for u, m in enumerate(markers) if m["shards"]
    ]
    if not metas:
        raise ValueError(f"no video of --videos gave a clip; see {out / REPORT_FILE} for the reasons")
    meta = dict(metas[0][1])
    for u, m in metas:
        for key in ("format", "text_shape", "text_kind", "text_dtype", "fields"):
            if m[key] != meta[key]:
                raise ValueError(
                    f"{_unit_dir(out, u)}: {key} {m[key]!r} differs from unit {metas[0][0]}'s "
                    f"{meta[key]!r}; rerun with --overwrite"
                )
    meta["shards"] = [
        {
            **s,
            "name": f"{_unit_dir(out, u).name}/{s['name']}",
            "checksums": {f"{_unit_dir(out, u).name}/{k}": v for k, v in s.get("checksums", {}).items()},
        }
        for u, m in metas
        for s in m["shards"]
    ]
    meta["num_records"] = sum(s["num_records"] for s in meta["shards"])
    if teacher is not None:
        meta["teacher"] = teacher
    meta["fingerprint"] = fingerprint_of(meta)
    paths.write_text_atomic(out / "meta.json", json.dumps(meta, indent=1))
    return {"records": meta["num_records"], "shards": len(meta["shards"]), "skipped": skipped}


def expected_clips(item: Item, clips_per_video: int) -> int:
    """Clips a video gives when all its windows are usable (the last of several is dropped): the progress total."""
    return max(len(item.windows) - 1, 1) * clips_per_video


def prepare(args: argparse.Namespace, items: Sequence[Item] | None = None) -> dict:
    """Runs (or resumes) the job of parsed CLI `args`; returns a summary (records, shards, skipped, seconds).
    `items`: the videos with their caption windows (`prepare_videos`), else those of --videos and --captions."""
    t0 = time.perf_counter()
    frames = args.frames
    wan_vae.check_frame_count(frames)
    stride = parse_stride(args.frame_stride)
    if args.clips_per_video < 1 or args.shard_videos < 1 or args.workers < 1:
        raise ValueError("--clips-per-video, --shard-videos and --workers must be >= 1")
    video.buckets(args.resolution)  # validates the name
    if items is None:
        video_paths, root = list_videos(args.videos)
        confine = not args.follow_links and epath.Path(args.videos).is_dir()
        items = make_items(video_paths, root, read_captions(args.captions), confine=confine)
    out = epath.Path(args.out)
    job = job_record(args, items)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    # One job per --out, like one run per training workdir: a second one refuses, naming the holder.
    out_lock = lock.acquire_lock(out, flag="--out")
    try:
        return _run(args, items, out, job, stride, frames, t0)
    finally:
        if out_lock is not None:
            out_lock.release()


def _run(args, items, out: epath.Path, job: dict, stride, frames: int, t0: float) -> dict:
    if jax.process_index() == 0:
        resumed = start_job(out, job, args.overwrite)
    _barrier("trigflow_distill.prepare.start")
    if jax.process_index() != 0:
        resumed = _read_marker(out / JOB_FILE) == job
    units = [items[i : i + args.shard_videos] for i in range(0, len(items), args.shard_videos)]
    mine = list(range(jax.process_index(), len(units), jax.process_count()))
    todo = [u for u in mine if _read_marker(_unit_marker(out, u)) is None]

    enc = Encoders(
        args.vae,
        args.text_encoder,
        args.teacher,
        text_dtype=args.text_dtype,
        vae_dtype=args.vae_dtype,
        keep_raw_text=args.keep_raw_text,
        teacher_prefix=args.teacher_prefix,
        num_devices=args.devices,
    )
    batch = args.batch_size or enc.num_devices
    if batch % enc.num_devices:
        raise ValueError(f"--batch-size {batch} must be a multiple of the {enc.num_devices} devices used (--devices)")
    opts = Options(str(args.resolution), frames, args.clips_per_video, stride, batch, args.workers)
    if resumed and jax.process_index() == 0:
        print(f"resuming {out}: {len(mine) - len(todo)} of {len(mine)} units already done", file=sys.stderr)
    total = sum(expected_clips(it, args.clips_per_video) for u in todo for it in units[u])
    clips = skipped = 0
    with (
        concurrent.futures.ThreadPoolExecutor(args.workers) as pool,
        tqdm.tqdm(total=total, unit="clip", desc="prepare", dynamic_ncols=True, disable=args.no_progress) as bar,
    ):
        for u in todo:
            marker = process_unit(u, units[u], enc, opts, out, pool, bar, skipped)
            clips += sum(s["num_records"] for s in marker["shards"])
            skipped += len(marker["skipped"])
    if jax.process_count() > 1:
        _wait_for_units(out, len(units))
    summary = {"clips_this_run": clips, "seconds": time.perf_counter() - t0}
    if jax.process_index() == 0:
        teacher = {
            "path": args.teacher,
            "crossattn_proj": projection_fingerprint(np.asarray(enc.kernel), np.asarray(enc.bias)),
        }
        summary.update(finish(out, len(units), teacher))
    return summary


# Options of the CLI that `prepare_videos` does not take: its inputs are arguments, and the multi-host setup
# (jax.distributed) is the caller's.
_NOT_OPTIONS = frozenset(
    ("videos", "captions", "out", "vae", "text_encoder", "teacher")
    + ("coordinator_address", "num_processes", "process_id")
)


def video_items(videos: Sequence[tuple[str | os.PathLike, str]]) -> list[Item]:
    """Items of (video path, caption) pairs, in the given order; a path given several times has several caption
    windows (whole-video ones, in order), as several --captions lines of one video."""
    windows: dict[str, list[Window]] = {}
    for n, entry in enumerate(videos):
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], str)):
            raise ValueError(f"videos[{n}]: expected a (video path, caption) pair, got {entry!r}")
        if not isinstance(entry[0], str | os.PathLike):
            raise ValueError(f"videos[{n}]: the video path {entry[0]!r} is not a str or os.PathLike")
        windows.setdefault(os.fspath(entry[0]), []).append(Window(entry[1]))
    if not windows:
        raise ValueError("videos: give at least one (video path, caption) pair")
    return [Item(path, path, tuple(w)) for path, w in windows.items()]


def prepare_videos(
    videos: Sequence[tuple[str | os.PathLike, str]],
    out: str | os.PathLike,
    *,
    vae: str | os.PathLike = wan_vae.DEFAULT_SOURCE,
    text_encoder: str | os.PathLike,
    teacher: str | os.PathLike,
    **options,
) -> dict:
    """The `prepare` job from Python: `videos` is a list of (video path, caption) pairs (each caption is a
    whole-video window; a path given several times has several windows, the last dropped as in the CLI); `options`
    are the CLI's other flags with underscores (`resolution="256"`, `frames=93`, `clips_per_video=1`,
    `frame_stride="auto"`, `shard_videos=32`, `overwrite=True`, `no_progress=True`, ...), their defaults those of
    the CLI. Runs (or resumes) the job through the same code as `trigflow-prepare`; returns its summary
    {"records", "shards", "skipped" (these three on process 0), "clips_this_run", "seconds"}. Raises the CLI's
    errors (ValueError, OSError)."""
    args = parse_args(["--videos", "", "--text-encoder", "", "--teacher", "", "--out", ""])
    known = sorted(k for k in vars(args) if k not in _NOT_OPTIONS)
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"prepare_videos: unknown option {name!r}; the options are {', '.join(known)}")
        setattr(args, name, value)
    args.videos = args.captions = None  # the videos and captions are recorded in job.json by their digest
    args.out, args.vae = os.fspath(out), os.fspath(vae)
    args.text_encoder, args.teacher = os.fspath(text_encoder), os.fspath(teacher)
    return prepare(args, video_items(videos))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trigflow-prepare",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--videos", required=True, help="folder of videos, or a .txt list of video paths")
    parser.add_argument(
        "--captions",
        help='JSONL, a caption window a line: {"video": NAME, "caption": TEXT[, "start": S, "end": S]} in seconds, '
        'or "start_frame"/"end_frame" in frames; no start/end = the whole video (else sidecar NAME.txt)',
    )
    parser.add_argument(
        "--vae", default=wan_vae.DEFAULT_SOURCE, help="Wan2.1 VAE: native .pth, diffusers folder, hf://"
    )
    parser.add_argument("--text-encoder", required=True, help="Cosmos-Reason1 (Qwen2.5-VL) folder or hf://")
    parser.add_argument("--teacher", required=True, help="teacher .pt or diffusers folder (for crossattn_proj)")
    parser.add_argument("--teacher-prefix", default="auto", help="key prefix in the .pt: auto, net_ema., net.")
    parser.add_argument("--out", required=True, help="dataset folder (new, or this job's to resume)")
    parser.add_argument("--resolution", default="720", choices=video.RESOLUTIONS, help="bucket table (§12)")
    parser.add_argument("--frames", type=int, default=93, help="frames per clip, 1 + 4k (default 93)")
    parser.add_argument(
        "--clips-per-video", type=int, default=1, help="clips per caption window: 1 = centred, K = evenly spaced"
    )
    parser.add_argument(
        "--frame-stride",
        default=AUTO,
        help="auto (default, the reference's: window frames // --frames, fps in [10, 60], windows >= 4 s) or a "
        "fixed stride N (any fps and duration; 1 = consecutive frames)",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="clips per VAE call (default: devices used)")
    parser.add_argument("--devices", type=int, help="use the first N local devices (default: all)")
    parser.add_argument("--shard-videos", type=int, default=32, help="videos per unit (one shard per bucket)")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding and resizing videos")
    parser.add_argument("--text-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--vae-dtype", default="float32", choices=("bfloat16", "float32"))
    parser.add_argument("--keep-raw-text", action="store_true", help="also store the raw text embedding (large)")
    parser.add_argument("--overwrite", action="store_true", help="replace another job's output in --out")
    parser.add_argument(
        "--follow-links",
        action="store_true",
        help="take videos and sidecar captions that symbolic links lead out of the --videos folder (else skipped)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's id")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        summary = prepare(args)
    except errors.CLI_ERRORS as e:
        return errors.fail(e)
    if jax.process_index() == 0:
        rate = summary["clips_this_run"] / max(summary["seconds"], 1e-9)
        print(
            f"{args.out}: {summary['records']} clips in {summary['shards']} shards; "
            f"{len(summary['skipped'])} videos or windows skipped (see {REPORT_FILE}); this run: "
            f"{summary['clips_this_run']} clips in {summary['seconds']:.1f} s ({rate:.2f} clips/s)"
        )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
