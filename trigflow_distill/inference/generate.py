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

The initial noise of prompt i is normal(fold_in(key(seed), i)): a video does not depend on the batch size or the
number of devices. Batches are split over all local devices (data parallel); the last one is padded.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw
from tqdm import tqdm

from trigflow_distill.common import errors, sharding, video
from trigflow_distill.core import sampling
from trigflow_distill.inference.inputs import (
    PREPROCESS,
    choose_bucket,
    conditioning_frames,
    make_conditioning,
    read_prompts,
)
from trigflow_distill.inference.loader import Model, load_checkpoint, load_workdir
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit, reason1, wan_vae
from trigflow_distill.models.cosmos_dit.attention import IMPLS

TEXT_ENCODER_SOURCE = "hf://nvidia/Cosmos-Reason1-7B@3210bec0495fdc7a8d3dbb8d58da5711eab4b423"
VAE_SOURCE = wan_vae.DEFAULT_SOURCE
_SHEET_FRAMES = 4  # frames per prompt on the contact sheet
_SHEET_WIDTH = 256  # width of one contact-sheet frame
_CAPTION_HEIGHT = 14

# NVIDIA's inference CLI default (cosmos_predict2/config.py DEFAULT_NEGATIVE_PROMPT, the same text in
# _src/predict2/inference/video2world.py): the `reference` teacher's unconditional prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky movements, "
    "low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, fake elements, "
    "unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. Overall, the video is of "
    "poor quality."
)
# --teacher-sampler -> (solver, default CFG scale s in x0_u + s (x0_c - x0_u)). reference: NVIDIA's inference
# (UniPC, their w = 7 in v_c + w (v_c - v_u), i.e. s = 8, negative prompt); dmd2-target: the teacher the DMD2 loss
# distills towards (§4: s = 4, zero text), Euler for like-for-like comparisons with the student.
TEACHER_SAMPLERS = {"reference": ("unipc", 8.0), "dmd2-target": ("euler", 4.0)}
DEFAULT_TEACHER_SAMPLER = "dmd2-target"


def initial_noise(seed: int, index: int, shape) -> jax.Array:
    """eps of prompt `index` (float32, `shape`): independent of batching and devices."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)


# The one sampling path (`video2world.sample`: the student's k steps or the teacher's CFG Euler steps, conditional
# frames kept), jitted per settings, network config and scaling.
_sample_jit = jax.jit(video2world.sample, static_argnums=(0, 1), static_argnames=("scaling", "replace_gt_timesteps"))


@functools.partial(jax.jit, static_argnums=0)
def _context(te_cfg, te_params, ids_bl, text_proj):
    """Projected context (B, L, D) of token ids: Reason1 embedding -> the model's frozen text projection."""
    return cosmos_dit.project_text(text_proj, reason1.embed(te_cfg, te_params, ids_bl))


# ----------------------------------------------------------------------------------------------------------------
# Models


def load_model(args) -> tuple[Model, sampling.SamplerSettings]:
    """The model of --workdir / --student / --teacher and how to sample it (the CLI's step and guidance flags)."""
    options = dict(dtype=args.dtype, attention=args.attention, remat=False)
    if args.workdir:
        model = load_workdir(args.workdir, **options)
    else:
        model = load_checkpoint(args.student or args.teacher, **options)
    d = model.defaults
    common = dict(shift=d["shift"], sigma_data=d["sigma_data"], train_steps=d["train_steps"])
    if args.teacher:
        solver = TEACHER_SAMPLERS[args.teacher_sampler][0]
        return model, sampling.SamplerSettings(
            kind="teacher", steps=args.teacher_steps, guidance=args.guidance, solver=solver, **common
        )
    steps = 4 if args.steps is None else args.steps
    if not 1 <= steps <= d["train_steps"]:
        raise ValueError(
            f"--steps {steps}: the student takes 1 to {d['train_steps']} steps (the first k times "
            "of its training schedule)"
        )
    conditioned = cosmos_dit.GUIDANCE_EMBEDDER in model.params
    if args.guidance is not None and not conditioned:
        raise ValueError(
            f"--guidance {args.guidance:g}: this student was distilled at one CFG scale; --guidance picks the "
            "scale of a guidance-conditioned student (distill.guidance_conditioned=True, docs/algorithm.md §15)"
        )
    guidance = (d["guidance"] if args.guidance is None else args.guidance) if conditioned else None
    return model, sampling.SamplerSettings(kind="student", steps=steps, guidance=guidance, **common)


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


def _devices_for(batch_size: int) -> list:
    """The most local devices (at most batch_size) that split the batch evenly."""
    devices = jax.local_devices()
    n = max(d for d in range(1, min(len(devices), batch_size) + 1) if batch_size % d == 0)
    return devices[:n]


def encode_prompts(
    src: str, prompts: list[str], batch_size: int, devices, model: Model, dtype: str = "bfloat16"
) -> np.ndarray:
    """Projected contexts (N, L, D) float32 of the prompts, in batches split over `devices` (FSDP text encoder
    in `dtype`)."""
    mesh = sharding.make_mesh({"fsdp": -1}, devices)
    te_cfg, te_params = reason1.load(src, dtype, mesh=mesh)
    expected = model.text_proj["kernel"].shape[0]
    if te_cfg.num_layers * te_cfg.hidden_size != expected:
        raise ValueError(
            f"--text-encoder {src}: gives {te_cfg.num_layers} x {te_cfg.hidden_size} = "
            f"{te_cfg.num_layers * te_cfg.hidden_size} features, the model's text projection takes "
            f"{expected}; use the model's own text encoder (Cosmos-Reason1-7B for Predict2.5)"
        )
    tok = reason1.load_tokenizer(src)
    proj = jax.device_put(model.text_proj, sharding.replicated(mesh))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = reason1.tokenize(tok, chunk + [chunk[-1]] * (batch_size - len(chunk)))
        ids = jax.device_put(ids, sharding.batch_sharding(mesh))
        out.append(np.asarray(_context(te_cfg, te_params, ids, proj))[: len(chunk)])
    return np.concatenate(out)


def generate(args) -> dict:
    """Runs the CLI's work; returns what generate.json holds."""
    t_start = time.perf_counter()
    prompts = read_prompts(args.prompts) if args.prompts else [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise ValueError("--prompt: empty prompt; give some text")
    frames = conditioning_frames(args)
    bucket = choose_bucket(args, frames)
    timings = {}

    t = time.perf_counter()
    model, settings = load_model(args)
    reference = settings.solver == "unipc"
    # NVIDIA's teacher inference feeds conditional frames the step's time; a student is sampled as its run trained
    # it (distill.replace_gt_timesteps; on for a .pt, as in the 2B reference distillation).
    replace_gt = not reference and bool(model.defaults["replace_gt_timesteps"])
    vae_cfg, vae_params = wan_vae.load(args.vae)
    timings["load_s"] = time.perf_counter() - t
    t_lat = 1 + (args.num_frames - 1) // vae_cfg.time_factor
    latent_shape = (
        model.net_config.in_channels,
        t_lat,
        bucket[1] // vae_cfg.space_factor,
        bucket[0] // vae_cfg.space_factor,
    )
    cond = make_conditioning(vae_cfg, vae_params, frames, bucket, latent_shape, args.vae_dtype, args.preprocess)
    if cond.num_cond >= t_lat:
        raise ValueError(
            f"--num-frames {args.num_frames} gives {t_lat} latent frames, all of them conditional "
            f"({cond.num_cond}); ask for more frames"
        )

    batch_size = min(args.batch_size or jax.local_device_count(), len(prompts))
    devices = _devices_for(batch_size)
    negative = args.negative_prompt if reference else None
    t = time.perf_counter()
    texts = prompts + ([negative] if reference else [])
    contexts = encode_prompts(args.text_encoder, texts, batch_size, devices, model, args.text_encoder_dtype)
    timings["text_encoding_s"] = time.perf_counter() - t

    mesh = sharding.make_mesh({"data": -1}, devices)
    repl, split = sharding.replicated(mesh), NamedSharding(mesh, P("data"))
    params = jax.device_put(model.params, repl)
    if reference:  # NVIDIA's unconditional branch: the negative prompt, encoded like any prompt
        uncond = jax.device_put(contexts[-1:], repl)
    else:  # the projection of all-zero text (§7), what the DMD2 teacher and the students were trained with
        shape = (1, 1, model.net_config.crossattn_emb_channels)
        uncond = jax.device_put(cosmos_dit.unconditional_context(model.text_proj, shape), repl)
    gt, mask, padding = (jax.device_put(x, repl) for x in (cond.gt_1cthw, cond.mask_11thw, cond.padding_11hw))

    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    videos, sheet_rows, batches = [], [], []
    with tqdm(total=len(prompts), unit="video", desc="generate", file=sys.stderr) as bar:
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            pad_idx = idx + [idx[-1]] * (batch_size - len(idx))
            context = jax.device_put(contexts[pad_idx], split)
            eps = jax.device_put(
                np.stack([np.asarray(initial_noise(args.seed, i, latent_shape)) for i in pad_idx]), split
            )
            t = time.perf_counter()
            latents = _sample_jit(
                settings,
                model.net_config,
                params,
                context,
                uncond,
                gt,
                mask,
                eps,
                scaling=model.defaults["scaling"],
                padding_mask_b1hw=padding,
                replace_gt_timesteps=replace_gt,
            ).block_until_ready()
            t_sample = time.perf_counter() - t
            t = time.perf_counter()
            pixels = np.asarray(wan_vae.decode(vae_cfg, vae_params, latents, dtype=args.vae_dtype))
            t_decode = time.perf_counter() - t
            latents = np.asarray(latents)
            for j, i in enumerate(idx):
                name = f"{i:04d}_{_slug(prompts[i])}"
                frames_u8 = video.to_uint8(pixels[j])
                video.write_mp4(out / f"{name}.mp4", frames_u8, args.fps)
                if args.save_latents:
                    _write_npz(
                        out / f"{name}.npz",
                        latents=latents[j],
                        padding_mask=cond.padding_11hw[0],
                        bucket=np.array(bucket, np.int32),
                        fps=np.float32(args.fps),
                    )
                sheet_rows.append((prompts[i], frames_u8))
                videos.append({"prompt": prompts[i], "file": f"{name}.mp4", "noise_index": i})
            batches.append({"videos": len(idx), "sampling_s": t_sample, "decoding_s": t_decode})
            bar.update(len(idx))
    _write_png(out / "contact_sheet.png", contact_sheet(sheet_rows))

    # The first batch compiles the sampler and the VAE decoder: per-video time from the later ones when there are.
    steady = batches[1:] or batches
    per_video = sum(b["sampling_s"] + b["decoding_s"] for b in steady) / sum(b["videos"] for b in steady)
    timings["sampling_s"] = sum(b["sampling_s"] for b in batches)
    timings["decoding_s"] = sum(b["decoding_s"] for b in batches)
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "model": {"kind": settings.kind, "source": model.description},
        "nfe": settings.nfe,
        "sampler": {
            "name": args.teacher_sampler if settings.kind == "teacher" else "student",
            "solver": settings.solver if settings.kind == "teacher" else "student",
            "steps": settings.steps,
            "guidance": settings.guidance,
            "negative_prompt": negative,
            "unconditional_context": "negative prompt" if reference else ("zero text" if settings.uses_cfg else None),
            "replace_gt_timesteps": replace_gt,
        },
        "settings": {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "preprocess": args.preprocess,
            "seed": args.seed,
            "num_frames": args.num_frames,
            "resolution": args.resolution,
            "bucket_wh": list(bucket),
            "latent_shape": list(latent_shape),
            "cond_latent_frames": cond.num_cond,
            "image": args.image,
            "video": args.video,
            "fps": args.fps,
            "dtype": args.dtype,
            "text_encoder_dtype": args.text_encoder_dtype,
            "vae_dtype": args.vae_dtype,
            "batch_size": batch_size,
            "devices": len(devices),
            "vae": args.vae,
            "text_encoder": args.text_encoder,
            "schedule_shift": settings.shift,
            "scaling": model.defaults["scaling"],
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
        args.teacher_sampler = args.teacher_sampler or DEFAULT_TEACHER_SAMPLER
        args.guidance = TEACHER_SAMPLERS[args.teacher_sampler][1] if args.guidance is None else args.guidance
        args.teacher_steps = 35 if args.teacher_steps is None else args.teacher_steps
        if args.teacher_sampler == "reference":
            args.negative_prompt = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
