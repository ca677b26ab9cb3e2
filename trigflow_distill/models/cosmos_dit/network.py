"""Cosmos Predict2.5 DiT (MinimalV1LVGDiT, docs/algorithm.md §8) as pure JAX functions over a nested-dict
parameter tree.

Layout of the tree: see `param_shapes`. Linear kernels are (in, out); the blocks are stacked on a leading
num_blocks axis and the forward scans over them. Compute dtype float32 or bfloat16: in bf16 the matmul inputs are
bf16 (fp32 accumulation), while norms, softmax, RoPE, the time embedding, the AdaLN modulation and the residual
stream stay float32.

Sequence parallelism: `velocity(..., mesh=mesh)` with a mesh whose `config.seq_axis` axis has n > 1 devices shards
the token axis of every activation over that axis. The residual stream is laid out (B, T', S_pad, D) with the
spatial tokens of each frame (S = H'W', zero-padded to a multiple of n) split over the n devices; self-attention
splits the heads over the axis by an all-to-all (or all-gathers K/V when the axis size does not divide the heads;
padded positions dropped, so they are never attended), cross-attention is local.
Everything else (FSDP parameter gathers, projections, MLP) is left to XLA's SPMD partitioner.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trigflow_distill.models.cosmos_dit.attention import IMPLS, attention
from trigflow_distill.models.cosmos_dit.conditioning import project_text
from trigflow_distill.models.cosmos_dit.rope import apply_rope, rope_cos_sin, rope_split, timestep_features

_EPS = 1e-6  # LayerNorm, RMSNorm (q/k and time embedding) epsilon of Cosmos
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MODULATED = ("self_attn", "cross_attn", "mlp")
GUIDANCE_EMBEDDER = "guidance_embedder"  # param key of a guidance-conditioned student (docs/algorithm.md §15)
# Per-block rematerialisation (jax.checkpoint) policies: what the backward pass keeps from the forward pass.
REMAT_POLICIES = {
    "none": None,  # no checkpoint: keep every intermediate
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block input; recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    # keep the self-attention output (before its output projection): the backward skips recomputing attention
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("self_attn_out"),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture (names as in the PyTorch constructor) plus compute options (dtype, remat, attention, layout)."""

    model_channels: int
    num_blocks: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    adaln_lora_dim: int = 256
    crossattn_emb_channels: int = 1024
    crossattn_proj_in_channels: int | None = None  # None: no text projection inside the net
    rope_h_extrapolation_ratio: float = 3.0
    rope_w_extrapolation_ratio: float = 3.0
    rope_t_extrapolation_ratio: float = 1.0
    concat_padding_mask: bool = True
    # A guidance-conditioned student (docs/algorithm.md §15) adds a "guidance_embedder" kernel (D, D); `velocity`
    # takes it whenever the params have one, whatever this flag says: the flag sizes `param_shapes` (conversion).
    guidance_embedder: bool = False
    dtype: str = "float32"
    remat: bool | str = False  # a REMAT_POLICIES name; True = "full", False = "none"
    attention: str = "auto"  # networks.attention impl: auto (einsum on CPU, xla elsewhere), xla, einsum, blockwise
    attention_block_size: int = 512  # keys per step of the "blockwise" attention
    scan_blocks: bool = True  # lax.scan over the stacked blocks; False unrolls them and the MLP groups (exact XLA
    # cost analysis)
    # With remat, the MLP runs over groups of this many latent frames, each checkpointed: the backward then holds one
    # group's (tokens x mlp_hidden) activations instead of all frames'. 0 = all frames at once.
    mlp_chunk_frames: int = 4
    seq_axis: str = "seq"  # mesh axis that shards the tokens when velocity() gets a mesh
    batch_axes: tuple[str, ...] = ("data", "fsdp")  # mesh axes that shard the batch (those present in the mesh)

    def __post_init__(self):
        d = self.model_channels
        if d % 2 or self.num_heads <= 0 or d % self.num_heads:
            raise ValueError(f"model_channels {d} must be even and divisible by num_heads {self.num_heads}")
        rope_split(self.head_dim)
        if abs(d * self.mlp_ratio - self.mlp_hidden) > 1e-6:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} x model_channels {d} is not an integer MLP width")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use one of {sorted(_DTYPES)}")
        if self.attention not in IMPLS:  # (not resolve_impl: "auto" would start the JAX backend at import)
            raise ValueError(f"unknown attention impl {self.attention!r}; choose one of {IMPLS}")
        if not isinstance(self.remat, bool) and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not supported; use True/False or one of {sorted(REMAT_POLICIES)}")
        if (
            min(
                self.num_blocks, self.patch_spatial, self.patch_temporal, self.adaln_lora_dim, self.attention_block_size
            )
            < 1
            or self.mlp_chunk_frames < 0
        ):
            raise ValueError(
                f"num_blocks, patch sizes, adaln_lora_dim, attention_block_size must be >= 1 and "
                f"mlp_chunk_frames >= 0: {self}"
            )

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP width F."""
        return int(round(self.model_channels * self.mlp_ratio))

    @property
    def patch_in(self) -> int:
        """Patch-embedding input width: (latent + condition mask [+ padding mask]) channels x patch volume."""
        channels = self.in_channels + 1 + int(self.concat_padding_mask)
        return channels * self.patch_temporal * self.patch_spatial**2

    @property
    def patch_out(self) -> int:
        return self.out_channels * self.patch_temporal * self.patch_spatial**2

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def remat_policy(self) -> str:
        """The REMAT_POLICIES name of `remat` (booleans mapped to "full" / "none")."""
        if isinstance(self.remat, bool):
            return "full" if self.remat else "none"
        return self.remat


PRESETS = {
    "predict25_2b": DiTConfig(model_channels=2048, num_blocks=28, num_heads=16, crossattn_proj_in_channels=100352),
    "predict25_14b": DiTConfig(model_channels=5120, num_blocks=36, num_heads=40, crossattn_proj_in_channels=100352),
    # CPU tests / demo: head_dim 32 (RoPE 12:10:10), MLP ratio 3, small LoRA and context widths.
    "tiny": DiTConfig(
        model_channels=128,
        num_blocks=2,
        num_heads=4,
        mlp_ratio=3.0,
        adaln_lora_dim=32,
        crossattn_emb_channels=64,
        crossattn_proj_in_channels=96,
    ),
}


def get_preset(name: str, **overrides) -> DiTConfig:
    """A preset config with fields replaced by `overrides` (e.g. dtype="bfloat16", remat=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def param_shapes(config: DiTConfig) -> dict:
    """Nested dict of parameter shapes: the exact tree `init_params` builds and `velocity` reads."""
    d, n, r, hd = config.model_channels, config.num_blocks, config.adaln_lora_dim, config.head_dim
    ctx, f = config.crossattn_emb_channels, config.mlp_hidden

    def attn(kv_in):
        return {
            "q_proj": {"kernel": (n, d, d)},
            "k_proj": {"kernel": (n, kv_in, d)},
            "v_proj": {"kernel": (n, kv_in, d)},
            "output_proj": {"kernel": (n, d, d)},
            "q_norm": {"scale": (n, hd)},
            "k_norm": {"scale": (n, hd)},
        }

    blocks = {
        "self_attn": attn(d),
        "cross_attn": attn(ctx),
        "mlp": {"layer1": {"kernel": (n, d, f)}, "layer2": {"kernel": (n, f, d)}},
    }
    for m in _MODULATED:
        blocks[f"adaln_modulation_{m}"] = {"linear_1": {"kernel": (n, d, r)}, "linear_2": {"kernel": (n, r, 3 * d)}}
    shapes = {
        "x_embedder": {"kernel": (config.patch_in, d)},
        "t_embedder": {"linear_1": {"kernel": (d, d)}, "linear_2": {"kernel": (d, 3 * d)}},
        "t_embedding_norm": {"scale": (d,)},
        "blocks": blocks,
        "final_layer": {
            "adaln_modulation": {"linear_1": {"kernel": (d, r)}, "linear_2": {"kernel": (r, 2 * d)}},
            "linear": {"kernel": (d, config.patch_out)},
        },
    }
    if config.crossattn_proj_in_channels is not None:
        shapes["crossattn_proj"] = {"kernel": (config.crossattn_proj_in_channels, ctx), "bias": (ctx,)}
    if config.guidance_embedder:
        shapes[GUIDANCE_EMBEDDER] = {"linear": {"kernel": (d, d)}}
    return shapes


def add_guidance_embedder(params: dict) -> dict:
    """`params` plus a zero guidance projection (D, D) (docs/algorithm.md §15): the network now takes a CFG scale s
    and, while the projection is zero, returns exactly what it returned without one, for every s."""
    d = params["t_embedding_norm"]["scale"].shape[-1]
    return {**params, GUIDANCE_EMBEDDER: {"linear": {"kernel": jnp.zeros((d, d), jnp.float32)}}}


def init_params(config: DiTConfig, key: jax.Array) -> dict:
    """Random float32 init: kernels N(0, 1/fan_in), norm scales 1, projection bias 0.

    Like Cosmos, the last AdaLN-modulation layers (blocks and final layer) start at zero; the AdaLN-LoRA term
    from the time embedding still makes every shift/scale/gate non-zero.
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))
    out = []
    for k, (path, shape) in zip(jax.random.split(key, len(paths)), paths):
        names = [p.key for p in path]
        if names[-1] == "scale":
            out.append(jnp.ones(shape, jnp.float32))
        elif (
            names[-1] == "bias"
            or names[0] == GUIDANCE_EMBEDDER
            or (names[-2] == "linear_2" and names[-3].startswith("adaln_modulation"))
        ):
            out.append(jnp.zeros(shape, jnp.float32))
        else:
            out.append(jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[-2]))
    return jax.tree.unflatten(treedef, out)


def _dense(x, kernel, dtype):
    """x @ kernel with inputs in `dtype`, float32 accumulation and result (full precision in float32 mode)."""
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jnp.einsum(
        "...i,io->...o",
        x.astype(dtype),
        kernel.astype(dtype),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _layer_norm(x):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _EPS)


def _rms_norm(x, scale):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS) * scale.astype(jnp.float32)


def _modulation(p, emb_btd, lora_btk):
    """Linear_{r->kD}(Linear_{D->r}(SiLU(emb))) + adaln_lora, split into k (B,T,1,D) chunks (shift, scale, ...).

    Float32 in every compute dtype: only B*T rows, and shift/scale/gate multiply the whole stream.
    """
    f32 = jnp.float32
    h = _dense(_dense(jax.nn.silu(emb_btd), p["linear_1"]["kernel"], f32), p["linear_2"]["kernel"], f32)
    chunks = jnp.split(h + lora_btk, lora_btk.shape[-1] // emb_btd.shape[-1], axis=-1)
    return [c[:, :, None, :] for c in chunks]


class _Layout(NamedTuple):
    """Sequence-parallel layout: tokens of each frame split over mesh axis `seq`, batch over `batch` axes."""

    mesh: Mesh
    batch: tuple[str, ...] | None
    seq: str
    num_valid: int  # spatial tokens per frame before padding (S)

    def spec(self, *dims):
        return P(self.batch, *dims)

    def constrain(self, x_btsd):
        return jax.lax.with_sharding_constraint(x_btsd, NamedSharding(self.mesh, self.spec(None, self.seq, None)))


def _layout(config, mesh, batch, spatial):
    """The _Layout for `mesh`, or None when the mesh has no `seq_axis` of size > 1 (plain single-program code)."""
    if mesh is None or mesh.shape.get(config.seq_axis, 1) == 1:
        return None
    axes = tuple(a for a in config.batch_axes if a in mesh.shape)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if batch % shards:
        raise ValueError(
            f"batch {batch} does not split over the mesh batch axes {axes} ({shards} shards); use a "
            f"multiple of {shards} or set DiTConfig.batch_axes"
        )
    return _Layout(mesh, axes or None, config.seq_axis, spatial)


def _self_attention_core(config, layout, q, k, v, q_scale, k_scale, cos_tsh, sin_tsh):
    """Per-device self-attention on (b, t, s, n, h) heads: q/k RMSNorm, RoPE, then (seq layout) either

    - heads split over the seq group (when it divides num_heads): an all-to-all turns (all heads, s / n tokens)
      into (n_heads / n heads, all tokens) for q, k, v and back for the output, so every device attends over all
      keys while holding 1/n of them per tensor (DeepSpeed-Ulysses; less memory and traffic than gathering K/V);
    - or K/V all-gathered over the seq group (each device attends its own queries over all keys).

    Padded spatial positions (index >= S in each frame) are dropped from K/V: never attended.
    """
    dt = config.compute_dtype
    flat = lambda x: einops.rearrange(x, "b t s n h -> b (t s) n h")
    cos, sin = (einops.rearrange(c, "t s h -> (t s) h") for c in (cos_tsh, sin_tsh))
    q = apply_rope(flat(_rms_norm(q, q_scale)), cos, sin).astype(dt).reshape(q.shape)
    k = apply_rope(flat(_rms_norm(k, k_scale)), cos, sin).astype(dt).reshape(k.shape)
    v = v.astype(dt)
    attend = functools.partial(attention, impl=config.attention, block_size=config.attention_block_size)
    if layout is None:
        return attend(flat(q), flat(k), flat(v)).reshape(q.shape)
    if config.num_heads % layout.mesh.shape[layout.seq]:
        k, v = (jax.lax.all_gather(x, layout.seq, axis=2, tiled=True)[:, :, : layout.num_valid] for x in (k, v))
        return attend(flat(q), flat(k), flat(v)).reshape(q.shape)
    to_heads = lambda x: jax.lax.all_to_all(x, layout.seq, split_axis=3, concat_axis=2, tiled=True)
    q, k, v = to_heads(q), to_heads(k)[:, :, : layout.num_valid], to_heads(v)[:, :, : layout.num_valid]
    out = attend(flat(q), flat(k), flat(v)).reshape(q.shape)  # padded query positions: computed, never used
    return jax.lax.all_to_all(out, layout.seq, split_axis=2, concat_axis=3, tiled=True)


def _cross_attention_core(config, q, k, v, q_scale, k_scale):
    """Per-device cross-attention: queries (b, t, s, n, h) over all context tokens (b, L, n, h); no RoPE."""
    dt = config.compute_dtype
    q_flat = einops.rearrange(_rms_norm(q, q_scale).astype(dt), "b t s n h -> b (t s) n h")
    out = attention(
        q_flat,
        _rms_norm(k, k_scale).astype(dt),
        v.astype(dt),
        impl=config.attention,
        block_size=config.attention_block_size,
    )
    return out.reshape(q.shape)


def _attention_heads(config, layout, p, h_btsd, kv, rope):
    """Multi-head attention (B, T', S, D) -> (B, T', S, D): self-attention with RoPE (kv None, rope = (cos, sin)
    of shape (T', S, head_dim)) or cross-attention to kv (B, L, C); per-head q/k RMSNorm in both."""
    dt, nh = config.compute_dtype, config.num_heads
    heads = lambda x, name: einops.rearrange(_dense(x, p[name]["kernel"], dt), "... (n h) -> ... n h", n=nh)
    src = h_btsd if kv is None else kv
    q, k, v = heads(h_btsd, "q_proj"), heads(src, "k_proj"), heads(src, "v_proj")
    scales = (p["q_norm"]["scale"], p["k_norm"]["scale"])
    if kv is None:
        core, args = functools.partial(_self_attention_core, config, layout), (q, k, v, *scales, *rope)
    else:
        core, args = functools.partial(_cross_attention_core, config), (q, k, v, *scales)
    if layout is not None:
        tok, whole = layout.spec(None, layout.seq), layout.spec()
        specs = (
            (tok, tok, tok, P(), P(), P(None, layout.seq), P(None, layout.seq))
            if kv is None
            else (tok, whole, whole, P(), P())
        )
        core = jax.shard_map(core, mesh=layout.mesh, in_specs=specs, out_specs=tok)
    out = core(*args)
    if kv is None:
        out = checkpoint_name(out, "self_attn_out")
    return _dense(einops.rearrange(out, "... n h -> ... (n h)"), p["output_proj"]["kernel"], dt)


def _block(config, layout, x_btsd, p, emb_btd, lora_bt3d, context_bsd, rope):
    """One DiT block on the float32 residual stream (B, T, S, D); modulation per (B, T)."""
    if layout is not None:
        x_btsd = layout.constrain(x_btsd)
    mods = {m: _modulation(p[f"adaln_modulation_{m}"], emb_btd, lora_bt3d) for m in _MODULATED}

    def modulated(m, x):
        shift, scale, gate = mods[m]
        return _layer_norm(x) * (1 + scale) + shift, gate

    h, gate = modulated("self_attn", x_btsd)
    x_btsd = x_btsd + gate * _attention_heads(config, layout, p["self_attn"], h, None, rope)
    h, gate = modulated("cross_attn", x_btsd)
    x_btsd = x_btsd + gate * _attention_heads(config, layout, p["cross_attn"], h, context_bsd, None)
    h, gate = modulated("mlp", x_btsd)
    return x_btsd + gate * _mlp(config, p["mlp"], h)


def _mlp(config, p, h_btsd):
    """GELU MLP (B, T, S, D) -> (B, T, S, D); under remat in checkpointed groups of `mlp_chunk_frames` frames.

    Cost: about one more (tokens x D x mlp_hidden) matmul per block in the backward (the nested checkpoint's
    recompute), ~1 % of a 2B step at 84 480 tokens, where attention dominates.
    """
    dt, k, t = config.compute_dtype, config.mlp_chunk_frames, h_btsd.shape[1]

    def mlp(h):
        h = jax.nn.gelu(_dense(h, p["layer1"]["kernel"], dt), approximate=False)
        return _dense(h, p["layer2"]["kernel"], dt)

    if config.remat_policy == "none" or not k or t <= k:
        return mlp(h_btsd)
    n = -(-t // k)
    chunks = einops.rearrange(
        jnp.pad(h_btsd, ((0, 0), (0, n * k - t), (0, 0), (0, 0))), "b (n k) s d -> n b k s d", n=n
    )
    if config.scan_blocks:
        out = jax.lax.map(jax.checkpoint(mlp), chunks)
    else:  # unrolled like the blocks, so that XLA's cost analysis counts every group
        out = jnp.stack([jax.checkpoint(mlp)(c) for c in chunks])
    return einops.rearrange(out, "n b k s d -> b (n k) s d")[:, :t]


def run_blocks(block_fn, blocks, x_btsd, cond, block_ids, *, num_blocks, remat_policy, scan_blocks):
    """Scan (or unroll) the stacked `blocks` through block_fn(x, block_params, *cond) -> x, with the remat policy;
    split after each block in `block_ids` to return its output. Shared by the DiT families (Cosmos, Wan)."""
    step = block_fn
    if remat_policy != "none":
        # prevent_cse=False is only safe under scan; unrolled, XLA could merge the recomputation into the forward
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan_blocks)

    def body(x, p):
        return step(x, p, *cond), None

    feats, start = {}, 0
    for stop in [i + 1 for i in block_ids] + [num_blocks]:
        if stop > start:
            segment = jax.tree.map(lambda a, lo=start, hi=stop: a[lo:hi], blocks)
            if scan_blocks:
                x_btsd, _ = jax.lax.scan(body, x_btsd, segment)
            else:
                for i in range(stop - start):
                    x_btsd, _ = body(x_btsd, jax.tree.map(lambda a, i=i: a[i], segment))
        if stop - 1 in block_ids:
            feats[stop - 1] = x_btsd
        start = stop
    return x_btsd, feats


def _resize_nearest(mask_b1hw, h, w):
    """Nearest-neighbour resize (torch `interpolate(mode="nearest")` indices: floor(i * in / out))."""
    hin, win = mask_b1hw.shape[-2:]
    rows = np.minimum(np.floor(np.arange(h) * (hin / h)).astype(np.int32), hin - 1)
    cols = np.minimum(np.floor(np.arange(w) * (win / w)).astype(np.int32), win - 1)
    return mask_b1hw[:, :, rows][:, :, :, cols]


def _input_channels(config, x_bcthw, cond_mask_b1thw, padding_mask_b1hw):
    """Latent ⊕ condition mask ⊕ (padding mask resized to latent size, repeated over frames)."""
    b, _, t, h, w = x_bcthw.shape
    if cond_mask_b1thw is None:
        cond_mask_b1thw = jnp.zeros((b, 1, t, h, w), x_bcthw.dtype)
    if cond_mask_b1thw.ndim != 5 or cond_mask_b1thw.shape[0] not in (b, 1) or cond_mask_b1thw.shape[1:] != (1, t, h, w):
        raise ValueError(f"cond_mask_b1thw must be (B or 1, 1, {t}, {h}, {w}), got {cond_mask_b1thw.shape}")
    chans = [x_bcthw.astype(jnp.float32), jnp.broadcast_to(cond_mask_b1thw, (b, 1, t, h, w)).astype(jnp.float32)]
    if config.concat_padding_mask:
        if padding_mask_b1hw is None:
            padding_mask_b1hw = jnp.zeros((b, 1, h, w), jnp.float32)
        if padding_mask_b1hw.ndim != 4 or padding_mask_b1hw.shape[:2] not in ((b, 1), (1, 1)):
            raise ValueError(f"padding_mask_b1hw must be (B or 1, 1, H_px, W_px), got {padding_mask_b1hw.shape}")
        pad = _resize_nearest(padding_mask_b1hw.astype(jnp.float32), h, w)
        chans.append(jnp.broadcast_to(pad[:, :, None], (b, 1, t, h, w)))
    return jnp.concatenate(chans, axis=1)


def _time_embedding(config, params, timesteps, b, t, guidance_b=None):
    """Block conditioning emb = RMSNorm(sinusoid) and AdaLN-LoRA term (B, T', 3D), per latent frame (fp32).

    A guidance-conditioned net (params with GUIDANCE_EMBEDDER, docs/algorithm.md §15) adds the zero-initialised
    projection of the CFG scale's sinusoid, sinusoid(s_b) @ W (B, D), to the time sinusoid of every frame."""
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim == 1:
        timesteps = timesteps[:, None]
    if timesteps.ndim != 2 or timesteps.shape[0] != b or timesteps.shape[1] not in (1, t):
        raise ValueError(f"timesteps_bt must be (B,), (B, 1) or (B, T'={t}) with B={b}, got {timesteps.shape}")
    e = timestep_features(jnp.broadcast_to(timesteps, (b, t)), config.model_channels)
    if GUIDANCE_EMBEDDER in params:
        if guidance_b is None:
            raise ValueError("these params are a guidance-conditioned student (docs/algorithm.md §15): pass guidance_b")
        guidance_b = jnp.broadcast_to(jnp.asarray(guidance_b, jnp.float32), (b,))
        g = timestep_features(guidance_b, config.model_channels)
        e = e + _dense(g, params[GUIDANCE_EMBEDDER]["linear"]["kernel"], jnp.float32)[:, None, :]
    elif guidance_b is not None:
        raise ValueError("guidance_b given, but these params have no guidance embedder (a fixed-guidance network)")
    te = params["t_embedder"]
    lora = _dense(jax.nn.silu(_dense(e, te["linear_1"]["kernel"], jnp.float32)), te["linear_2"]["kernel"], jnp.float32)
    return _rms_norm(e, params["t_embedding_norm"]["scale"]), lora


def velocity(
    net_config: DiTConfig,
    params: dict,
    x_bcthw: jnp.ndarray,
    timesteps_bt: jnp.ndarray,
    text_bld: jnp.ndarray,
    cond_mask_b1thw: jnp.ndarray | None = None,
    padding_mask_b1hw: jnp.ndarray | None = None,
    return_block_outputs: tuple[int, ...] = (),
    mesh: Mesh | None = None,
    guidance_b: jnp.ndarray | None = None,
):
    """Network output (RF velocity) (B, C_out, T, H, W), float32.

    timesteps_bt: RF time in [0, 1], (B, T') per latent frame (T' = T / patch_temporal), or (B,) / (B, 1).
    text_bld: raw text embedding when `params` has "crossattn_proj", else the projected context.
    cond_mask_b1thw: 1 on conditional frames (zeros if None). padding_mask_b1hw: pixel-space (B or 1, 1, Hp, Wp)
    padding mask, nearest-resized to the latent size (zeros if None).
    return_block_outputs: block ids; if given, returns (velocity, {i: (B, T'H'W', D) residual stream after block i}).
    mesh: the device mesh when called under jit with sharded inputs; if it has a `net_config.seq_axis` axis of
    size > 1, activations are sequence-sharded over it (see the module doc). Results do not depend on the mesh.
    guidance_b: CFG scale s (B,) or scalar, required by and only by a guidance-conditioned net (params with
    GUIDANCE_EMBEDDER, docs/algorithm.md §15).
    """
    cfg = net_config
    b, c, t, h, w = x_bcthw.shape
    pt, ps = cfg.patch_temporal, cfg.patch_spatial
    if c != cfg.in_channels or t % pt or h % ps or w % ps:
        raise ValueError(
            f"x_bcthw {x_bcthw.shape} must have {cfg.in_channels} channels and T, H, W divisible by ({pt}, {ps}, {ps})"
        )
    block_ids = tuple(sorted(set(int(i) for i in return_block_outputs)))
    if any(not 0 <= i < cfg.num_blocks for i in block_ids):
        raise ValueError(f"return_block_outputs {return_block_outputs} outside [0, {cfg.num_blocks})")
    context = project_text(params["crossattn_proj"], text_bld) if "crossattn_proj" in params else text_bld
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.crossattn_emb_channels:
        raise ValueError(
            f"context must be (B={b}, L, {cfg.crossattn_emb_channels}), got {context.shape}; pass the projected "
            "context (project_text) when params have no 'crossattn_proj'"
        )
    tp, hp, wp = t // pt, h // ps, w // ps
    x = _input_channels(cfg, x_bcthw, cond_mask_b1thw, padding_mask_b1hw)
    x = einops.rearrange(x, "b c (t r) (h m) (w n) -> b t (h w) (c r m n)", r=pt, m=ps, n=ps)
    x_btsd = _dense(x, params["x_embedder"]["kernel"], cfg.compute_dtype)
    emb, lora = _time_embedding(cfg, params, timesteps_bt, b, tp, guidance_b)
    ratios = (cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio)
    rope = [c.reshape(tp, hp * wp, cfg.head_dim) for c in rope_cos_sin(cfg.head_dim, tp, hp, wp, ratios)]
    layout = _layout(cfg, mesh, b, hp * wp)
    if layout is not None:  # pad each frame's tokens to a multiple of the seq axis size
        n = layout.mesh.shape[layout.seq]
        pad = -(hp * wp) % n
        x_btsd = layout.constrain(jnp.pad(x_btsd, ((0, 0), (0, 0), (0, pad), (0, 0))))
        rope = [jnp.pad(c, ((0, 0), (0, pad), (0, 0))) for c in rope]
    cond = (emb, lora, context.astype(cfg.compute_dtype), rope)
    x_btsd, feats = run_blocks(
        functools.partial(_block, cfg, layout),
        params["blocks"],
        x_btsd,
        cond,
        block_ids,
        num_blocks=cfg.num_blocks,
        remat_policy=cfg.remat_policy,
        scan_blocks=cfg.scan_blocks,
    )
    feats = {i: einops.rearrange(f[:, :, : hp * wp], "b t s d -> b (t s) d") for i, f in feats.items()}

    fl = params["final_layer"]
    shift, scale = _modulation(fl["adaln_modulation"], emb, lora[..., : 2 * cfg.model_channels])
    out = _dense(_layer_norm(x_btsd) * (1 + scale) + shift, fl["linear"]["kernel"], cfg.compute_dtype)
    # Unpatchify order (p_h, p_w, p_t, c) with channel fastest: not the inverse of the patchify order.
    out = einops.rearrange(
        out[:, :, : hp * wp], "b t (h w) (m n r c) -> b c (t r) (h m) (w n)", h=hp, m=ps, n=ps, r=pt, c=cfg.out_channels
    )
    return (out, feats) if block_ids else out
