"""Optimizer and EMA (docs/algorithm.md §6): non-finite -> 0, global-norm clip, AdamW with warm-up/decay; power EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def lr_multiplier(n, warmup=100, max_steps=400000):
    """LR factor after n updates of this net: 1e-6 -> 0.99 linearly over `warmup`, then 0.99 -> 0.4 at max_steps.

    Held at 0.4 past max_steps.
    """
    if not 0 < warmup < max_steps:
        raise ValueError(f"need 0 < warmup < max_steps, got warmup={warmup}, max_steps={max_steps}")
    n = jnp.asarray(n, dtype=jnp.float32)
    warm = 1e-6 + (0.99 - 1e-6) * n / warmup
    decay = 0.4 + 0.59 * (max_steps - jnp.minimum(n, max_steps)) / (max_steps - warmup)
    return jnp.where(n < warmup, warm, decay)


def zero_nonfinite():
    """Gradient transformation that replaces NaN / inf entries by 0."""
    return optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), updates)
    )


def make_optimizer(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0, warmup=100, max_steps=400000):
    """optax chain: non-finite -> 0, clip to global norm `clip_norm`, AdamW at lr * lr_multiplier(update count).

    Weight decay is decoupled and applies to every parameter, scaled by the scheduled lr (as torch.optim.AdamW).
    """
    lr_multiplier(0, warmup, max_steps)  # validates the schedule arguments now rather than inside jit
    schedule = lambda count: lr * lr_multiplier(count, warmup, max_steps)
    return optax.chain(
        zero_nonfinite(),
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def ema_gamma(rate=0.1):
    """Power-EMA exponent: the largest real root of g^3 + 7 g^2 + (16 - rate^-2) g + (12 - rate^-2)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"EMA rate must be in (0, 1), got {rate}")
    c = rate**-2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


EMA_GAMMA = ema_gamma(0.1)


def ema_beta(n, gamma=EMA_GAMMA, start=0):
    """EMA decay of the update that follows n earlier ones: 0 if m < 1 else (1 - 1/(m+1))^(gamma+1), m = n - start.

    n counts the student updates *before* the current one (docs/algorithm.md §6, §13): the first update has
    n = 0 and beta = 0, so the EMA then equals the updated parameters. `start` > 0 delays the averaging: the EMA
    follows the student exactly for its first `start` + 1 updates and counts n from there (0 in the reference).
    """
    m = jnp.asarray(n, dtype=jnp.float32) - start
    return jnp.where(m < 1, 0.0, (1.0 - 1.0 / (jnp.maximum(m, 1.0) + 1.0)) ** (gamma + 1.0))


def ema_update(ema_params, params, n, gamma=EMA_GAMMA, start=0):
    """ema <- beta ema + (1 - beta) params with beta = ema_beta(n, gamma, start), leaf by leaf, keeping the EMA's
    dtypes.

    `params` are the student's parameters after its current update; n is the number of student updates done
    *before* that one (0 at the first update), see `ema_beta`.
    """
    beta = ema_beta(n, gamma, start)
    return jax.tree.map(lambda e, p: (beta * e + (1.0 - beta) * p).astype(e.dtype), ema_params, params)
