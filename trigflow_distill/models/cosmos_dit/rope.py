"""3D rotary position embedding of the Cosmos DiT (docs/algorithm.md §8.3) and the sinusoidal timestep features
(§8.2)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(dim_t, dim_h, dim_w) channels of a head given to time, height and width (128 -> 44:42:42)."""
    dim_h = 2 * (head_dim // 6)
    dim_t = head_dim - 2 * dim_h
    if dim_h <= 2 or dim_t <= 2 or dim_t % 2:
        raise ValueError(f"head_dim {head_dim} cannot be split for 3D RoPE (needs an even head_dim >= 12)")
    return dim_t, dim_h, dim_h


def _inv_freqs(dim: int, ratio: float) -> np.ndarray:
    """theta^(-(0, 2, ..., dim-2)/dim) with the NTK-extrapolated base theta = 1e4 * ratio^(dim/(dim-2))."""
    theta = 10000.0 * ratio ** (dim / (dim - 2))
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_cos_sin(
    head_dim: int, t: int, h: int, w: int, ratios_thw: tuple[float, float, float]
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape (t*h*w, head_dim), float32, tokens in (t, h, w) row-major order.

    Angles are built from iota inside the traced program (not as numpy constants) so that long videos do not
    embed megabytes of constants in the compiled program.
    """
    dims = rope_split(head_dim)
    sizes = (t, h, w)
    parts = []
    for axis, (dim, size, ratio) in enumerate(zip(dims, sizes, ratios_thw)):
        freqs = jnp.asarray(_inv_freqs(dim, ratio), jnp.float32)
        ang = jnp.arange(size, dtype=jnp.float32)[:, None] * freqs[None, :]  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        parts.append(jnp.broadcast_to(ang.reshape(shape), (t, h, w, dim // 2)))
    ang_lf = jnp.concatenate(parts, axis=-1).reshape(t * h * w, head_dim // 2)
    ang_ld = jnp.concatenate([ang_lf, ang_lf], axis=-1)
    return jnp.cos(ang_ld), jnp.sin(ang_ld)


def apply_rope(x_blnd: jnp.ndarray, cos_ld: jnp.ndarray, sin_ld: jnp.ndarray) -> jnp.ndarray:
    """Non-interleaved rotate-half RoPE in float32: y = x cos + concat(-x2, x1) sin."""
    x = x_blnd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos_ld[None, :, None, :] + rotated * sin_ld[None, :, None, :]


def timestep_features(t_bt: jnp.ndarray, dim: int) -> jnp.ndarray:
    """[cos(t f), sin(t f)] with f_k = exp(-ln(1e4) k / (dim/2)), k < dim/2; float32, shape t_bt.shape + (dim,)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = t_bt.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
