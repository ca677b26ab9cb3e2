"""The Wan2.1 VAE (the latent space of Cosmos Predict2.5, docs/algorithm.md §10) as pure JAX functions.

Parameters are a flat dict keyed by the native Wan state-dict names (`encoder.conv1.weight`, ...), in JAX layouts.
The checkpoint format (config, native names and shapes, torch <-> JAX layouts, native <-> diffusers names) is
`wan_vae_state_dict`; its public names are re-exported here so `wan_vae` stays the one entry point.

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

from collections.abc import Mapping

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from trigflow_distill.models.wan_vae.names import WanVAEConfig, decoder_plan, encoder_plan, from_torch, param_shapes

ENC_CHUNK = 4  # pixel frames per encoder chunk after the first frame

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
