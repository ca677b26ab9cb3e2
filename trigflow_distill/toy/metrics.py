"""Analytic evaluator of the toy world: blob fit per frame, signature fit per clip, and the issue-5 metrics.

analyse() fits each clip with the world's own model: a rank-1 channel signature (top eigenvector of X X^T over all
pixels) and, per frame, a Gaussian blob of the world's sigma (amplitude, h, w) by damped Gauss-Newton on the
signature-projected map. metrics() turns that into prompt/motion accuracy, amplitude and diversity ratios to held-out
real data, conditional-frame consistency and two Frechet distances (hand features; a fixed random projection).
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

from trigflow_distill import toy

_GN_ITERS = 30


def _fit_blobs(world: toy.World, maps_fhw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares Gaussian blob (known sigma) per map: returns amplitude (F,) and position (F,2) in (h,w)."""
    c = world.config
    f = maps_fhw.shape[0]
    flat = maps_fhw.reshape(f, -1)
    peak = np.argmax(flat, axis=1)
    pos = np.stack([peak // c.width, peak % c.width], axis=-1).astype(np.float64)
    amp = np.maximum(flat[np.arange(f), peak], 1e-6)
    hh = np.arange(c.height, dtype=np.float64)[None, :, None]
    ww = np.arange(c.width, dtype=np.float64)[None, None, :]
    inv_var = 1.0 / c.blob_sigma**2
    for _ in range(_GN_ITERS):
        g = toy.render_blobs(world, pos[:, None])[:, 0]  # (F,H,W)
        dh, dw = hh - pos[:, 0, None, None], ww - pos[:, 1, None, None]
        jac = np.stack([g, amp[:, None, None] * g * dh * inv_var, amp[:, None, None] * g * dw * inv_var], -1)
        jac = jac.reshape(f, -1, 3)
        resid = flat - amp[:, None] * g.reshape(f, -1)
        jtj = np.einsum("fpi,fpj->fij", jac, jac)
        # Levenberg-Marquardt damping keeps every step finite, also on maps without a blob (e.g. pure noise).
        jtj = jtj + (1e-3 * np.einsum("fii->fi", jtj) + 1e-9)[:, :, None] * np.eye(3)
        step = np.linalg.solve(jtj, np.einsum("fpi,fp->fi", jac, resid)[..., None])[..., 0]
        amp = np.maximum(amp + step[:, 0], 1e-6)
        pos = np.clip(pos + step[:, 1:], -1.0, np.array([c.height, c.width], np.float64))
    return amp, pos


def analyse(world: toy.World, latents_bcthw) -> dict:
    """Fits the world's model to each clip.

    Returns signature (B,C) unit (sign: blob positive), signature_cos (B,K) = s_hat . s_k, prompt (B,) argmax,
    amplitude_t (B,T) and amplitude (B,) in blob units (latents / scale), positions (B,T,2) (h,w px),
    velocity (B,2) (least-squares slope of the track, px/frame) and direction (B,) = nearest k of the velocity angle.
    """
    c = world.config
    x = toy.check_latents(world, latents_bcthw) / world.scale
    x_bcp = rearrange(x, "b c t h w -> b c (t h w)")
    _, vecs = np.linalg.eigh(np.einsum("bcp,bdp->bcd", x_bcp, x_bcp))
    sig = vecs[:, :, -1]
    sign = np.where(np.einsum("bc,bcp->b", sig, x_bcp) < 0, -1.0, 1.0)
    sig = sig * sign[:, None]
    maps = np.einsum("bc,bcthw->bthw", sig, x)
    amp, pos = _fit_blobs(world, rearrange(maps, "b t h w -> (b t) h w"))
    amp_bt = rearrange(amp, "(b t) -> b t", t=c.frames)
    pos_bt2 = rearrange(pos, "(b t) i -> b t i", t=c.frames)
    t = np.arange(c.frames) - (c.frames - 1) / 2
    velocity = np.einsum("t,bti->bi", t, pos_bt2) / max(np.sum(t * t), 1e-12)
    step = 2 * np.pi / c.num_prompts
    direction = np.round(np.arctan2(velocity[:, 0], velocity[:, 1]) / step).astype(np.int64) % c.num_prompts
    cos = sig @ world.signatures.T
    return dict(
        signature=sig,
        signature_cos=cos,
        prompt=np.argmax(cos, axis=1),
        amplitude_t=amp_bt,
        amplitude=amp_bt.mean(axis=1),
        positions=pos_bt2,
        velocity=velocity,
        direction=direction,
    )


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N,D), (M,D)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two (N>=2, D) feature arrays of equal D, got {a.shape}, {b.shape}.")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2), whose argument is symmetric PSD.
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def hand_features(analysis: dict) -> np.ndarray:
    """(B, 2T + T + K): centroid track (h,w per frame), per-frame amplitude, signature cosines."""
    return np.concatenate(
        [rearrange(analysis["positions"], "b t i -> b (t i)"), analysis["amplitude_t"], analysis["signature_cos"]],
        axis=1,
    )


def projection_features(world: toy.World, latents_bcthw, dim: int = 64) -> np.ndarray:
    """(B, dim): flattened latents through a fixed Gaussian projection (seeded by the world), variance-preserving."""
    x = rearrange(toy.check_latents(world, latents_bcthw), "b c t h w -> b (c t h w)")
    rng = np.random.default_rng(np.random.SeedSequence([world.config.seed, toy.STREAM_PROJECTION, dim]))
    proj = rng.standard_normal((x.shape[1], dim)) / np.sqrt(x.shape[1])
    return x @ proj


def _start_spread(analysis: dict, prompts: np.ndarray, num_prompts: int) -> np.ndarray:
    """(K,) RMS distance of frame-0 positions from their prompt mean; NaN for prompts with < 2 samples."""
    out = np.full(num_prompts, np.nan)
    start = analysis["positions"][:, 0]
    for k in range(num_prompts):
        s = start[prompts == k]
        if len(s) >= 2:
            out[k] = np.sqrt(np.mean(np.sum(np.square(s - s.mean(0)), axis=1)))
    return out


def cond_consistency(
    world: toy.World, analysis: dict, prompts, num_cond_frames, cond_analysis: dict | None = None, tol: float = 0.5
) -> float:
    """Fraction of samples with N>=1 conditional frames whose first generated frame N lies within `tol` px of the
    last conditional frame's centroid moved one step along prompt k's direction; NaN if no sample has N>=1."""
    n_cond = np.asarray(num_cond_frames)
    prompts = np.asarray(prompts)
    cond = analysis if cond_analysis is None else cond_analysis
    sel = np.flatnonzero((n_cond >= 1) & (n_cond < world.config.frames))
    if len(sel) == 0:
        return float("nan")
    last = cond["positions"][sel, n_cond[sel] - 1]
    expected = last + world.velocities[prompts[sel]]
    err = np.linalg.norm(analysis["positions"][sel, n_cond[sel]] - expected, axis=1)
    return float(np.mean(err < tol))


def metrics(
    world: toy.World,
    latents_bcthw,
    prompts,
    reference: dict | None = None,
    cond_latents=None,
    num_cond_frames=None,
    tol: float = 0.5,
) -> dict:
    """Issue-5 metrics of generated clips (B,C,T,H,W) made for `prompts` (B,).

    reference: held-out real data as returned by toy.sample_videos (keys latents, prompt); default
    toy.reference_set(world). cond_latents (B,C,T,H,W) / num_cond_frames (B,): the ground truth and N of
    Video2World samples (cond_consistency is NaN without them or without any N>=1; cond_latents defaults to the
    samples themselves, whose first N frames are the conditioning).
    """
    prompts = np.asarray(prompts)
    x = toy.check_latents(world, latents_bcthw)
    if prompts.shape != (len(x),):
        raise ValueError(f"prompts must have shape ({len(x)},) matching the latents, got {prompts.shape}.")
    ref = toy.reference_set(world) if reference is None else reference
    a, a_ref = analyse(world, x), analyse(world, ref["latents"])
    k = world.config.num_prompts
    spread, spread_ref = _start_spread(a, prompts, k), _start_spread(a_ref, np.asarray(ref["prompt"]), k)
    both = ~np.isnan(spread) & ~np.isnan(spread_ref)
    feats, feats_ref = hand_features(a), hand_features(a_ref)
    # Standardise hand features by the real data so px, amplitudes and cosines weigh alike.
    mu, sd = feats_ref.mean(0), feats_ref.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    if num_cond_frames is None:
        consistency = float("nan")
    else:
        cond_a = None if cond_latents is None else analyse(world, cond_latents)
        consistency = cond_consistency(world, a, prompts, num_cond_frames, cond_a, tol)
    return {
        "prompt_accuracy": float(np.mean(a["prompt"] == prompts)),
        "motion_accuracy": float(np.mean(a["direction"] == prompts)),
        "amplitude_ratio": float(a["amplitude"].mean() / a_ref["amplitude"].mean()),
        "diversity": float(spread[both].mean() / spread_ref[both].mean()) if both.any() else float("nan"),
        "fd_hand": frechet_distance((feats - mu) / sd, (feats_ref - mu) / sd),
        "fd_proj": frechet_distance(projection_features(world, x), projection_features(world, ref["latents"])),
        "cond_consistency": consistency,
    }


def real_floor(world: toy.World, n: int = 1024, seed: int = 7, reference: dict | None = None) -> dict:
    """Metrics of n fresh real clips (stream `seed`) against the held-out reference: the floor of every metric."""
    real = toy.sample_videos(world, seed, n)
    return metrics(world, real["latents"], real["prompt"], reference=reference, num_cond_frames=real["num_cond_frames"])
