"""Throughput of `python -m trigflow_distill.prepare` with tiny random nets on CPU (clips/s), and where it goes.

    python benchmarks/prepare_speed.py --json /tmp/prepare_speed.json

Writes `--videos` synthetic mp4 files (`--width`x`--height`, `--source-frames` frames), a tiny random Wan2.1 VAE
(dim 8, the release's structure), a tiny Reason1-style text encoder (2 layers, hidden 32) and a tiny teacher whose
crossattn_proj takes its 64-wide embedding; then runs `prepare` twice in one process: a warm-up job on 2 videos
(compiles the VAE and text functions for the bucket) and the timed job on all of them. Also times the stages
alone: decoding + resize/pad of one video (`clips.load_clips`), one VAE batch and one caption batch. Prints JSON;
`cpu_s_per_clip` (process CPU time of the timed job per clip) depends far less on the machine's load than clips/s.
The numbers measure this code path with tiny nets, not the real 2B-scale cost (which is the VAE and the 7B text
encoder on accelerators).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import jax
import numpy as np

from trigflow_distill.common import video
from trigflow_distill.models import cosmos_dit, reason1, torchfile, wan_vae
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.prepare import clips, encoders, job


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sources(root: str, args) -> dict:
    rng = np.random.default_rng(0)
    videos = os.path.join(root, "videos")
    yy, xx = np.mgrid[: args.height, : args.width] / max(args.height, args.width)
    lines = []
    for i in range(args.videos):
        phase = rng.uniform(0, 2 * np.pi, 3)
        frames = np.stack(
            [np.stack([np.sin(4 * xx + 3 * yy + 0.2 * t + p) for p in phase], -1) for t in range(args.source_frames)]
        )
        video.write_mp4(os.path.join(videos, f"v{i:04d}.mp4"), np.round((frames + 1) * 127.5).astype(np.uint8), 24.0)
        lines.append(json.dumps({"video": f"v{i:04d}.mp4", "caption": f"a scene number {i}"}) + "\n")
    captions = os.path.join(root, "captions.jsonl")
    with open(captions, "w") as f:
        f.writelines(lines)
    cfg = wan_vae.WanVAEConfig(dim=8, z_dim=16)
    vae_path = os.path.join(root, "vae.pth")
    torchfile.save(vae_path, wan_vae.to_torch(wan_vae.init_params(cfg, jax.random.key(0)), cfg))
    text_path = os.path.join(root, "text_encoder")
    tcfg = reason1.write_tiny(text_path, words=["a", "scene", "number", *map(str, range(args.videos))])
    net = cosmos_dit.get_preset("tiny", num_blocks=1, crossattn_proj_in_channels=tcfg.num_layers * tcfg.hidden_size)
    teacher = os.path.join(root, "teacher.pt")
    convert.export_torch(cosmos_dit.init_params(net, jax.random.key(1)), net, teacher, dtype=np.float32)
    return dict(videos=videos, captions=captions, vae=vae_path, text=text_path, teacher=teacher)


def _argv(s: dict, videos: str, out: str, args) -> list[str]:
    return [
        "--videos",
        videos,
        "--captions",
        s["captions"],
        "--vae",
        s["vae"],
        "--text-encoder",
        s["text"],
        "--teacher",
        s["teacher"],
        "--out",
        out,
        "--resolution",
        args.resolution,
        "--frames",
        str(args.frames),
        # consecutive frames: the 2 s synthetic videos are shorter than the reference rule's 4 s windows
        "--frame-stride",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--text-dtype",
        "float32",
        "--no-progress",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--source-frames", type=int, default=48)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--resolution", default="256")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        s = _sources(root, args)
        warm = os.path.join(root, "warm.txt")
        with open(warm, "w") as f:
            f.write("videos/v0000.mp4\nvideos/v0001.mp4\n")
        t = time.perf_counter()
        job.prepare(job.parse_args(_argv(s, warm, os.path.join(root, "warm_out"), args)))
        warmup_s = time.perf_counter() - t
        c, t = _cpu_s(), time.perf_counter()
        summary = job.prepare(job.parse_args(_argv(s, s["videos"], os.path.join(root, "out"), args)))
        wall, cpu = time.perf_counter() - t, _cpu_s() - c

        item = clips.make_items(
            [os.path.join(s["videos"], "v0000.mp4")], s["videos"], clips.read_captions(s["captions"])
        )[0]
        t = time.perf_counter()
        loaded, _ = clips.load_clips(item, args.resolution, args.frames, 1, stride=1)
        decode_s = time.perf_counter() - t
        enc = encoders.Encoders(s["vae"], s["text"], s["teacher"], text_dtype="float32")
        frames = np.stack([loaded[0].frames_thw3] * args.batch_size)
        enc.latents(frames, args.batch_size)
        t = time.perf_counter()
        enc.latents(frames, args.batch_size)
        vae_s = time.perf_counter() - t
        enc.context(["a scene"] * args.batch_size, args.batch_size)
        t = time.perf_counter()
        enc.context(["a scene"] * args.batch_size, args.batch_size)
        text_s = time.perf_counter() - t
    result = {
        "videos": args.videos,
        "source": f"{args.width}x{args.height}x{args.source_frames}",
        "clip": f"{args.frames} frames -> bucket {'x'.join(map(str, loaded[0].bucket))}",
        "batch_size": args.batch_size,
        "devices": jax.local_device_count(),
        "warmup_job_s": round(warmup_s, 2),
        "job_s": round(wall, 2),
        "job_cpu_s": round(cpu, 2),
        "clips": summary["clips_this_run"],
        "clips_per_s": round(summary["clips_this_run"] / wall, 3),
        "cpu_s_per_clip": round(cpu / summary["clips_this_run"], 2),
        "decode_resize_per_video_s": round(decode_s, 3),
        "vae_per_batch_s": round(vae_s, 3),
        "text_per_batch_s": round(text_s, 3),
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
