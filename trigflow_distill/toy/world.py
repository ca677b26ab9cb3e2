"""The toy video world (issue 5): one moving Gaussian blob per clip; the prompt sets its direction and channels.

A clip is a latent video x_bcthw of 16 channels x T=4 frames x 8x8. Prompt k of K=8 moves one Gaussian blob
(sigma ~1 px) by `speed` px/frame in direction k*45 degrees; its mid-clip position is uniform in the central region,
its amplitude uniform in a narrow range, and every pixel's channel vector is amplitude * blob * s_k with
s_k = normalize(shared + u_k). Small iid noise is added, and everything is multiplied by one constant `scale` (computed
once per world from a large fixed-seed sample) so the data has unit variance.

Coordinates: positions are (h, w) = (row, column) in pixel-centre units (0..H-1); direction k moves by
speed * (sin(k*pi/4), cos(k*pi/4)) per frame in (h, w).

All randomness comes from numpy SeedSequences keyed by explicit integers (world seed, stream id, seed[, index]),
so every array is a pure function of its seeds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from einops import rearrange
from etils import epath

from trigflow_distill.core.recipe import COND_FRAME_PROBS

# Independent random streams of one world (SeedSequence entropy [world seed, stream, ...]).
_STREAM_WORLD, _STREAM_SCALE, _STREAM_SAMPLES, _STREAM_RECORDS, STREAM_PROJECTION = 0, 1, 2, 3, 4
# Seed of the held-out real data used as the evaluation reference (training records use their own stream).
REFERENCE_SEED = 1_000_003


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Constants of the toy world. `text_width` must equal the tiny DiT's `crossattn_proj_in_channels`."""

    seed: int = 0
    channels: int = 16
    frames: int = 4
    height: int = 8
    width: int = 8
    num_prompts: int = 8
    blob_sigma: float = 1.0
    speed: float = 1.0
    center_halfwidth: float = 1.5  # mid-clip position uniform in centre +- this (px, per axis)
    amplitude_range: tuple[float, float] = (0.8, 1.2)
    noise_std: float = 0.02  # iid noise, in blob-amplitude units (before `scale`)
    text_tokens: int = 8
    text_width: int = 96
    cond_frame_probs: tuple[float, ...] = COND_FRAME_PROBS  # P(N = 0, 1, 2 conditional frames), docs/algorithm.md §7
    scale_samples: int = 4096  # clips in the fixed-seed sample that sets `scale`

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"WorldConfig.seed must be >= 0, got {self.seed}.")
        for name in (
            "channels",
            "frames",
            "height",
            "width",
            "num_prompts",
            "text_tokens",
            "text_width",
            "scale_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.blob_sigma <= 0 or self.noise_std < 0:
            raise ValueError("WorldConfig needs blob_sigma > 0 and noise_std >= 0.")
        lo, hi = self.amplitude_range
        if not 0 < lo <= hi:
            raise ValueError(f"WorldConfig.amplitude_range must satisfy 0 < lo <= hi, got {self.amplitude_range}.")
        p = np.asarray(self.cond_frame_probs, np.float64)
        if p.ndim != 1 or len(p) > self.frames or np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
            raise ValueError(
                f"WorldConfig.cond_frame_probs must be probabilities of N = 0..len-1 conditional frames "
                f"(len <= frames={self.frames}) summing to 1, got {self.cond_frame_probs}."
            )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (self.channels, self.frames, self.height, self.width)


@dataclasses.dataclass(frozen=True, eq=False)
class World:
    """Fixed arrays of a world (read-only): signatures (K,C) unit rows, shared (C,), velocities (K,2) px/frame in
    (h,w), text (K,L,Ctext) raw prompt embeddings, uncond_text (L,Ctext) zeros, scale (latents = scale * raw)."""

    config: WorldConfig
    shared: np.ndarray
    signatures: np.ndarray
    velocities: np.ndarray
    text: np.ndarray
    uncond_text: np.ndarray
    scale: float


def _rng(config: WorldConfig, stream: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, stream, *ids]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_world(config: WorldConfig = WorldConfig()) -> World:
    """Builds the fixed arrays of the world `config` describes (deterministic in config.seed)."""
    rng = _rng(config, _STREAM_WORLD)
    shared = _unit(rng.standard_normal(config.channels))
    u = _unit(rng.standard_normal((config.num_prompts, config.channels)))
    signatures = _unit(shared[None] + u)
    angles = np.arange(config.num_prompts) * (2 * np.pi / config.num_prompts)
    velocities = config.speed * np.stack([np.sin(angles), np.cos(angles)], axis=-1)
    # Like the real per-token normalised embeddings: zero mean, unit variance over each token's width.
    text = rng.standard_normal((config.num_prompts, config.text_tokens, config.text_width))
    text = (text - text.mean(-1, keepdims=True)) / text.std(-1, keepdims=True)
    world = World(
        config=config,
        shared=shared,
        signatures=signatures,
        velocities=velocities,
        text=text.astype(np.float32),
        uncond_text=np.zeros(text.shape[1:], np.float32),
        scale=1.0,
    )
    world = dataclasses.replace(world, scale=_unit_variance_scale(world))
    for a in (world.shared, world.signatures, world.velocities, world.text, world.uncond_text):
        a.flags.writeable = False
    return world


def _unit_variance_scale(world: World, chunk: int = 512) -> float:
    """1 / std of all raw latent values over a fixed-seed sample of config.scale_samples clips."""
    rng = _rng(world.config, _STREAM_SCALE)
    total, total_sq, count = 0.0, 0.0, 0
    remaining = world.config.scale_samples
    while remaining > 0:
        n = min(chunk, remaining)
        raw = _draw(world, rng, n, None)["raw"]
        total, total_sq, count = total + raw.sum(), total_sq + np.square(raw).sum(), count + raw.size
        remaining -= n
    mean = total / count
    return float(1.0 / np.sqrt(total_sq / count - mean * mean))


def render_blobs(world: World, positions_bt2: np.ndarray) -> np.ndarray:
    """Unit-amplitude Gaussian blobs g_bthw at positions (B,T,2) in (h,w), sampled at pixel centres."""
    c = world.config
    hh = np.arange(c.height, dtype=np.float64)[:, None]
    ww = np.arange(c.width, dtype=np.float64)[None, :]
    dh = hh - positions_bt2[..., 0, None, None]
    dw = ww - positions_bt2[..., 1, None, None]
    return np.exp(-(dh * dh + dw * dw) / (2 * c.blob_sigma**2))


def _draw(world: World, rng: np.random.Generator, n: int, prompts) -> dict:
    """Draws n clips in a fixed order of random draws; returns raw (unscaled, float64) latents and parameters."""
    c = world.config
    if prompts is None:
        prompts = rng.integers(0, c.num_prompts, size=n)
    prompts = np.asarray(prompts)
    if prompts.shape != (n,) or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be an integer array of shape ({n},), got {prompts.dtype} {prompts.shape}.")
    if np.any(prompts < 0) or np.any(prompts >= c.num_prompts):
        raise ValueError(f"prompts must lie in [0, {c.num_prompts}), got values {np.unique(prompts)}.")
    centre = np.array([(c.height - 1) / 2, (c.width - 1) / 2])
    mid = centre + rng.uniform(-c.center_halfwidth, c.center_halfwidth, size=(n, 2))
    amplitude = rng.uniform(*c.amplitude_range, size=n)
    num_cond = rng.choice(len(c.cond_frame_probs), size=n, p=np.asarray(c.cond_frame_probs))
    noise = rng.standard_normal((n, *c.latent_shape))
    t_offset = np.arange(c.frames) - (c.frames - 1) / 2
    positions = mid[:, None, :] + t_offset[None, :, None] * world.velocities[prompts][:, None, :]
    blob = render_blobs(world, positions)
    raw = (
        amplitude[:, None, None, None, None] * world.signatures[prompts][:, :, None, None, None] * blob[:, None]
    ) + c.noise_std * noise
    return dict(
        raw=raw,
        prompt=prompts.astype(np.int32),
        positions=positions.astype(np.float32),
        amplitude=amplitude.astype(np.float32),
        num_cond_frames=num_cond.astype(np.int32),
    )


def sample_videos(world: World, seed: int, n: int, prompts=None) -> dict:
    """n real clips from the stream `seed` (uniform prompts unless `prompts` (n,) is given).

    Returns latents (n,C,T,H,W) f32 (unit variance), prompt (n,) int32, positions (n,T,2) f32 (h,w px),
    amplitude (n,) f32 (blob units, before `scale`), num_cond_frames (n,) int32, text (n,L,Ctext) f32.
    """
    if n < 1 or seed < 0:
        raise ValueError(f"sample_videos needs n >= 1 and seed >= 0, got n={n}, seed={seed}.")
    out = _draw(world, _rng(world.config, _STREAM_SAMPLES, seed), n, prompts)
    out["latents"] = (world.scale * out.pop("raw")).astype(np.float32)
    out["text"] = world.text[out["prompt"]]
    return out


def reference_set(world: World, n: int = 1024) -> dict:
    """Held-out real clips for evaluation (stream REFERENCE_SEED of sample_videos, never used for training)."""
    return sample_videos(world, REFERENCE_SEED, n)


class RecordSource:
    """Random-access source of training records for grain: record i is a pure function of (world, seed, i).

    Each record is {"latents": (C,T,H,W) f32, "text": (L,Ctext) f32, "num_cond_frames": () int32,
    "prompt": () int32}. The world is effectively infinite; `size` only sets len() for grain's shuffling.
    """

    def __init__(self, world: World, seed: int = 0, size: int = 2**20):
        if seed < 0 or size < 1:
            raise ValueError(f"RecordSource needs seed >= 0 and size >= 1, got seed={seed}, size={size}.")
        self.world, self.seed, self.size = world, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"record index {index} out of range [0, {self.size}).")
        d = _draw(self.world, _rng(self.world.config, _STREAM_RECORDS, self.seed, index), 1, None)
        prompt = d["prompt"][0]
        return {
            "latents": (self.world.scale * d["raw"][0]).astype(np.float32),
            "text": self.world.text[prompt],
            "num_cond_frames": d["num_cond_frames"][0],
            "prompt": prompt,
        }


# ----------------------------------------------------------------------------------------------------------------
# Pictures: a fixed 16->3 projection that sends signature s_k to hue k (amplitude 1 -> full colour), black = zero.


def colour_projection(world: World) -> np.ndarray:
    """P (3,C) with P @ s_k = colour of prompt k (evenly spaced hues), acting on latents / scale."""
    k = world.config.num_prompts
    hue = np.arange(k) / k
    # Saturated hue wheel: each RGB channel is a clipped triangle wave of the hue.
    rgb = np.clip(np.abs(((hue[:, None] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # (K,3)
    return rgb.T @ np.linalg.pinv(world.signatures.T)


def to_rgb(world: World, latents_bcthw: np.ndarray) -> np.ndarray:
    """uint8 frames (B,T,H,W,3) through the fixed colour projection."""
    x = check_latents(world, latents_bcthw) / world.scale
    rgb = np.einsum("rc,bcthw->bthwr", colour_projection(world), x)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def check_latents(world: World, latents) -> np.ndarray:
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 5 or x.shape[1:] != world.config.latent_shape:
        raise ValueError(
            f"latents must have shape (B, {', '.join(map(str, world.config.latent_shape))}) (B,C,T,H,W), got {x.shape}."
        )
    return x


def _select(world: World, prompts, per_prompt: int, n: int) -> np.ndarray:
    """(K, per_prompt) sample indices, the first samples of each prompt; -1 where a prompt has too few."""
    prompts = np.asarray(prompts)
    if prompts.shape != (n,):
        raise ValueError(f"prompts must have shape ({n},) matching the latents, got {prompts.shape}.")
    idx = -np.ones((world.config.num_prompts, per_prompt), np.int64)
    for k in range(world.config.num_prompts):
        found = np.flatnonzero(prompts == k)[:per_prompt]
        idx[k, : len(found)] = found
    return idx


def _tile(cells_rcHW3: np.ndarray, gap: int, group: int = 1) -> np.ndarray:
    """Tiles cells (R,C,h,w,3) into one image: `gap` grey pixels around every cell, 2*gap more after every `group`
    columns (to separate samples)."""
    r, c, h, w, _ = cells_rcHW3.shape
    xs = gap + np.arange(c) * (w + gap) + (np.arange(c) // group) * 2 * gap
    img = np.full((r * (h + gap) + gap, xs[-1] + w + gap, 3), 64, np.uint8)
    for i in range(r):
        for j in range(c):
            img[gap + i * (h + gap) : gap + i * (h + gap) + h, xs[j] : xs[j] + w] = cells_rcHW3[i, j]
    return img


def _cells(world: World, latents_bcthw, prompts, per_prompt: int, zoom: int) -> np.ndarray:
    """(K, per_prompt, T, H*zoom, W*zoom, 3) uint8 cells; missing samples are black."""
    rgb = to_rgb(world, latents_bcthw)
    idx = _select(world, prompts, per_prompt, len(rgb))
    cells = np.where((idx >= 0)[..., None, None, None, None], rgb[np.maximum(idx, 0)], 0).astype(np.uint8)
    return cells.repeat(zoom, axis=-3).repeat(zoom, axis=-2)


def grid_image(world: World, latents_bcthw, prompts, per_prompt: int = 4, zoom: int = 8, gap: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 grid: prompt k in row k, its first `per_prompt` samples' frames in columns."""
    cells = _cells(world, latents_bcthw, prompts, per_prompt, zoom)
    return _tile(rearrange(cells, "k s t h w r -> k (s t) h w r"), gap, group=cells.shape[2])


def save_grid_png(
    world: World, latents_bcthw, prompts, path: str, per_prompt: int = 4, zoom: int = 8, gap: int = 2
) -> tuple[int, int]:
    """The `grid_image` as a PNG at `path` (local or gs://). Returns (width, height)."""
    from PIL import Image

    img = grid_image(world, latents_bcthw, prompts, per_prompt, zoom, gap)
    with epath.Path(path).open("wb") as f:
        Image.fromarray(img).save(f, format="PNG")
    return img.shape[1], img.shape[0]


def save_gif(
    world: World,
    latents_bcthw,
    prompts,
    path: str,
    per_prompt: int = 4,
    zoom: int = 8,
    gap: int = 2,
    frame_ms: int = 250,
) -> tuple[int, int]:
    """Animated GIF over the T frames: prompt k in row k, its first `per_prompt` samples in columns."""
    from PIL import Image

    cells = _cells(world, latents_bcthw, prompts, per_prompt, zoom)
    frames = [Image.fromarray(_tile(cells[:, :, t], gap)) for t in range(cells.shape[2])]
    with epath.Path(path).open("wb") as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return frames[0].size
