"""What generated videos are conditioned on (docs/algorithm.md §7, §12): their prompts, and an image (1
conditional latent frame) or the last 1 + 4(N-1) frames of a video (N conditional latent frames), preprocessed to
the output size and encoded by the Wan2.1 VAE. Two preprocessings (`PREPROCESS`): "pad", the training data's (§12:
bucket of nearest aspect, fit inside, reflection pad, padding mask), and "crop", NVIDIA's inference CLI's (the
model's 16:9 size, resize to cover, centre crop, padding mask zeros).

- `read_prompts(path)`: the prompts of a text or JSONL file;
- `read_conditioning(image, video, cond_frames)`: the pixel frames of an image / video (a path or an array; None
  without them); `conditioning_frames(args)` the same for the CLI's --image / --video;
- `output_size(frames, size, aspect, resolution, preprocess)`: the (width, height) of the output;
  `choose_bucket(args, frames)` the same for the CLI's flags;
- `make_conditioning(vae_cfg, vae_params, frames, bucket_wh, latent_shape, dtype, preprocess) -> Conditioning`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
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
    """Prompts of a UTF-8 text file (one per line) or JSONL (a "prompt" or "caption" field per line); blanks
    skipped. ValueError naming the file and line of bytes that are not UTF-8."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = []
    for n, raw in enumerate(p.read_bytes().splitlines(), 1):
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--prompts {path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "save the file as UTF-8"
            ) from None
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


# Background that transparent pixels (RGBA, LA, PA, P with a transparent colour) are composited over: what the
# image shows in a viewer on a white page, rather than the arbitrary colours stored under alpha 0.
_BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image of any mode, scaled by the mode's range.

    PIL's own `convert("RGB")` clips the wide modes to 0..255, so a 16-bit grayscale PNG becomes white. Here:
    "I;16*" (16-bit: 16-bit PNG and TIFF) and "I" (32-bit integers, what PIL gives some 16-bit files) are taken as
    0..65535 and divided by 257 (65535 -> 255, exact for 8-bit values stored as v*257); "F" (32-bit float) is taken
    as 0..1, the float-image convention, and multiplied by 255; both are clipped to the range, NaN gives 0. Modes with
    alpha are composited over white; CMYK, YCbCr, LAB, P, 1 and L go through PIL's conversion.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0
    elif mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(img, np.float64), nan=0.0), 0.0, 1.0) * 255.0
    else:
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.asarray(img.convert("RGB"))
    gray = np.round(gray).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def read_image(path: str) -> np.ndarray:
    """An image file as one RGB frame (1, H, W, 3) uint8, any PIL mode scaled by its range (`to_rgb`)."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that: a 10k x 10k image is as much a bomb to decode here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(p.read_bytes())) as img:
                img.load()
                return to_rgb(img)[None]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(
            f"--image {path}: too large to decode safely ({e}); give an image of at most "
            f"{Image.MAX_IMAGE_PIXELS} pixels (it is resized to the output size anyway)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"--image {path}: cannot read the image ({e}); give a PNG/JPEG/WebP file") from None


def _as_frames(frames, what: str) -> np.ndarray:
    """An image (H, W, 3) or frames (T, H, W, 3) given as an array: uint8 RGB frames (T, H, W, 3)."""
    arr = np.asarray(frames)
    arr = arr[None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"{what}: got an array {arr.dtype} {arr.shape}; give uint8 RGB frames (H, W, 3) or (T, H, W, 3), or a path"
        )
    return arr


def read_conditioning(image=None, video_=None, cond_frames: int = 1) -> np.ndarray | None:
    """The pixel frames that become the conditional latent frames: the image, or the last 1 + 4(N-1) frames of the
    video (as the reference's Video2World inference does), each a path or a uint8 array; None without either."""
    if image is not None and video_ is not None:
        raise ValueError("give an image or a video to condition on, not both")
    if image is not None:
        return read_image(image) if isinstance(image, (str, os.PathLike)) else _as_frames(image, "image")[:1]
    if video_ is None:
        return None
    if isinstance(video_, (str, os.PathLike)):
        frames, _ = video.read_video(video_)
        where = f"--video {video_}"
    else:
        frames, where = _as_frames(video_, "video"), "the video"
    need = 1 + 4 * (cond_frames - 1)
    if len(frames) < need:
        raise ValueError(f"{where}: has {len(frames)} frames, --cond-frames {cond_frames} needs the last {need}")
    return frames[-need:]


def conditioning_frames(args) -> np.ndarray | None:
    """`read_conditioning` of the CLI's --image / --video / --cond-frames."""
    return read_conditioning(args.image, args.video, args.cond_frames)


def output_size(
    frames: np.ndarray | None, size=None, aspect: str | None = None, resolution: str = "720", preprocess: str = "pad"
) -> tuple[int, int]:
    """(width, height): `size`, else the bucket of `aspect`, else with preprocess "pad" the nearest aspect of the
    conditioning frames, else 16:9. NVIDIA's inference CLI (crop) always uses the model's 16:9 size (704 x 1280 at
    "720": its `get_video_height_width`) whatever the input's aspect."""
    if size:
        return tuple(size)
    table = video.buckets(resolution)
    if aspect:
        return table[aspect]
    if frames is not None and preprocess == "pad":
        return video.choose_bucket(frames.shape[2], frames.shape[1], resolution)
    return table["16:9"]


def choose_bucket(args, frames: np.ndarray | None) -> tuple[int, int]:
    """`output_size` of the CLI's --size / --aspect / --resolution / --preprocess."""
    return output_size(frames, args.size, args.aspect, args.resolution, args.preprocess)


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
