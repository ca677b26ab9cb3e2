r"""Generate videos: prompts (and optionally a first image or video) in, mp4s out, from the distilled student of a
run, a native Cosmos student `.pt` (NVIDIA's `base/distilled/..._ema_bf16.pt` or this project's export) or the
teacher with classifier-free guidance.

  trigflow-generate --workdir=/tmp/run --prompt "A robot arm stacks red cubes" --out=/tmp/gen
  trigflow-generate --student=hf://nvidia/Cosmos-Predict2.5-2B/base/distilled/UUID_ema_bf16.pt \
      --prompts=prompts.jsonl --image=first_frame.jpg --out=/tmp/gen
  trigflow-generate --teacher=TEACHER.pt --guidance=4 --teacher-steps=35 --prompt "..." \
      --video=start.mp4 --cond-frames=2 --out=/tmp/gen_teacher
  trigflow-generate --teacher=TEACHER.pt --teacher-sampler=reference --image=first.jpg --prompt "..." \
      --out=/tmp/gen_teacher_nvidia
  trigflow-generate --workdir=/tmp/run_gc --guidance=2.5 --prompt "..." --out=/tmp/gen_s2.5

A guidance-conditioned student (distill.guidance_conditioned, docs/algorithm.md §15) takes --guidance too: the CFG
scale it reproduces, in its 4 evaluations (default: its run's distill.guidance, 4 for a .pt).

Pipeline (docs/algorithm.md §3, §7, §10-12): prompts -> Reason1 embedding -> the model's frozen text projection;
an `--image` (1 conditional latent frame) or the last 1 + 4(N-1) frames of a `--video` (N = --cond-frames) are
preprocessed (`--preprocess crop`: NVIDIA's inference CLI, resize to cover the model's 16:9 size and centre-crop,
the default for --student/--teacher; `pad`: the training data's §12 bucket of nearest aspect, fit inside and
reflection-pad, the default for --workdir) and encoded by the Wan2.1 VAE; the student samples in `--steps` network
evaluations (the first k times of its training schedule); the teacher takes `--teacher-steps` steps with 2
evaluations each (CFG), by `--teacher-sampler dmd2-target` (default: Euler on the shifted grid, s = 4, zero-text
unconditional context: the target the student was distilled towards) or `reference` (NVIDIA's inference: UniPC,
s = 8 (their guidance 7), its default negative prompt as the unconditional context); Video2World keeps the
conditional latent frames, so the first frames of the output are the VAE-decoded input frames. Output in --out:
one mp4 per prompt, contact_sheet.png (a few frames per prompt), generate.json (sampler, settings, NFE, timings)
and with --save-latents one .npz per prompt that `python -m trigflow_distill.models.wan_vae decode` reads.
An --out that already holds a run's outputs is refused unless --overwrite, which deletes them first: generate.json
always describes exactly the videos beside it.

The initial noise of prompt i is normal(fold_in(key(seed), i)): a video does not depend on the batch size or the
number of devices. Batches are split over all local devices (data parallel); the last one is padded.

The same from Python: `from trigflow_distill.inference import Pipeline` (inference/pipeline.py); this CLI is that
API plus its files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time

import numpy as np
from etils import epath
from PIL import Image, ImageDraw
from tqdm import tqdm

from trigflow_distill.common import cli, errors, video
from trigflow_distill.inference import pipeline
from trigflow_distill.inference.inputs import PREPROCESS, conditioning_frames, read_prompts

# Re-exported: the CLI's defaults and the sampling pieces that benchmarks/generate_speed.py times stage by stage.
from trigflow_distill.inference.pipeline import DEFAULT_NEGATIVE_PROMPT as DEFAULT_NEGATIVE_PROMPT
from trigflow_distill.inference.pipeline import DEFAULT_TEACHER_SAMPLER as DEFAULT_TEACHER_SAMPLER
from trigflow_distill.inference.pipeline import TEACHER_SAMPLERS as TEACHER_SAMPLERS
from trigflow_distill.inference.pipeline import TEXT_ENCODER_SOURCE as TEXT_ENCODER_SOURCE
from trigflow_distill.inference.pipeline import VAE_SOURCE as VAE_SOURCE
from trigflow_distill.inference.pipeline import _context as _context
from trigflow_distill.inference.pipeline import _sample_jit as _sample_jit
from trigflow_distill.inference.pipeline import initial_noise as initial_noise
from trigflow_distill.models import wan_vae
from trigflow_distill.models.cosmos_dit.attention import IMPLS

_SHEET_FRAMES = 4  # frames per prompt on the contact sheet
_SHEET_WIDTH = 256  # width of one contact-sheet frame
_CAPTION_HEIGHT = 14


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "video"


def contact_sheet(rows: list[tuple[str, np.ndarray]]) -> Image.Image:
    """One row per (prompt, frames (T, H, W, 3) uint8): _SHEET_FRAMES evenly spaced frames under a caption."""
    h, w = rows[0][1].shape[1:3]
    tw = min(_SHEET_WIDTH, w)
    th = max(1, round(h * tw / w))
    row_h = th + _CAPTION_HEIGHT
    sheet = Image.new("RGB", (tw * _SHEET_FRAMES, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, frames) in enumerate(rows):
        draw.text((2, r * row_h + 1), prompt[:120], fill="black")
        for j, i in enumerate(np.linspace(0, len(frames) - 1, _SHEET_FRAMES).round().astype(int)):
            thumb = Image.fromarray(frames[i]).resize((tw, th), Image.BICUBIC)
            sheet.paste(thumb, (j * tw, r * row_h + _CAPTION_HEIGHT))
    return sheet


def _write_png(path: epath.Path, img: Image.Image) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _write_npz(path: epath.Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The run


def load_pipeline(args) -> pipeline.Pipeline:
    """The `Pipeline` of --workdir / --student / --teacher with the CLI's VAE, text encoder and dtypes."""
    return pipeline.Pipeline.load(
        args.student,
        workdir=args.workdir,
        teacher=args.teacher,
        vae=args.vae,
        text_encoder=args.text_encoder,
        dtype=args.dtype,
        vae_dtype=args.vae_dtype,
        text_encoder_dtype=args.text_encoder_dtype,
        attention=args.attention,
    )


_OUTPUT = re.compile(r"^(generate\.json|contact_sheet\.png|\d{4}_.*\.(mp4|npz))$")  # the files a run writes


def claim_out(out: epath.Path, overwrite: bool) -> None:
    """Makes `out` this run's: an --out that holds another run's outputs (generate.json, its mp4s, npz files and
    contact sheet) is refused unless `overwrite`, which deletes them first, so that generate.json always describes
    exactly the files beside it. Other files in --out are left alone."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    previous = sorted(p for p in out.iterdir() if _OUTPUT.match(p.name)) if out.exists() else []
    if previous and not overwrite:
        raise FileExistsError(
            f"--out {out} holds the outputs of another generate run ({previous[0].name}, {len(previous)} files); "
            "pass --overwrite to replace them, or choose a new --out"
        )
    for p in previous:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(args) -> dict:
    """Runs the CLI's work (`Pipeline.prepare` + `Pipeline.batches`, writing each batch); returns what
    generate.json holds."""
    t_start = time.perf_counter()
    prompts = read_prompts(args.prompts) if args.prompts else [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise ValueError("--prompt: empty prompt; give some text")
    frames = conditioning_frames(args)  # read before the model so that a bad file fails at once
    out = epath.Path(args.out)
    claim_out(out, args.overwrite)  # before the model too: a refused --out costs nothing
    timings = {}

    t = time.perf_counter()
    pipe = load_pipeline(args)
    timings["load_s"] = time.perf_counter() - t
    job = pipe.prepare(
        prompts,
        image=frames if args.image else None,
        video=frames if args.video else None,
        cond_frames=args.cond_frames,
        steps=args.steps,
        guidance=args.guidance,
        teacher_steps=args.teacher_steps,
        teacher_sampler=args.teacher_sampler,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_frames=args.num_frames,
        resolution=args.resolution,
        aspect=args.aspect,
        size=args.size,
        preprocess=args.preprocess,
        batch_size=args.batch_size,
    )
    timings["text_encoding_s"] = job.text_encoding_s
    settings, cond, bucket = job.settings, job.cond, job.bucket_wh
    reference = settings.solver == "unipc"

    videos, sheet_rows, batches = [], [], []
    with tqdm(total=len(prompts), unit="video", desc="generate", file=sys.stderr) as bar:
        for batch in pipe.batches(job):
            for j, i in enumerate(batch.indices):
                name = f"{i:04d}_{_slug(prompts[i])}"
                frames_u8 = video.to_uint8(batch.pixels[j])
                video.write_mp4(out / f"{name}.mp4", frames_u8, args.fps)
                if args.save_latents:
                    _write_npz(
                        out / f"{name}.npz",
                        latents=batch.latents[j],
                        padding_mask=cond.padding_11hw[0],
                        bucket=np.array(bucket, np.int32),
                        fps=np.float32(args.fps),
                    )
                sheet_rows.append((prompts[i], frames_u8))
                videos.append({"prompt": prompts[i], "file": f"{name}.mp4", "noise_index": i})
            n = len(batch.indices)
            batches.append({"videos": n, "sampling_s": batch.sampling_s, "decoding_s": batch.decoding_s})
            bar.update(n)
    _write_png(out / "contact_sheet.png", contact_sheet(sheet_rows))

    # The first batch compiles the sampler and the VAE decoder: per-video time from the later ones when there are.
    steady = batches[1:] or batches
    per_video = sum(b["sampling_s"] + b["decoding_s"] for b in steady) / sum(b["videos"] for b in steady)
    timings["sampling_s"] = sum(b["sampling_s"] for b in batches)
    timings["decoding_s"] = sum(b["decoding_s"] for b in batches)
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "model": {"kind": settings.kind, "source": pipe.model.description},
        "nfe": settings.nfe,
        "sampler": {
            "name": job.sampler,
            "solver": settings.solver if settings.kind == "teacher" else "student",
            "steps": settings.steps,
            "guidance": settings.guidance,
            "negative_prompt": job.negative_prompt,
            "unconditional_context": "negative prompt" if reference else ("zero text" if settings.uses_cfg else None),
            "replace_gt_timesteps": job.replace_gt,
        },
        "settings": {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "preprocess": job.preprocess,
            "seed": args.seed,
            "num_frames": args.num_frames,
            "resolution": args.resolution,
            "bucket_wh": list(bucket),
            "latent_shape": list(job.latent_shape),
            "cond_latent_frames": cond.num_cond,
            "image": args.image,
            "video": args.video,
            "fps": args.fps,
            "dtype": args.dtype,
            "text_encoder_dtype": args.text_encoder_dtype,
            "vae_dtype": args.vae_dtype,
            "batch_size": job.batch_size,
            "devices": len(job.devices),
            "vae": args.vae,
            "text_encoder": args.text_encoder,
            "schedule_shift": settings.shift,
            "scaling": pipe.model.defaults["scaling"],
        },
        "seconds_per_video": per_video,
        "seconds_per_video_note": (
            "sampling + decoding, batches after the first (which compiles)"
            if batches[1:]
            else "sampling + decoding of the only batch, including compilation"
        ),
        "timings": timings,
        "batches": batches,
        "videos": videos,
    }
    (out / "generate.json").write_text(json.dumps(report, indent=2))
    return report


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m[1]) % 16 or int(m[2]) % 16 or not int(m[1]) or not int(m[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH with positive multiples of 16, e.g. 64x32")
    return int(m[1]), int(m[2])


def _check_args(args) -> None:
    """Clear errors for bad combinations and values, before anything is loaded; fills the teacher defaults."""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE, exactly one of them")
    if args.teacher is None and args.teacher_steps is not None:
        raise ValueError("--teacher-steps is for --teacher; students take --steps")
    if args.teacher is None and args.teacher_sampler is not None:
        raise ValueError("--teacher-sampler is for --teacher; students have their own k-step sampler")
    if args.negative_prompt is not None and args.teacher_sampler != "reference":
        raise ValueError(
            "--negative-prompt is the unconditional prompt of --teacher-sampler reference; add that flag (the "
            "dmd2-target teacher and the students use the zero-text unconditional context)"
        )
    if args.teacher is not None and args.steps is not None:
        raise ValueError("--steps is for students; the teacher's is --teacher-steps")
    if args.cond_frames is not None and not args.video:
        raise ValueError("--cond-frames goes with --video (an --image is 1 conditional latent frame)")
    # crop for NVIDIA's checkpoints (as its inference CLI), a run's own preprocessing for its student
    args.preprocess = args.preprocess or ("pad" if args.workdir else "crop")
    if args.teacher is not None:
        args.teacher_sampler, args.guidance, args.teacher_steps, args.negative_prompt = pipeline.teacher_defaults(
            args.teacher_sampler, args.guidance, args.teacher_steps, args.negative_prompt
        )
    args.cond_frames = 1 if args.cond_frames is None else args.cond_frames
    wan_vae.check_frame_count(args.num_frames, "--num-frames")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance > 0):
        raise ValueError(f"--guidance {args.guidance}: must be a finite scale > 0 (1 = no guidance)")
    if args.teacher and args.teacher_steps < 1:
        raise ValueError(f"--teacher-steps {args.teacher_steps}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.fps <= 0:
        raise ValueError(f"--fps {args.fps}: must be positive")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-generate",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="training run: its latest checkpoint's EMA student")
    model.add_argument("--student", help="native Cosmos student .pt or diffusers folder (local or hf://)")
    model.add_argument("--teacher", help="native Cosmos teacher .pt or diffusers folder, sampled with CFG")
    parser.add_argument("--prompt", action="append", help="text prompt (repeat for several)")
    parser.add_argument("--prompts", help='file: one prompt per line, or JSONL with a "prompt"/"caption" field')
    cond = parser.add_mutually_exclusive_group()
    cond.add_argument("--image", help="first frame (1 conditional latent frame)")
    cond.add_argument("--video", help="video whose last 1 + 4(N-1) frames become N conditional latent frames")
    parser.add_argument("--cond-frames", type=int, choices=(1, 2), help="N for --video (default 1)")
    parser.add_argument("--steps", type=int, help="student steps, 1-4 (default 4)")
    parser.add_argument(
        "--guidance",
        type=float,
        help="CFG scale s in x0_u + s (x0_c - x0_u): the teacher's (default 4 for dmd2-target, 8 for reference = "
        "NVIDIA's guidance 7), or the one a guidance-conditioned student reproduces (default: its run's "
        "distill.guidance)",
    )
    parser.add_argument("--teacher-steps", type=int, help="teacher steps, 2 NFE each (default 35)")
    parser.add_argument(
        "--teacher-sampler",
        choices=tuple(TEACHER_SAMPLERS),
        help=f"teacher sampler (default {DEFAULT_TEACHER_SAMPLER}): dmd2-target = Euler on the shifted grid, s = 4, "
        "zero-text unconditional context (the DMD2 target); reference = NVIDIA's inference (UniPC, s = 8, negative "
        "prompt)",
    )
    parser.add_argument(
        "--negative-prompt", help="unconditional prompt of --teacher-sampler reference (default: NVIDIA's)"
    )
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        help="conditioning image/video preprocessing: crop = NVIDIA's inference (16:9 size, resize to cover, "
        "centre crop; default for --student/--teacher), pad = the training data's (bucket of nearest aspect, fit "
        "inside, reflection pad, padding mask; default for --workdir)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=93, help="video frames, 1 + 4k (default 93)")
    parser.add_argument("--resolution", default="720", choices=video.RESOLUTIONS, help="bucket table (default 720)")
    parser.add_argument(
        "--aspect",
        choices=tuple(video.buckets("720")),
        help="bucket aspect (default: with --preprocess pad the image/video's nearest, else 16:9)",
    )
    parser.add_argument(
        "--size",
        type=_size,
        metavar="WxH",
        help="explicit frame size, multiples of 16, instead of a bucket (quick tests; the 2B models "
        "know only the buckets)",
    )
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate of the written mp4s (default 16)")
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier run in --out (else refused)"
    )
    parser.add_argument("--vae", default=VAE_SOURCE, help=f"Wan2.1 VAE (default {VAE_SOURCE})")
    parser.add_argument(
        "--text-encoder",
        default=TEXT_ENCODER_SOURCE,
        help=f"Reason1 text encoder folder (default {TEXT_ENCODER_SOURCE})",
    )
    parser.add_argument("--batch-size", type=int, help="videos per sampling call (default: the local device count)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="DiT compute dtype (default bfloat16)"
    )
    parser.add_argument(
        "--vae-dtype",
        default="float32",
        choices=("bfloat16", "float32"),
        help="VAE compute dtype (default float32; bfloat16 needs about half the activation memory)",
    )
    parser.add_argument(
        "--text-encoder-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="text encoder weights and compute dtype (default bfloat16, as the reference)",
    )
    parser.add_argument("--attention", default="auto", choices=IMPLS, help="attention implementation (default auto)")
    parser.add_argument("--save-latents", action="store_true", help="also write NAME.npz with the latents")
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        report = generate(args)
    except errors.CLI_ERRORS as e:
        return errors.fail(e)
    print(
        f"wrote {len(report['videos'])} video(s) to {args.out}: {report['model']['kind']}, NFE {report['nfe']}, "
        f"{report['seconds_per_video']:.2f} s/video (sampling + decoding)"
    )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
