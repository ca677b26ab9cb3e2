"""The Wan2.1 VAE: videos into normalised latents and back (docs/algorithm.md §9, §10), and a small CLI.

API:
- `load(src) -> (cfg, params)`: a native Wan checkpoint (`tokenizer.pth` of nvidia/Cosmos-Predict2.5-2B, a plain
  torch state dict, read without torch) or a diffusers `AutoencoderKLWan` folder (config.json +
  diffusion_pytorch_model.safetensors); `hf://OWNER/NAME/PATH[@REV]` sources too. The architecture is inferred
  from the tensor shapes.
- `encode(cfg, params, video_b3thw) -> latents (B, 16, 1+(T-1)/4, H/8, W/8)`: pixels in [-1, 1], T = 1 + 4k; the
  latent is the posterior mean normalised per channel, (mu - mean) / std.
- `decode(cfg, params, latents) -> video (B, 3, 1+4(T_lat-1), 8h, 8w)`: the inverse map, not clamped.
Both are jitted (per shape) and keep whatever sharding the input has (e.g. the batch over a 'data' mesh axis).

CLI (`python -m trigflow_distill.models.wan_vae --help`):
    python -m trigflow_distill.models.wan_vae encode IN.mp4 OUT.npz [--vae SRC] [--resolution 480] [--frames N]
    python -m trigflow_distill.models.wan_vae decode IN.npz OUT.mp4 [--vae SRC] [--fps 16]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from trigflow_distill.common import cli, video
from trigflow_distill.models import hub, torchfile
from trigflow_distill.models.wan_vae import names, network
from trigflow_distill.models.wan_vae.names import LATENT_MEAN, LATENT_STD, WanVAEConfig

DEFAULT_SOURCE = "hf://nvidia/Cosmos-Predict2.5-2B/tokenizer.pth"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_DIFFUSERS_CLASS = "AutoencoderKLWan"


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    torchfile.safetensors_header(path)  # a damaged header: a one-line error naming the file, before any allocation
    with safe_open(os.fspath(path), framework="np") as st:
        return {k: st.get_tensor(k) for k in st.keys()}


def _diffusers_folder(folder: epath.Path) -> dict[str, np.ndarray]:
    """Native-named state dict of a diffusers AutoencoderKLWan folder (the model itself or a pipeline's `vae/`)."""
    found = [d for d in (folder, folder / "vae") if (d / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(
            f"{folder}: no config.json (expected a diffusers {_DIFFUSERS_CLASS} folder or a native Wan .pth file)"
        )
    folder = found[0]
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{folder / 'config.json'}: not a JSON object (expected a diffusers {_DIFFUSERS_CLASS} config)"
        )
    if config.get("_class_name") != _DIFFUSERS_CLASS:
        raise ValueError(
            f"{folder}: config.json _class_name is {config.get('_class_name')!r}, expected {_DIFFUSERS_CLASS!r}"
        )
    if config.get("is_residual") or config.get("patch_size"):
        raise ValueError(f"{folder}: a Wan2.2-style VAE (is_residual / patch_size) is not the Wan2.1 VAE")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (only safetensors weights are supported)")
    return names.diffusers_to_native(_read_safetensors(weights))


def load(src: str | os.PathLike) -> tuple[WanVAEConfig, dict[str, np.ndarray]]:
    """(cfg, params) of a native Wan2.1 VAE state dict (.pth, or .safetensors) or a diffusers folder, local or hf://.

    Raises FileNotFoundError for a missing source and ValueError (listing the missing / unknown tensors) for a
    state dict that is not a Wan2.1 VAE. The params are float32 numpy arrays on the host: `jax.device_put` them
    once when calling encode/decode repeatedly.
    """
    path = hub.resolve_local(src, "the VAE")
    if path.is_dir():
        state = _diffusers_folder(path)
    elif not path.is_file():
        raise FileNotFoundError(f"{src}: no such VAE checkpoint (a native .pth file or a diffusers folder)")
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
        if "encoder.conv_in.weight" in state:
            state = names.diffusers_to_native(state)
    else:
        state = torchfile.load(os.fspath(path))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        cfg = names.infer_config(shapes)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if cfg.z_dim != len(LATENT_MEAN):
        raise ValueError(f"{src}: z_dim {cfg.z_dim}, but the latent normalisation has {len(LATENT_MEAN)} channels")
    try:
        params = names.from_torch(state, cfg)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    return cfg, {k: np.asarray(v, np.float32) for k, v in params.items()}


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose float32 or bfloat16")
        return _DTYPES[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"unsupported compute dtype {dtype}; choose float32 or bfloat16")
    return jnp.dtype(dtype).type


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _encode(cfg: WanVAEConfig, params, video_b3thw, dtype):
    moments = network.encode_moments(cfg, params, jnp.moveaxis(video_b3thw, 1, -1), dtype=dtype)
    mu = moments[..., : cfg.z_dim]
    z = (mu - jnp.asarray(LATENT_MEAN)) / jnp.asarray(LATENT_STD)
    return jnp.moveaxis(z, -1, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _decode(cfg: WanVAEConfig, params, latents_bcthw, dtype):
    mu = jnp.moveaxis(latents_bcthw.astype(jnp.float32), 1, -1) * jnp.asarray(LATENT_STD) + jnp.asarray(LATENT_MEAN)
    return jnp.moveaxis(network.decode_pixels(cfg, params, mu, dtype=dtype), -1, 1)


def encode(cfg: WanVAEConfig, params: Mapping, video_b3thw, dtype=jnp.float32) -> jax.Array:
    """Video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> normalised latent mean
    (B, 16, 1 + (T-1)/4, H/8, W/8) float32. `dtype`: compute dtype (float32 or bfloat16)."""
    shape = tuple(video_b3thw.shape)
    if len(shape) != 5 or shape[1] != 3:
        raise ValueError(f"encode needs a video (B, 3, T, H, W), got shape {shape}")
    b, _, t, h, w = shape
    tf, sf = cfg.time_factor, cfg.space_factor
    if t < 1 or (t - 1) % tf:
        raise ValueError(f"encode needs T = 1 + {tf}k frames, got T = {t}; use the first {1 + (t - 1) // tf * tf}")
    if h % sf or w % sf:
        raise ValueError(f"encode needs H and W multiples of {sf}, got {h}x{w}; pad or crop the frames")
    return _encode(cfg, params, jnp.asarray(video_b3thw, jnp.float32), _dtype(dtype))


def decode(cfg: WanVAEConfig, params: Mapping, latents_bcthw, dtype=jnp.float32) -> jax.Array:
    """Normalised latents (B, 16, T_lat, h, w) -> video (B, 3, 1 + 4(T_lat-1), 8h, 8w) float32, not clamped."""
    shape = tuple(latents_bcthw.shape)
    if len(shape) != 5 or shape[1] != cfg.z_dim or shape[2] < 1:
        raise ValueError(f"decode needs latents (B, {cfg.z_dim}, T_lat >= 1, h, w), got shape {shape}")
    return _decode(cfg, params, jnp.asarray(latents_bcthw), _dtype(dtype))


# ----------------------------------------------------------------------------------------------------------------
# CLI


class _Stages:
    """A tqdm bar over the CLI's stages (the encode/decode itself is one compiled call); cleared on exit."""

    def __init__(self, desc: str, total: int):
        self.bar = tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, leave=False)

    def __call__(self, name: str) -> None:
        if self.bar.n or self.bar.postfix:
            self.bar.update()
        self.bar.set_postfix_str(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _cmd_encode(args) -> None:
    with _Stages("vae encode", 4) as stage:
        stage("read video")
        frames, fps = video.read_video(args.input)
        n = args.frames if args.frames is not None else 1 + (len(frames) - 1) // 4 * 4
        names.check_frame_count(n)
        if n > len(frames):
            raise ValueError(f"{args.input}: has {len(frames)} frames, fewer than --frames {n}")
        bucket = video.choose_bucket(frames.shape[2], frames.shape[1], args.resolution)
        pixels, mask = video.resize_and_pad(frames[:n], bucket)
        stage("load VAE")
        cfg, params = load(args.vae)
        stage("encode")
        latents = np.asarray(encode(cfg, params, pixels[None], dtype=args.dtype))[0]
        stage("write")
        out = epath.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as f:
            np.savez(f, latents=latents, padding_mask=mask, bucket=np.array(bucket, np.int32), fps=np.float32(fps))
    print(
        f"{args.input}: {n} frames {frames.shape[2]}x{frames.shape[1]} -> bucket {bucket[0]}x{bucket[1]} -> "
        f"latents {latents.shape} in {args.output}"
    )


def _cmd_decode(args) -> None:
    with _Stages("vae decode", 4) as stage:
        stage("read latents")
        p = epath.Path(args.input)
        if not p.exists():
            raise FileNotFoundError(f"{args.input}: no such file")
        with p.open("rb") as f, np.load(f) as data:
            if "latents" not in data:
                raise ValueError(f"{args.input}: no 'latents' array (write it with `vae encode`)")
            latents = np.asarray(data["latents"], np.float32)
        if latents.ndim == 4:
            latents = latents[None]
        stage("load VAE")
        cfg, params = load(args.vae)
        stage("decode")
        pixels = np.asarray(decode(cfg, params, latents, dtype=args.dtype))[0]
        stage("write video")
        video.write_mp4(args.output, video.to_uint8(pixels), args.fps)
    print(
        f"{args.input}: latents {latents.shape[1:]} -> {pixels.shape[1]} frames "
        f"{pixels.shape[3]}x{pixels.shape[2]} in {args.output}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-vae",
        formatter_class=cli.HelpFormatter,
        description="Encode a video into normalised Wan2.1 VAE latents (the DiT's input) or decode latents back "
        "into a video, for quick checks. Encode resizes and pads to the bucket of nearest aspect "
        "ratio (docs/algorithm.md §12) and keeps the first 1+4k frames.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="IN.mp4 -> OUT.npz (latents, padding_mask, bucket, fps)")
    enc.add_argument("input", help="video file (anything PyAV/FFmpeg reads)")
    enc.add_argument("output", help=".npz with latents (16,T_lat,H/8,W/8), padding_mask (1,H,W), bucket (W,H)")
    enc.add_argument("--resolution", default="480", choices=video.RESOLUTIONS, help="bucket table (default 480)")
    enc.add_argument("--frames", type=int, default=None, help="frames to encode, 1+4k (default: all that fit)")
    dec = sub.add_parser("decode", help="IN.npz -> OUT.mp4")
    dec.add_argument("input", help=".npz with a 'latents' array (16,T_lat,h,w) or (B,16,T_lat,h,w)")
    dec.add_argument("output", help="mp4 to write (H.264)")
    dec.add_argument("--fps", type=float, default=16.0, help="frame rate of the written video (default 16)")
    for p in (enc, dec):
        p.add_argument(
            "--vae",
            default=DEFAULT_SOURCE,
            help=f"native Wan .pth, diffusers AutoencoderKLWan folder or hf:// source (default {DEFAULT_SOURCE})",
        )
        p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES), help="compute dtype (default float32)")
    args = parser.parse_args(argv)
    try:
        (_cmd_encode if args.command == "encode" else _cmd_decode)(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
