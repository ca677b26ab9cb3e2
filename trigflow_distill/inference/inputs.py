"""What generated videos are conditioned on (docs/algorithm.md §7, §12): their prompts, and an image (1
conditional latent frame) or the last 1 + 4(N-1) frames of a video (N conditional latent frames), preprocessed to
the output size and encoded by the Wan2.1 VAE. Two preprocessings (`PREPROCESS`): "pad", the training data's (§12:
bucket of nearest aspect, fit inside, reflection pad, padding mask), and "crop", NVIDIA's inference CLI's (the
model's 16:9 size, resize to cover, centre crop, padding mask zeros).

- `read_prompts(path)`: the prompts of a text or JSONL file;
- `conditioning_frames(args)`: the pixel frames of --image / --video (None without them);
- `choose_bucket(args, frames)`: the (width, height) of the output;
- `make_conditioning(vae_cfg, vae_params, frames, bucket_wh, latent_shape, dtype, preprocess) -> Conditioning`.
"""

from __future__ import annotations

import io
import json
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from trigflow_distill.common import video
from trigflow_distill.models import wan_vae

PREPROCESS = ("crop", "pad")


class Conditioning(NamedTuple):
    """What every sample of a run is conditioned on besides its text (docs/algorithm.md §7, §12)."""

    bucket_wh: tuple[int, int]
    gt_1cthw: np.ndarray  # encoded conditional latent frames, zeros after them
    mask_11thw: np.ndarray  # 1 on the conditional latent frames
    padding_11hw: np.ndarray  # pixel padding mask of the bucket, 1 on padded pixels
    num_cond: int


def read_prompts(path: str) -> list[str]:
    """Prompts of a text file (one per line) or JSONL (a "prompt" or "caption" field per line); blanks skipped."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.strip()
        if text.startswith("{"):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({e.msg}); write one JSON object or prompt per line"
                ) from None
            text = record.get("prompt", record.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}:{n}: no non-empty "prompt" or "caption" string')
            text = text.strip()
        if text:
            prompts.append(text)
    if not prompts:
        raise ValueError(
            f"--prompts {path}: the file has no prompts (write one per line, or JSONL with a "
            '"prompt" or "caption" field)'
        )
    return prompts


def read_image(path: str) -> np.ndarray:
    """An image file as one RGB frame (1, H, W, 3) uint8."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(io.BytesIO(p.read_bytes())) as img:
            return np.asarray(img.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: cannot read the image ({e}); give a PNG/JPEG/WebP file") from None


def conditioning_frames(args) -> np.ndarray | None:
    """The pixel frames that become the conditional latent frames: the image, or the last 1 + 4(N-1) video frames
    (as the reference's Video2World inference does); None without --image/--video."""
    if args.image:
        return read_image(args.image)
    if not args.video:
        return None
    frames, _ = video.read_video(args.video)
    need = 1 + 4 * (args.cond_frames - 1)
    if len(frames) < need:
        raise ValueError(
            f"--video {args.video}: has {len(frames)} frames, --cond-frames {args.cond_frames} needs the last {need}"
        )
    return frames[-need:]


def choose_bucket(args, frames: np.ndarray | None) -> tuple[int, int]:
    """(width, height): --size, else --aspect, else with --preprocess pad the nearest aspect of the conditioning
    frames, else 16:9. NVIDIA's inference CLI (crop) always uses the model's 16:9 size (704 x 1280 at "720": its
    `get_video_height_width`) whatever the input's aspect."""
    if args.size:
        return args.size
    table = video.buckets(args.resolution)
    if args.aspect:
        return table[args.aspect]
    if frames is not None and args.preprocess == "pad":
        return video.choose_bucket(frames.shape[2], frames.shape[1], args.resolution)
    return table["16:9"]


def make_conditioning(
    vae_cfg,
    vae_params,
    frames: np.ndarray | None,
    bucket_wh,
    latent_shape,
    dtype: str = "float32",
    preprocess: str = "pad",
) -> Conditioning:
    """Encodes the conditioning frames, preprocessed by `preprocess` ("pad" or "crop"), into the first latent
    frames of a (1, C, T, h, w) ground truth."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess {preprocess!r}: use one of {', '.join(PREPROCESS)}")
    c, t, h, w = latent_shape
    bw, bh = bucket_wh
    gt = np.zeros((1, c, t, h, w), np.float32)
    mask = np.zeros((1, 1, t, h, w), np.float32)
    if frames is None:
        return Conditioning(bucket_wh, gt, mask, np.zeros((1, 1, bh, bw), np.float32), 0)
    resize = video.resize_and_crop if preprocess == "crop" else video.resize_and_pad
    pixels, padding = resize(frames, bucket_wh)
    latents = np.asarray(wan_vae.encode(vae_cfg, vae_params, pixels[None], dtype=dtype))
    n = latents.shape[2]
    gt[:, :, :n] = latents
    mask[:, :, :n] = 1.0
    return Conditioning(bucket_wh, gt, mask, padding[None], n)
