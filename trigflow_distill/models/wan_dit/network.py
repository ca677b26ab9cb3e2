"""The Wan2.1 DiT (the release's `WanModel`, T2V and I2V) as pure JAX functions over a nested-dict parameter tree.

Layout of the tree: see `param_shapes`. Linear kernels are (in, out); the blocks are stacked on a leading
num_layers axis and the forward scans over them. The residual stream is float32, laid out (B, T', S, D) with the
S = H'W' tokens of each latent frame, so that a per-frame time (B, T') modulates each frame's tokens (the release
takes one time per video: (B,) is the same with every frame equal). In bfloat16 the matmul inputs are bf16 (fp32
accumulation); norms, softmax, RoPE, the time embedding, the modulation and the residual stream stay float32.

A block (the release's `WanAttentionBlock`), with (shift, scale, gate, c_shift, c_scale, c_gate) = the block's
own `modulation` (6, D) + time_projection(SiLU(e)):
  x += gate   * self_attn(LN(x) * (1 + scale) + shift)        q/k RMSNorm over all heads (D), 3-D RoPE
  x +=          cross_attn(norm3(x), text [, image])          norm3: affine LayerNorm (cross_attn_norm), no gate
  x += c_gate * ffn(LN(x) * (1 + c_scale) + c_shift)          GELU(tanh)
"""

from __future__ import annotations

import dataclasses
import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from trigflow_distill.models.cosmos_dit.attention import IMPLS, attention
from trigflow_distill.models.cosmos_dit.network import REMAT_POLICIES, run_blocks
from trigflow_distill.models.cosmos_dit.rope import timestep_features
from trigflow_distill.models.wan_dit.rope import apply_rope, rope_cos_sin, rope_split

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_IMAGE_LN_EPS = 1e-5  # img_emb's LayerNorms are torch defaults, not Wan's eps
_ATTN = ("q", "k", "v", "o")
_IMAGE_KV = ("k_img", "v_img")


@dataclasses.dataclass(frozen=True)
class WanDiTConfig:
    """Architecture (names as in the release's `WanModel` constructor) plus compute options."""

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    in_dim: int = 16  # I2V: 36 = noisy latents 16 + mask 4 + condition latents 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512  # the text context is zero-padded to this many tokens before text_embedding
    image_dim: int | None = None  # I2V: width of the CLIP image tokens (1280); None for T2V
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # The network's time input is timestep = num_train_timesteps x the RF time t in [0, 1] that `velocity` takes.
    num_train_timesteps: float = 1000.0
    dtype: str = "float32"
    remat: bool | str = False  # a REMAT_POLICIES name; True = "full", False = "none"
    attention: str = "auto"  # cosmos_dit.attention impl: auto (einsum on CPU, xla elsewhere), xla, einsum, blockwise
    attention_block_size: int = 512  # keys per step of the "blockwise" attention
    scan_blocks: bool = True  # lax.scan over the stacked blocks; False unrolls them

    def __post_init__(self):
        if self.num_heads <= 0 or self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        rope_split(self.head_dim)
        if (
            min(
                self.num_layers, self.ffn_dim, self.in_dim, self.out_dim, self.freq_dim, self.text_dim, *self.patch_size
            )
            < 1
        ):
            raise ValueError(f"sizes must be >= 1: {self}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even")
        if self.in_dim < self.out_dim:
            raise ValueError(f"in_dim {self.in_dim} < out_dim {self.out_dim}: the input holds the noisy latents")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use one of {sorted(_DTYPES)}")
        if self.attention not in IMPLS:
            raise ValueError(f"unknown attention impl {self.attention!r}; choose one of {IMPLS}")
        if not isinstance(self.remat, bool) and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not supported; use True/False or one of {sorted(REMAT_POLICIES)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return int(np.prod(self.patch_size))

    @property
    def cond_dim(self) -> int:
        """Extra input channels after the noisy latents (I2V: mask 4 + condition latents 16 = 20; T2V: 0)."""
        return self.in_dim - self.out_dim

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def remat_policy(self) -> str:
        if isinstance(self.remat, bool):
            return "full" if self.remat else "none"
        return self.remat


PRESETS = {
    "t2v_1_3b": WanDiTConfig(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960),
    "t2v_14b": WanDiTConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
    "i2v_14b": WanDiTConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, in_dim=36, image_dim=1280),
    # CPU tests: head_dim 16 (RoPE 8:4:4), narrow text / image widths.
    "tiny": WanDiTConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32),
    "tiny_i2v": WanDiTConfig(
        dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32, in_dim=36, image_dim=48
    ),
}


def get_preset(name: str, **overrides) -> WanDiTConfig:
    """A preset config with fields replaced by `overrides` (e.g. dtype="bfloat16", remat=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Wan DiT preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _linear(n_in, n_out, lead=()):
    return {"kernel": (*lead, n_in, n_out), "bias": (*lead, n_out)}


def param_shapes(config: WanDiTConfig) -> dict:
    """Nested dict of parameter shapes: the exact tree `init_params` builds and `velocity` reads."""
    d, n, f = config.dim, config.num_layers, config.ffn_dim
    attn = lambda keys: {k: _linear(d, d, (n,)) for k in keys}
    cross = {**attn(_ATTN), "norm_q": {"scale": (n, d)}, "norm_k": {"scale": (n, d)}}
    if config.image_dim is not None:
        cross.update(attn(_IMAGE_KV), norm_k_img={"scale": (n, d)})
    blocks = {
        "self_attn": {**attn(_ATTN), "norm_q": {"scale": (n, d)}, "norm_k": {"scale": (n, d)}},
        "cross_attn": cross,
        "ffn": {"linear_1": _linear(d, f, (n,)), "linear_2": _linear(f, d, (n,))},
        "modulation": (n, 6, d),
    }
    if config.cross_attn_norm:
        blocks["norm3"] = {"scale": (n, d), "bias": (n, d)}
    shapes = {
        "patch_embedding": _linear(config.in_dim * config.patch_volume, d),
        "text_embedding": {"linear_1": _linear(config.text_dim, d), "linear_2": _linear(d, d)},
        "time_embedding": {"linear_1": _linear(config.freq_dim, d), "linear_2": _linear(d, d)},
        "time_projection": _linear(d, 6 * d),
        "blocks": blocks,
        "head": {"linear": _linear(d, config.out_dim * config.patch_volume), "modulation": (2, d)},
    }
    if config.image_dim is not None:
        c = config.image_dim
        shapes["img_emb"] = {
            "norm_1": {"scale": (c,), "bias": (c,)},
            "linear_1": _linear(c, c),
            "linear_2": _linear(c, d),
            "norm_2": {"scale": (d,), "bias": (d,)},
        }
    return shapes


def init_params(config: WanDiTConfig, key: jax.Array) -> dict:
    """Random float32 init: kernels N(0, 1/fan_in), biases 0, norm scales 1, modulation tables N(0, 1/D) (as the
    release initialises them). Nothing is zero that the forward multiplies, so every part is exercised."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))
    out = []
    for k, (path, shape) in zip(jax.random.split(key, len(paths)), paths):
        name = path[-1].key
        if name == "scale":
            out.append(jnp.ones(shape, jnp.float32))
        elif name == "bias":
            out.append(jnp.zeros(shape, jnp.float32))
        elif name == "modulation":
            out.append(jax.random.normal(k, shape, jnp.float32) / np.sqrt(config.dim))
        else:
            out.append(jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[-2]))
    return jax.tree.unflatten(treedef, out)


def _dense(x, p, dtype):
    """x @ kernel + bias with inputs in `dtype`, float32 accumulation and result (full precision in float32 mode)."""
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    y = jnp.einsum(
        "...i,io->...o",
        x.astype(dtype),
        p["kernel"].astype(dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return y + p["bias"].astype(jnp.float32)


def _layer_norm(x, eps, p=None):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)
    return y if p is None else y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def _rms_norm(x, scale, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)


def _heads(config, x):
    return einops.rearrange(x, "... (n h) -> ... n h", n=config.num_heads)


def _attend(config, q, k, v):
    """softmax(q k^T / sqrt(h)) v for q (B, L, N, H) over k, v (B, S, N, H), in the compute dtype."""
    dt = config.compute_dtype
    return attention(
        q.astype(dt), k.astype(dt), v.astype(dt), impl=config.attention, block_size=config.attention_block_size
    )


def _self_attention(config, p, h_btsd, rope):
    """Self-attention over all T'S tokens; q and k RMS-normalised over the whole width D before the heads split."""
    dt, eps = config.compute_dtype, config.eps
    q = apply_rope(_heads(config, _rms_norm(_dense(h_btsd, p["q"], dt), p["norm_q"]["scale"], eps)), *rope)
    k = apply_rope(_heads(config, _rms_norm(_dense(h_btsd, p["k"], dt), p["norm_k"]["scale"], eps)), *rope)
    v = _heads(config, _dense(h_btsd, p["v"], dt))
    flat = lambda x: einops.rearrange(x, "b t s n h -> b (t s) n h")
    out = _attend(config, flat(q), flat(k), flat(v))
    out = checkpoint_name(einops.rearrange(out, "b l n h -> b l (n h)"), "self_attn_out")
    return _dense(out.reshape(h_btsd.shape), p["o"], dt)


def _cross_attention(config, p, h_btsd, text_bld, image_bid):
    """Queries over the text tokens, plus (I2V) the same queries over the image tokens with their own k/v; the two
    attention outputs are summed before the output projection."""
    dt, eps = config.compute_dtype, config.eps
    q = einops.rearrange(
        _heads(config, _rms_norm(_dense(h_btsd, p["q"], dt), p["norm_q"]["scale"], eps)), "b t s n h -> b (t s) n h"
    )
    k = _heads(config, _rms_norm(_dense(text_bld, p["k"], dt), p["norm_k"]["scale"], eps))
    out = _attend(config, q, k, _heads(config, _dense(text_bld, p["v"], dt)))
    if image_bid is not None:
        k_img = _heads(config, _rms_norm(_dense(image_bid, p["k_img"], dt), p["norm_k_img"]["scale"], eps))
        out = out + _attend(config, q, k_img, _heads(config, _dense(image_bid, p["v_img"], dt)))
    out = einops.rearrange(out, "b l n h -> b l (n h)").reshape(h_btsd.shape)
    return _dense(out, p["o"], dt)


def _block(config, x_btsd, p, e0_bt6d, text_bld, image_bid, rope):
    """One block on the float32 residual stream (B, T', S, D); modulation per (B, T')."""
    mod = p["modulation"].astype(jnp.float32)[None, None] + e0_bt6d  # (B, T', 6, D)
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, None, :] for m in jnp.unstack(mod, axis=2))
    eps = config.eps
    h = _layer_norm(x_btsd, eps) * (1 + scale) + shift
    x_btsd = x_btsd + _self_attention(config, p["self_attn"], h, rope) * gate
    h = _layer_norm(x_btsd, eps, p["norm3"]) if config.cross_attn_norm else x_btsd
    x_btsd = x_btsd + _cross_attention(config, p["cross_attn"], h, text_bld, image_bid)
    h = _layer_norm(x_btsd, eps) * (1 + c_scale) + c_shift
    dt = config.compute_dtype
    ffn = _dense(jax.nn.gelu(_dense(h, p["ffn"]["linear_1"], dt), approximate=True), p["ffn"]["linear_2"], dt)
    return x_btsd + ffn * c_gate


def _time_embedding(config, params, timesteps, b, t):
    """e (B, T', D) and the block modulation input e0 = time_projection(SiLU(e)) (B, T', 6, D), float32.

    The sinusoid is [cos, sin] of (num_train_timesteps x t) x exp(-ln(1e4) k / (freq_dim / 2)), as Wan's."""
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim == 1:
        timesteps = timesteps[:, None]
    if timesteps.ndim != 2 or timesteps.shape[0] != b or timesteps.shape[1] not in (1, t):
        raise ValueError(f"timesteps_bt must be (B,), (B, 1) or (B, T'={t}) with B={b}, got {timesteps.shape}")
    f32 = jnp.float32
    sinusoid = timestep_features(jnp.broadcast_to(timesteps, (b, t)) * config.num_train_timesteps, config.freq_dim)
    te = params["time_embedding"]
    e = _dense(jax.nn.silu(_dense(sinusoid, te["linear_1"], f32)), te["linear_2"], f32)
    e0 = _dense(jax.nn.silu(e), params["time_projection"], f32)
    return e, einops.rearrange(e0, "b t (k d) -> b t k d", k=6)


def _text_context(config, params, text_bld):
    """text_embedding(text zero-padded to text_len): Linear -> GELU(tanh) -> Linear, (B, text_len, D)."""
    b, length, width = text_bld.shape
    if width != config.text_dim or length > config.text_len:
        raise ValueError(f"text_bld must be (B, L <= {config.text_len}, {config.text_dim}), got {text_bld.shape}")
    # The release pads with zeros before the MLP, so the padded tokens are attended (as text_embedding(0)).
    text = jnp.pad(text_bld.astype(jnp.float32), ((0, 0), (0, config.text_len - length), (0, 0)))
    te, dt = params["text_embedding"], config.compute_dtype
    return _dense(jax.nn.gelu(_dense(text, te["linear_1"], dt), approximate=True), te["linear_2"], dt)


def _image_context(config, params, image_bic):
    """img_emb: LayerNorm -> Linear -> GELU(erf) -> Linear -> LayerNorm, (B, I, image_dim) -> (B, I, D)."""
    if image_bic is None or image_bic.ndim != 3 or image_bic.shape[-1] != config.image_dim:
        raise ValueError(
            f"an I2V network (image_dim={config.image_dim}) needs image_bic (B, I, {config.image_dim}), the CLIP "
            f"image tokens; got {None if image_bic is None else image_bic.shape}"
        )
    p, dt = params["img_emb"], config.compute_dtype
    h = _dense(_layer_norm(image_bic, _IMAGE_LN_EPS, p["norm_1"]), p["linear_1"], dt)
    h = _dense(jax.nn.gelu(h, approximate=False), p["linear_2"], dt)
    return _layer_norm(h, _IMAGE_LN_EPS, p["norm_2"])


def velocity(
    net_config: WanDiTConfig,
    params: dict,
    x_bcthw: jnp.ndarray,
    timesteps_bt: jnp.ndarray,
    text_bld: jnp.ndarray,
    cond_bcthw: jnp.ndarray | None = None,
    image_bic: jnp.ndarray | None = None,
    return_block_outputs: tuple[int, ...] = (),
):
    """Network output (the RF velocity noise - x0) (B, out_dim, T, H, W), float32.

    x_bcthw: the noisy latents (B, out_dim, T, H, W). timesteps_bt: RF time t in [0, 1] ((B,), (B, 1) or per
    latent frame (B, T'), T' = T / patch_t); the network sees num_train_timesteps x t. text_bld: the raw text
    encoder output (B, L <= text_len, text_dim), zero-padded to text_len here as the release does.
    cond_bcthw: the channels concatenated after the latents, (B, in_dim - out_dim, T, H, W) (I2V: mask 4 +
    condition latents 16, the release's `y`); required iff in_dim > out_dim. image_bic: I2V only, the CLIP image
    tokens (B, I, image_dim) (I = 257 in the release).
    return_block_outputs: block ids; if given, returns (velocity, {i: (B, T'H'W', D) residual stream after block i}).
    """
    cfg = net_config
    b, c, t, h, w = x_bcthw.shape
    pt, ph, pw = cfg.patch_size
    if c != cfg.out_dim or t % pt or h % ph or w % pw:
        raise ValueError(
            f"x_bcthw {x_bcthw.shape} must have {cfg.out_dim} channels and T, H, W divisible by {cfg.patch_size}"
        )
    if cfg.cond_dim:
        if cond_bcthw is None or cond_bcthw.shape != (b, cfg.cond_dim, t, h, w):
            raise ValueError(
                f"in_dim {cfg.in_dim} needs cond_bcthw {(b, cfg.cond_dim, t, h, w)} after the latents, got "
                f"{None if cond_bcthw is None else cond_bcthw.shape}"
            )
        x_bcthw = jnp.concatenate([x_bcthw.astype(jnp.float32), cond_bcthw.astype(jnp.float32)], axis=1)
    elif cond_bcthw is not None:
        raise ValueError(f"cond_bcthw given, but in_dim {cfg.in_dim} == out_dim: this network takes no conditions")
    if cfg.image_dim is None and image_bic is not None:
        raise ValueError("image_bic given, but this is a T2V network (image_dim None)")
    block_ids = tuple(sorted(set(int(i) for i in return_block_outputs)))
    if any(not 0 <= i < cfg.num_layers for i in block_ids):
        raise ValueError(f"return_block_outputs {return_block_outputs} outside [0, {cfg.num_layers})")

    tp, hp, wp = t // pt, h // ph, w // pw
    # The (1, 2, 2) Conv3d with stride = kernel is a linear map of each patch, flattened (c, pt, ph, pw).
    patches = einops.rearrange(
        x_bcthw.astype(jnp.float32), "b c (t r) (h m) (w n) -> b t (h w) (c r m n)", r=pt, m=ph, n=pw
    )
    x_btsd = _dense(patches, params["patch_embedding"], cfg.compute_dtype)
    e, e0 = _time_embedding(cfg, params, timesteps_bt, b, tp)
    text = _text_context(cfg, params, text_bld).astype(cfg.compute_dtype)
    image = None if cfg.image_dim is None else _image_context(cfg, params, image_bic).astype(cfg.compute_dtype)
    rope = rope_cos_sin(cfg.head_dim, tp, hp, wp, cfg.rope_theta)
    x_btsd, feats = run_blocks(
        functools.partial(_block, cfg),
        params["blocks"],
        x_btsd,
        (e0, text, image, rope),
        block_ids,
        num_blocks=cfg.num_layers,
        remat_policy=cfg.remat_policy,
        scan_blocks=cfg.scan_blocks,
    )
    feats = {i: einops.rearrange(f, "b t s d -> b (t s) d") for i, f in feats.items()}

    head = params["head"]
    shift, scale = (
        m[:, :, None, :]
        for m in jnp.unstack(head["modulation"].astype(jnp.float32)[None, None] + e[:, :, None], axis=2)
    )
    out = _dense(_layer_norm(x_btsd, cfg.eps) * (1 + scale) + shift, head["linear"], cfg.compute_dtype)
    # Unpatchify: each token's features are (pt, ph, pw, c) with the channel fastest.
    out = einops.rearrange(out, "b t (h w) (r m n c) -> b c (t r) (h m) (w n)", h=hp, r=pt, m=ph, n=pw, c=cfg.out_dim)
    return (out, feats) if block_ids else out
