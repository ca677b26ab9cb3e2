"""The Wan2.1 VAE (the latent space of Cosmos Predict2.5, docs/algorithm.md §10) as pure JAX functions.

Parameters are a flat dict keyed by the native Wan state-dict names (`encoder.conv1.weight`, ...), in JAX layouts:
3-D conv kernels (kT, kH, kW, in, out), 2-D conv kernels (kH, kW, in, out), RMS-norm gammas (C,), biases (C,).
`from_torch` / `to_torch` convert a native torch-layout state dict (numpy) both ways bit-exactly;
`native_to_diffusers` / `diffusers_to_native` rename between the native and diffusers `AutoencoderKLWan` names.

The temporal schedule is part of the function (a plain full-sequence causal conv gives different frames):
the encoder sees frame 0 alone, then chunks of 4 frames; the decoder one latent frame at a time. Every 3x3x3
causal conv keeps the last 2 frames of its input as the next chunk's past (zeros before frame 0); a
downsample3d applies its stride-2 time conv only from the 2nd chunk on, with the previous chunk's last frame
prepended; an upsample3d skips its time conv (and the frame doubling) on the first latent frame and starts its
past from zeros. The chunks after the first run in a `lax.scan` whose carry is the list of caches, so memory
is flat in the number of frames. Activations are channels-last (B, T, H, W, C); compute in float32 or
bfloat16 (norms and the attention softmax in float32).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ENC_CHUNK = 4  # pixel frames per encoder chunk after the first frame
TIME_FACTOR = 4  # latent frame = 4 pixel frames (after the first)
SPACE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan2.1 VAE (release: dim 96, z_dim 16, dim_mult (1,2,4,4), 2 res blocks, (F,T,T))."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries"
            )

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Layer plans and parameter shapes (native names, torch layouts)


def encoder_plan(cfg: WanVAEConfig) -> list[tuple[str, str, int, int]]:
    """(kind, native prefix, in_dim, out_dim) of `encoder.downsamples.*`; kind in res/down2d/down3d."""
    dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
    plan, i = [], 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", f"encoder.downsamples.{i}", cin, cout))
            cin, i = cout, i + 1
        if level != len(cfg.dim_mult) - 1:
            kind = "down3d" if cfg.temporal_downsample[level] else "down2d"
            plan.append((kind, f"encoder.downsamples.{i}", cout, cout))
            i += 1
    return plan


def decoder_plan(cfg: WanVAEConfig) -> list[tuple[str, str, int, int]]:
    """(kind, native prefix, in_dim, out_dim) of `decoder.upsamples.*`; kind in res/up2d/up3d."""
    mult = cfg.dim_mult
    dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
    temporal_up = cfg.temporal_downsample[::-1]
    plan, i = [], 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            cin //= 2  # the previous level's upsample conv halves the width
        for _ in range(cfg.num_res_blocks + 1):
            plan.append(("res", f"decoder.upsamples.{i}", cin, cout))
            cin, i = cout, i + 1
        if level != len(mult) - 1:
            plan.append(("up3d" if temporal_up[level] else "up2d", f"decoder.upsamples.{i}", cout, cout))
            i += 1
    return plan


def _res_shapes(prefix: str, cin: int, cout: int) -> dict[str, tuple]:
    shapes = {
        f"{prefix}.residual.0.gamma": (cin, 1, 1, 1),
        f"{prefix}.residual.2.weight": (cout, cin, 3, 3, 3),
        f"{prefix}.residual.2.bias": (cout,),
        f"{prefix}.residual.3.gamma": (cout, 1, 1, 1),
        f"{prefix}.residual.6.weight": (cout, cout, 3, 3, 3),
        f"{prefix}.residual.6.bias": (cout,),
    }
    if cin != cout:
        shapes.update({f"{prefix}.shortcut.weight": (cout, cin, 1, 1, 1), f"{prefix}.shortcut.bias": (cout,)})
    return shapes


def _middle_shapes(prefix: str, c: int) -> dict[str, tuple]:
    return {
        **_res_shapes(f"{prefix}.middle.0", c, c),
        f"{prefix}.middle.1.norm.gamma": (c, 1, 1),
        f"{prefix}.middle.1.to_qkv.weight": (3 * c, c, 1, 1),
        f"{prefix}.middle.1.to_qkv.bias": (3 * c,),
        f"{prefix}.middle.1.proj.weight": (c, c, 1, 1),
        f"{prefix}.middle.1.proj.bias": (c,),
        **_res_shapes(f"{prefix}.middle.2", c, c),
    }


def param_shapes(cfg: WanVAEConfig) -> dict[str, tuple]:
    """Native name -> torch shape of every tensor of the native Wan2.1 VAE state dict, in its order."""
    z2, top = 2 * cfg.z_dim, cfg.dim * cfg.dim_mult[-1]
    shapes = {"encoder.conv1.weight": (cfg.dim, 3, 3, 3, 3), "encoder.conv1.bias": (cfg.dim,)}
    for kind, prefix, cin, cout in encoder_plan(cfg):
        if kind == "res":
            shapes.update(_res_shapes(prefix, cin, cout))
        else:
            shapes.update({f"{prefix}.resample.1.weight": (cout, cout, 3, 3), f"{prefix}.resample.1.bias": (cout,)})
            if kind == "down3d":
                shapes.update(
                    {f"{prefix}.time_conv.weight": (cout, cout, 3, 1, 1), f"{prefix}.time_conv.bias": (cout,)}
                )
    shapes.update(_middle_shapes("encoder", top))
    shapes.update(
        {
            "encoder.head.0.gamma": (top, 1, 1, 1),
            "encoder.head.2.weight": (z2, top, 3, 3, 3),
            "encoder.head.2.bias": (z2,),
            "conv1.weight": (z2, z2, 1, 1, 1),
            "conv1.bias": (z2,),
            "conv2.weight": (cfg.z_dim, cfg.z_dim, 1, 1, 1),
            "conv2.bias": (cfg.z_dim,),
            "decoder.conv1.weight": (top, cfg.z_dim, 3, 3, 3),
            "decoder.conv1.bias": (top,),
        }
    )
    shapes.update(_middle_shapes("decoder", top))
    for kind, prefix, cin, cout in decoder_plan(cfg):
        if kind == "res":
            shapes.update(_res_shapes(prefix, cin, cout))
        else:
            shapes.update(
                {f"{prefix}.resample.1.weight": (cout // 2, cout, 3, 3), f"{prefix}.resample.1.bias": (cout // 2,)}
            )
            if kind == "up3d":
                shapes.update(
                    {f"{prefix}.time_conv.weight": (2 * cout, cout, 3, 1, 1), f"{prefix}.time_conv.bias": (2 * cout,)}
                )
    out = cfg.dim * cfg.dim_mult[0]
    shapes.update(
        {
            "decoder.head.0.gamma": (out, 1, 1, 1),
            "decoder.head.2.weight": (3, out, 3, 3, 3),
            "decoder.head.2.bias": (3,),
        }
    )
    return shapes


def infer_config(shapes: Mapping[str, tuple]) -> WanVAEConfig:
    """Architecture from the tensor shapes of a native state dict (raises ValueError on a foreign dict)."""
    needed = ("encoder.conv1.weight", "conv2.weight")
    if any(k not in shapes for k in needed):
        raise ValueError(
            f"not a Wan2.1 VAE state dict: no {' / '.join(needed)} (first keys: {', '.join(list(shapes)[:5])})"
        )
    dim, z_dim = int(shapes["encoder.conv1.weight"][0]), int(shapes["conv2.weight"][0])
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    resamples = [b for b in blocks if f"encoder.downsamples.{b}.resample.1.weight" in shapes]
    num_res = resamples[0] if resamples else len(blocks)
    if num_res == 0:
        raise ValueError("not a Wan2.1 VAE state dict: encoder.downsamples.0 is not a residual block")
    levels = len(resamples) + 1
    mult = []
    for level in range(levels):
        key = f"encoder.downsamples.{level * (num_res + 1)}.residual.2.weight"
        if key not in shapes:
            raise ValueError(f"not a Wan2.1 VAE state dict: missing {key}")
        mult.append(int(shapes[key][0]) // dim)
    temporal = tuple(f"encoder.downsamples.{b}.time_conv.weight" in shapes for b in resamples)
    return WanVAEConfig(
        dim=dim, z_dim=z_dim, dim_mult=tuple(mult), num_res_blocks=num_res, temporal_downsample=temporal
    )


def check_state_dict(shapes: Mapping[str, tuple], cfg: WanVAEConfig) -> None:
    """ValueError listing the missing, unknown and mis-shaped tensors (gammas may be (C,), (C,1,1) or (C,1,1,1))."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in shapes]
    unknown = [k for k in shapes if k not in want]
    bad = [
        f"{k} {tuple(shapes[k])} (expected {want[k]})"
        for k in want
        if k in shapes
        and (
            tuple(shapes[k]) != want[k]
            if not k.endswith("gamma")
            else int(np.prod(shapes[k])) != want[k][0] or (len(shapes[k]) and shapes[k][0] != want[k][0])
        )
    ]
    if missing or unknown or bad:
        parts = [
            f"{len(missing)} missing: {', '.join(missing)}" if missing else "",
            f"{len(unknown)} unknown: {', '.join(unknown)}" if unknown else "",
            f"{len(bad)} with a wrong shape: {', '.join(bad)}" if bad else "",
        ]
        raise ValueError(f"Wan2.1 VAE state dict does not match {cfg}: " + "; ".join(p for p in parts if p))


# ----------------------------------------------------------------------------------------------------------------
# Layout conversion (torch <-> JAX) and native <-> diffusers names


def from_torch(state: Mapping[str, np.ndarray], cfg: WanVAEConfig) -> dict[str, np.ndarray]:
    """Native torch-layout state dict -> params (numpy, JAX layouts, dtype kept). Checks the keys first."""
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, cfg)
    params = {}
    for k in param_shapes(cfg):
        v = np.asarray(state[k])
        if k.endswith("gamma"):
            v = v.reshape(-1)
        elif v.ndim == 5:
            v = v.transpose(2, 3, 4, 1, 0)
        elif v.ndim == 4:
            v = v.transpose(2, 3, 1, 0)
        params[k] = np.ascontiguousarray(v)
    return params


def to_torch(params: Mapping[str, np.ndarray], cfg: WanVAEConfig) -> dict[str, np.ndarray]:
    """Params -> native torch-layout state dict (numpy), the exact inverse of `from_torch`."""
    out = {}
    for k, shape in param_shapes(cfg).items():
        v = np.asarray(params[k])
        if k.endswith("gamma"):
            v = v.reshape(shape)
        elif v.ndim == 5:
            v = v.transpose(4, 3, 0, 1, 2)
        elif v.ndim == 4:
            v = v.transpose(3, 2, 0, 1)
        out[k] = np.ascontiguousarray(v)
    return out


_RES_NAMES = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
_MID_NAMES = {
    "middle.0": "mid_block.resnets.0",
    "middle.1": "mid_block.attentions.0",
    "middle.2": "mid_block.resnets.1",
}
_TOP_NAMES = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
}


def diffusers_names(cfg: WanVAEConfig) -> dict[str, str]:
    """Native name -> diffusers `AutoencoderKLWan` name, for every tensor of `param_shapes(cfg)`."""
    prefix_map = dict(_TOP_NAMES)
    for part in ("encoder", "decoder"):
        prefix_map.update({f"{part}.{a}": f"{part}.{b}" for a, b in _MID_NAMES.items()})
    for _, prefix, _, _ in encoder_plan(cfg):
        prefix_map[prefix] = prefix.replace("encoder.downsamples.", "encoder.down_blocks.")
    level, res = 0, 0
    for kind, prefix, _, _ in decoder_plan(cfg):
        if kind == "res":
            prefix_map[prefix] = f"decoder.up_blocks.{level}.resnets.{res}"
            res += 1
        else:
            prefix_map[prefix] = f"decoder.up_blocks.{level}.upsamplers.0"
            level, res = level + 1, 0
    names = {}
    for k in param_shapes(cfg):
        stem, leaf = k.rsplit(".", 1)
        for sub, new in _RES_NAMES.items():  # residual-block layer names inside a block
            if stem.endswith("." + sub):
                stem = stem[: -len(sub)] + new
                break
        owner = max((p for p in prefix_map if stem == p or stem.startswith(p + ".")), key=len)
        names[k] = prefix_map[owner] + stem[len(owner) :] + "." + leaf
    return names


def native_to_diffusers(state: Mapping[str, np.ndarray], cfg: WanVAEConfig) -> dict[str, np.ndarray]:
    """Rename a native state dict to diffusers names (same tensors, same shapes)."""
    names = diffusers_names(cfg)
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, cfg)
    return {names[k]: v for k, v in state.items()}


def diffusers_to_native(state: Mapping[str, np.ndarray], cfg: WanVAEConfig | None = None) -> dict[str, np.ndarray]:
    """Rename a diffusers `AutoencoderKLWan` state dict to native names (architecture inferred if cfg is None)."""
    if cfg is None:
        cfg = infer_config(diffusers_shapes_to_native({k: tuple(v.shape) for k, v in state.items()}))
    inverse = {d: n for n, d in diffusers_names(cfg).items()}
    unknown = [k for k in state if k not in inverse]
    missing = [d for d in inverse if d not in state]
    if unknown or missing:
        raise ValueError(
            f"diffusers AutoencoderKLWan state dict does not match {cfg}: "
            + "; ".join(
                p
                for p in (
                    f"{len(missing)} missing: {', '.join(missing)}" if missing else "",
                    f"{len(unknown)} unknown: {', '.join(unknown)}" if unknown else "",
                )
                if p
            )
        )
    return {inverse[k]: v for k, v in state.items()}


def diffusers_shapes_to_native(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """The few native names `infer_config` needs, from diffusers names (encoder blocks are numbered alike)."""
    out = {}
    for k, s in shapes.items():
        if k == "encoder.conv_in.weight":
            out["encoder.conv1.weight"] = s
        elif k == "post_quant_conv.weight":
            out["conv2.weight"] = s
        elif k.startswith("encoder.down_blocks."):
            k = k.replace("encoder.down_blocks.", "encoder.downsamples.").replace(".conv1.", ".residual.2.")
            out[k] = s
    return out


# ----------------------------------------------------------------------------------------------------------------
# Layers (channels-last activations)


def _precision(dtype) -> lax.Precision:
    # fp32 compute is meant to be exact (no TF32 on GPUs); bf16 uses the fast default
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma, in float32."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5) * gamma.astype(jnp.float32)
    return y.astype(x.dtype)


def _conv3d(x: jax.Array, w: jax.Array, b: jax.Array, stride=(1, 1, 1), pad_hw: int = 0) -> jax.Array:
    """x (B,T,H,W,Ci) * w (kT,kH,kW,Ci,Co), no time padding (the caller prepends the past)."""
    y = lax.conv_general_dilated(
        x,
        w,
        stride,
        [(0, 0), (pad_hw, pad_hw), (pad_hw, pad_hw)],
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=_precision(x.dtype),
    )
    return y + b


def _conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding) -> jax.Array:
    """Per-frame 2-D conv: x (B,T,H,W,Ci), w (kH,kW,Ci,Co)."""
    t = x.shape[1]
    y = lax.conv_general_dilated(
        einops.rearrange(x, "b t h w c -> (b t) h w c"),
        w,
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_precision(x.dtype),
    )
    return einops.rearrange(y + b, "(b t) h w c -> b t h w c", t=t)


class _Caches:
    """The causal caches of one chunk: read in layer order from the previous chunk's list, written in order.

    `previous is None` is the first chunk: causal convs see zeros as their past.
    """

    def __init__(self, previous: list | None):
        self.previous, self.new = previous, []

    def take(self, like: jax.Array, frames: int) -> jax.Array:
        if self.previous is None:
            return jnp.zeros((like.shape[0], frames, *like.shape[2:]), like.dtype)
        return self.previous[len(self.new)]

    def put(self, cache: jax.Array) -> None:
        self.new.append(cache)


def _causal_conv(p, name: str, x: jax.Array, caches: _Caches) -> jax.Array:
    """3x3x3 causal conv: the last 2 frames of this conv's previous input are its past."""
    xc = jnp.concatenate([caches.take(x, 2), x], axis=1)
    caches.put(xc[:, -2:])
    return _conv3d(xc, p[f"{name}.weight"], p[f"{name}.bias"], pad_hw=1)


def _pointwise(p, name: str, x: jax.Array) -> jax.Array:
    return (
        jnp.einsum("bthwi,io->bthwo", x, p[f"{name}.weight"].reshape(x.shape[-1], -1), precision=_precision(x.dtype))
        + p[f"{name}.bias"]
    )


def _res_block(p, prefix: str, x: jax.Array, caches: _Caches) -> jax.Array:
    h = _pointwise(p, f"{prefix}.shortcut", x) if f"{prefix}.shortcut.weight" in p else x
    x = _causal_conv(p, f"{prefix}.residual.2", jax.nn.silu(_rms_norm(x, p[f"{prefix}.residual.0.gamma"])), caches)
    x = _causal_conv(p, f"{prefix}.residual.6", jax.nn.silu(_rms_norm(x, p[f"{prefix}.residual.3.gamma"])), caches)
    return x + h


def _attention_block(p, prefix: str, x: jax.Array) -> jax.Array:
    """Single-head self-attention over the H*W pixels of each frame."""
    b, t, hh, ww, c = x.shape
    y = _rms_norm(x, p[f"{prefix}.norm.gamma"])
    qkv = (
        jnp.einsum("bthwi,io->bthwo", y, p[f"{prefix}.to_qkv.weight"].reshape(c, 3 * c), precision=_precision(x.dtype))
        + p[f"{prefix}.to_qkv.bias"]
    )
    q, k, v = jnp.split(einops.rearrange(qkv, "b t h w c -> (b t) (h w) c"), 3, axis=-1)
    s = jnp.einsum("nqc,nkc->nqk", q, k, precision=_precision(x.dtype), preferred_element_type=jnp.float32) * (c**-0.5)
    a = jax.nn.softmax(s, axis=-1).astype(x.dtype)
    o = jnp.einsum("nqk,nkc->nqc", a, v, precision=_precision(x.dtype))
    o = einops.rearrange(o, "(b t) (h w) c -> b t h w c", b=b, h=hh)
    o = (
        jnp.einsum("bthwi,io->bthwo", o, p[f"{prefix}.proj.weight"].reshape(c, c), precision=_precision(x.dtype))
        + p[f"{prefix}.proj.bias"]
    )
    return o + x


def _middle(p, prefix: str, x: jax.Array, caches: _Caches) -> jax.Array:
    x = _res_block(p, f"{prefix}.middle.0", x, caches)
    x = _attention_block(p, f"{prefix}.middle.1", x)
    return _res_block(p, f"{prefix}.middle.2", x, caches)


def _downsample(p, prefix: str, x: jax.Array, temporal: bool, caches: _Caches) -> jax.Array:
    """Zero-pad right/bottom, 3x3 stride-2 conv per frame; then (3d) the stride-2 causal time conv."""
    x = _conv2d(x, p[f"{prefix}.resample.1.weight"], p[f"{prefix}.resample.1.bias"], 2, [(0, 1), (0, 1)])
    if not temporal:
        return x
    if caches.previous is None:  # first chunk: frame 0 passes through, it becomes the past
        caches.put(x[:, -1:])
        return x
    xc = jnp.concatenate([caches.take(x, 1), x], axis=1)
    caches.put(x[:, -1:])
    return _conv3d(xc, p[f"{prefix}.time_conv.weight"], p[f"{prefix}.time_conv.bias"], stride=(2, 1, 1))


def _upsample(p, prefix: str, x: jax.Array, temporal: bool, caches: _Caches) -> jax.Array:
    """(3d, not on the first latent frame) causal time conv to 2C channels = 2 frames; then nearest x2 and a
    3x3 conv per frame (to C/2 channels)."""
    if temporal:
        if caches.previous is None:  # first latent frame: no time conv; the past starts from zeros
            caches.put(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))
        else:
            xc = jnp.concatenate([caches.take(x, 2), x], axis=1)
            caches.put(xc[:, -2:])
            y = _conv3d(xc, p[f"{prefix}.time_conv.weight"], p[f"{prefix}.time_conv.bias"])
            x = einops.rearrange(y, "b t h w (two c) -> b (t two) h w c", two=2)
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return _conv2d(x, p[f"{prefix}.resample.1.weight"], p[f"{prefix}.resample.1.bias"], 1, [(1, 1), (1, 1)])


def _encoder_chunk(cfg: WanVAEConfig, p, x: jax.Array, previous: list | None) -> tuple[jax.Array, list]:
    """One chunk (B,t,H,W,3) -> (B,t',H/8,W/8,2z) after `conv1` (the quant conv), and the new caches."""
    caches = _Caches(previous)
    x = _causal_conv(p, "encoder.conv1", x, caches)
    for kind, prefix, _, _ in encoder_plan(cfg):
        if kind == "res":
            x = _res_block(p, prefix, x, caches)
        else:
            x = _downsample(p, prefix, x, kind == "down3d", caches)
    x = _middle(p, "encoder", x, caches)
    x = _causal_conv(p, "encoder.head.2", jax.nn.silu(_rms_norm(x, p["encoder.head.0.gamma"])), caches)
    return _pointwise(p, "conv1", x), caches.new


def _decoder_chunk(cfg: WanVAEConfig, p, z: jax.Array, previous: list | None) -> tuple[jax.Array, list]:
    """One latent frame (B,1,h,w,z) (after `conv2`) -> pixels (B,1 or 4,8h,8w,3), and the new caches."""
    caches = _Caches(previous)
    x = _causal_conv(p, "decoder.conv1", z, caches)
    x = _middle(p, "decoder", x, caches)
    for kind, prefix, _, _ in decoder_plan(cfg):
        if kind == "res":
            x = _res_block(p, prefix, x, caches)
        else:
            x = _upsample(p, prefix, x, kind == "up3d", caches)
    x = _causal_conv(p, "decoder.head.2", jax.nn.silu(_rms_norm(x, p["decoder.head.0.gamma"])), caches)
    return x, caches.new


def _cast(params: Mapping[str, jax.Array], dtype) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v).astype(dtype) for k, v in params.items()}


def encode_moments(
    cfg: WanVAEConfig, params: Mapping[str, jax.Array], video_bthwc: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """Pixels (B, T=1+4k, H, W, 3) in [-1, 1] -> (mu, log_var) stacked on channels: (B, 1+k, H/8, W/8, 2z) float32.

    Frame 0 alone, then a `lax.scan` over the k chunks of 4 frames with the causal caches as carry.
    """
    p = _cast(params, dtype)
    x = video_bthwc.astype(dtype)
    first, caches = _encoder_chunk(cfg, p, x[:, :1], None)
    if x.shape[1] == 1:
        return first.astype(jnp.float32)
    chunks = einops.rearrange(x[:, 1:], "b (n f) h w c -> n b f h w c", f=ENC_CHUNK)

    def step(carry, chunk):
        y, carry = _encoder_chunk(cfg, p, chunk, carry)
        return carry, y

    _, rest = lax.scan(step, caches, chunks)
    rest = einops.rearrange(rest, "n b f h w c -> b (n f) h w c")
    return jnp.concatenate([first, rest], axis=1).astype(jnp.float32)


def decode_pixels(
    cfg: WanVAEConfig, params: Mapping[str, jax.Array], mu_bthwc: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """Un-normalised latents (B, T_lat, h, w, z) -> pixels (B, 1+4(T_lat-1), 8h, 8w, 3) float32, not clamped.

    `conv2`, then latent frame 0 alone and a `lax.scan` over the others with the causal caches as carry.
    """
    p = _cast(params, dtype)
    z = _pointwise(p, "conv2", mu_bthwc.astype(dtype))
    first, caches = _decoder_chunk(cfg, p, z[:, :1], None)
    if z.shape[1] == 1:
        return first.astype(jnp.float32)

    def step(carry, frame):
        y, carry = _decoder_chunk(cfg, p, frame[:, None], carry)
        return carry, y

    _, rest = lax.scan(step, caches, jnp.moveaxis(z[:, 1:], 1, 0))
    rest = einops.rearrange(rest, "n b f h w c -> b (n f) h w c")
    return jnp.concatenate([first, rest], axis=1).astype(jnp.float32)


def init_params(cfg: WanVAEConfig, key: jax.Array, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random params (JAX layouts, float32) for tests: fan-in scaled normal weights, small biases, gammas ~1."""
    shapes = param_shapes(cfg)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    noise = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))  # one draw, sliced: fast on CPU
    params, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        v = noise[start : start + size].reshape(shape)
        start += size
        if name.endswith("gamma"):
            v = 1.0 + 0.1 * v
        elif name.endswith("bias"):
            v = 0.05 * v
        else:
            v = scale * v / np.sqrt(size // shape[0])
        params[name] = v.astype(np.float32)
    return from_torch(params, cfg)
