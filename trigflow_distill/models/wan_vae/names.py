"""The Wan2.1 VAE checkpoint format (docs/algorithm.md §10): architecture config, native tensor names and shapes.

`param_shapes` lists the native Wan state dict (`encoder.conv1.weight`, ...) in torch layouts; `infer_config` /
`check_state_dict` read and validate a checkpoint from its shapes; `from_torch` / `to_torch` convert a native
torch-layout state dict (numpy) to the JAX layouts of `wan_vae` both ways bit-exactly: 3-D conv kernels
(kT, kH, kW, in, out), 2-D conv kernels (kH, kW, in, out), RMS-norm gammas (C,), biases (C,);
`native_to_diffusers` / `diffusers_to_native` rename between the native and diffusers `AutoencoderKLWan` names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np


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


# Sane limits of what the tensor shapes and names imply, checked before the parameter shapes are built from them
# (release: dim 96, z_dim 16, 4 levels, 2 residual blocks per level): a damaged name or header is an error naming the
# size, not an out-of-memory kill.
CONFIG_LIMITS = {"dim": 4096, "z_dim": 1024, "levels": 16, "num_res_blocks": 64, "dim_mult": 64}


def _check_limits(**values) -> None:
    for name, value in values.items():
        if not 1 <= value <= CONFIG_LIMITS[name]:
            raise ValueError(
                f"{name} = {value} (from the tensor shapes and names) is out of range (1..{CONFIG_LIMITS[name]}); "
                "the file is damaged or not a Wan2.1 VAE"
            )


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
    _check_limits(dim=dim, z_dim=z_dim, num_res_blocks=num_res, levels=levels)
    mult = []
    for level in range(levels):
        key = f"encoder.downsamples.{level * (num_res + 1)}.residual.2.weight"
        if key not in shapes:
            raise ValueError(f"not a Wan2.1 VAE state dict: missing {key}")
        mult.append(int(shapes[key][0]) // dim)
        _check_limits(dim_mult=mult[-1])
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


# Wan2.1 VAE per-channel statistics (docs/algorithm.md §9): normalised latents are (mu - mean) / std.
LATENT_MEAN = np.array(
    [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    np.float32,
)


LATENT_STD = np.array(
    [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ],
    np.float32,
)


def check_frame_count(frames: int, what: str = "--frames") -> int:
    """`frames` if the VAE can encode it (1 + 4k: frame 0 alone, then chunks of 4, §10), else ValueError naming the
    nearest valid counts; the one frame-count check of prepare, generate, the plan and the VAE CLI."""
    if frames >= 1 and (frames - 1) % 4 == 0:
        return frames
    below = 1 + max(frames - 1, 0) // 4 * 4
    nearest = f"{below} or {below + 4}" if frames > 1 else "1 or 5"
    raise ValueError(f"{what} {frames}: the Wan2.1 VAE needs 1 + 4k frames (nearest: {nearest})")
