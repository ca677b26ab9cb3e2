"""3-D rotary position embedding of the Wan2.1 DiT: head channels taken as complex pairs, split over (t, h, w).

Wan rotates interleaved pairs (x[2k], x[2k+1]) of each head by position-dependent angles. Of the head_dim / 2 pairs,
h and w get head_dim // 6 each and t the rest (head_dim 128: 22 : 21 : 21 pairs), each axis with its own frequencies
theta^(-2k / dim_axis) over its own dim_axis = 2 * pairs channels, positions counted from 0 on the patch grid.
"""

from __future__ import annotations

import einops
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(dim_t, dim_h, dim_w) real channels of a head given to time, height and width (128 -> 44:42:42)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim {head_dim} cannot be split for Wan's 3D RoPE (needs an even head_dim >= 6)")
    dim_hw = 2 * (head_dim // 6)
    return head_dim - 2 * dim_hw, dim_hw, dim_hw


def _axis_table(dim: int, size: int, theta: float) -> np.ndarray:
    """Angles (size, dim / 2) of one axis, float64: tables are small, so they are built exactly on the host."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]


def rope_cos_sin(head_dim: int, t: int, h: int, w: int, theta: float = 10000.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape (t, h * w, head_dim / 2), float32, one angle per complex pair, tokens (h, w) row-major.

    Only the per-axis tables ((t + h + w) x pairs) are constants; the broadcast to every token happens in the program.
    """
    parts_cos, parts_sin = [], []
    for axis, (dim, size) in enumerate(zip(rope_split(head_dim), (t, h, w))):
        ang = _axis_table(dim, size, theta)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        for parts, table in ((parts_cos, np.cos(ang)), (parts_sin, np.sin(ang))):
            parts.append(jnp.broadcast_to(jnp.asarray(table, jnp.float32).reshape(shape), (t, h, w, dim // 2)))
    cos, sin = (jnp.concatenate(p, axis=-1).reshape(t, h * w, head_dim // 2) for p in (parts_cos, parts_sin))
    return cos, sin


def apply_rope(x_btsnd: jnp.ndarray, cos_tsk: jnp.ndarray, sin_tsk: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by the angles of their token, in float32 (complex multiply)."""
    x = x_btsnd.astype(jnp.float32)
    re, im = einops.rearrange(x, "... (k two) -> two ... k", two=2)
    cos, sin = cos_tsk[None, :, :, None, :], sin_tsk[None, :, :, None, :]
    return einops.rearrange([re * cos - im * sin, re * sin + im * cos], "two ... k -> ... (k two)")
