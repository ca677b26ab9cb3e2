"""Wan2.1 VAE: JAX encode/decode speed against diffusers' PyTorch AutoencoderKLWan, and compile-only peak memory.

    python benchmarks/vae_speed.py --json /tmp/vae_speed.json                 # speed, dim 96, 17x128x128, CPU
    python benchmarks/vae_speed.py --memory --json /tmp/vae_memory.json       # 93x704x1280 on one device, bf16

Speed: the same random release-width weights (dim 96, z_dim 16, dim_mult 1,2,4,4) in both, the same input clip;
JAX `wan_vae.encode` / `wan_vae.decode` (jitted, fp32 unless --dtype) and diffusers' `encode(...).latent_dist.mean` /
`decode(...)` under `torch.no_grad` (fp32), called in turn per round after one warm-up call each (compilation);
wall-clock medians, frames/s = pixel frames / time. Prints one JSON line.

Memory: `jax.jit(...).lower(ShapeDtypeStructs).compile().memory_analysis()` of encode and decode of one clip at
release size, nothing executed: arguments (weights + input), output, and XLA's temporary buffers; peak = their sum
(an upper bound that ignores buffer sharing with the arguments). On CPU the estimate is for the CPU backend's
buffer assignment; on an accelerator run it there for that chip's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.models import wan_vae


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def memory(args) -> dict:
    cfg = wan_vae.WanVAEConfig(dim=args.dim)
    dtype = jnp.dtype(args.dtype)
    shapes = wan_vae.from_torch({k: np.empty(s, np.float32) for k, s in wan_vae.param_shapes(cfg).items()}, cfg)
    params = {k: jax.ShapeDtypeStruct(v.shape, dtype) for k, v in shapes.items()}  # weights stored in the dtype
    t, h, w = args.frames, args.height, args.width
    t_lat = 1 + (t - 1) // 4
    video = jax.ShapeDtypeStruct((1, 3, t, h, w), jnp.float32)
    latents = jax.ShapeDtypeStruct((1, cfg.z_dim, t_lat, h // 8, w // 8), jnp.float32)
    out = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "dim": args.dim,
        "dtype": args.dtype,
        "clip": f"{t}x{h}x{w}",
        "latent": f"{t_lat}x{h // 8}x{w // 8}",
    }
    for name, fn, x in (("encode", wan_vae._encode, video), ("decode", wan_vae._decode, latents)):
        start = time.perf_counter()
        compiled = fn.lower(cfg, params, x, dtype.type).compile()
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        out[name] = {
            "args_gib": _gib(m.argument_size_in_bytes),
            "output_gib": _gib(m.output_size_in_bytes),
            "temp_gib": _gib(m.temp_size_in_bytes),
            "peak_gib": _gib(peak),
            "fits_16gib": peak < 16 * 2**30,
            "compile_s": round(time.perf_counter() - start, 1),
        }
    return out


def speed(args) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    cfg = wan_vae.WanVAEConfig(dim=args.dim)
    params = wan_vae.init_params(cfg, jax.random.key(0))
    model = AutoencoderKLWan(base_dim=args.dim, z_dim=cfg.z_dim).eval()
    state = wan_vae.native_to_diffusers(wan_vae.to_torch(params, cfg), cfg)
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, args.frames, args.height, args.width))
    x = x.astype(np.float32)
    x_t = torch.from_numpy(x)
    params_dev = jax.device_put(params)
    z = np.asarray(wan_vae.encode(cfg, params_dev, x))
    z_t = torch.from_numpy(z * wan_vae.LATENT_STD[:, None, None, None] + wan_vae.LATENT_MEAN[:, None, None, None])

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    calls = {
        "jax_encode": lambda: wan_vae.encode(cfg, params_dev, x, dtype=args.dtype).block_until_ready(),
        "jax_decode": lambda: wan_vae.decode(cfg, params_dev, z, dtype=args.dtype).block_until_ready(),
        "torch_encode": lambda: model.encode(x_t).latent_dist.mean,
        "torch_decode": lambda: model.decode(z_t).sample,
    }
    times = {k: [] for k in calls}
    with torch.no_grad():
        for k, fn in calls.items():  # warm-up (JAX compiles)
            fn()
        for _ in range(args.repeats):
            for k, fn in calls.items():
                times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    frames = args.batch * args.frames
    return {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "dim": args.dim,
        "dtype": args.dtype,
        "clip": f"{args.batch}x{args.frames}x{args.height}x{args.width}",
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        **{f"{k}_s": round(v, 3) for k, v in med.items()},
        **{f"{k}_fps": round(frames / v, 2) for k, v in med.items()},
        "encode_speedup": round(med["torch_encode"] / med["jax_encode"], 2),
        "decode_speedup": round(med["torch_decode"] / med["jax_decode"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="store_true", help="compile-only peak memory instead of speed")
    parser.add_argument("--dim", type=int, default=96, help="base width (release 96)")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames, 1+4k (speed 17, memory 93)")
    parser.add_argument("--height", type=int, default=None, help="(speed 128, memory 704)")
    parser.add_argument("--width", type=int, default=None, help="(speed 128, memory 1280)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="(speed fp32, memory bf16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    defaults = (93, 704, 1280, "bfloat16") if args.memory else (17, 128, 128, "float32")
    for name, value in zip(("frames", "height", "width", "dtype"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    result = memory(args) if args.memory else speed(args)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
