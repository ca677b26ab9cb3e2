"""The Qwen2.5(-VL) language model, text only, as pure JAX functions of a nested-dict parameter tree.

This is the network of the Reason1 text encoder (docs/algorithm.md §11): token embedding, `num_layers` pre-norm
decoder layers (RMSNorm -> causal GQA self-attention with q/k/v biases and 1-D rotate-half RoPE over the whole
head_dim, positions 0..L-1 -> residual; RMSNorm -> SiLU-gated MLP -> residual) and a final RMSNorm. There is no
padding mask: every token attends to all earlier tokens, pads included, as in the reference (which calls the model
without an attention mask). With text-only input Qwen2.5-VL's multimodal RoPE gives the same angle to all three of
its sections, i.e. it is this ordinary 1-D RoPE.

Parameter tree (see `param_shapes`): Linear kernels are (in, out), i.e. transposed from PyTorch; the decoder layers
are stacked on a leading num_layers axis and `hidden_states` scans over them (fast compile for 28 layers).
Compute follows transformers in the parameter dtype: the residual stream and matmuls in that dtype, RMSNorm's
statistics, RoPE angles and the softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Sizes of the language model; `head_dim` = hidden_size / num_heads (Qwen2 has no separate head_dim)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Qwen2 config: hidden_size {self.hidden_size} must divide into num_heads "
                f"{self.num_heads}, and num_heads into num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen2 config: head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Cosmos-Reason1-7B (= Qwen2.5-VL-7B language model), docs/algorithm.md §11.
REASON1_7B = Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)

# Per-layer leaves -> (PyTorch name under `model.layers.{i}.`, whether the kernel is transposed from (out, in)).
LAYER_TORCH_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "q_w": ("self_attn.q_proj.weight", True),
    "q_b": ("self_attn.q_proj.bias", False),
    "k_w": ("self_attn.k_proj.weight", True),
    "k_b": ("self_attn.k_proj.bias", False),
    "v_w": ("self_attn.v_proj.weight", True),
    "v_b": ("self_attn.v_proj.bias", False),
    "o_w": ("self_attn.o_proj.weight", True),
    "post_norm": ("post_attention_layernorm.weight", False),
    "gate_w": ("mlp.gate_proj.weight", True),
    "up_w": ("mlp.up_proj.weight", True),
    "down_w": ("mlp.down_proj.weight", True),
}
# Top-level leaves -> PyTorch name (never transposed).
TOP_TORCH_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}


def param_shapes(cfg: Qwen2Config, dtype=jnp.float32) -> dict:
    """Tree of ShapeDtypeStruct: {"embed": (V, D), "norm": (D,), "layers": {leaf: (N, ...)}} (kernels (in, out))."""
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = {
        "input_norm": (d,),
        "q_w": (d, q),
        "q_b": (q,),
        "k_w": (d, kv),
        "k_b": (kv,),
        "v_w": (d, kv),
        "v_b": (kv,),
        "o_w": (q, d),
        "post_norm": (d,),
        "gate_w": (d, f),
        "up_w": (d, f),
        "down_w": (f, d),
    }
    sds = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
    return {
        "embed": sds((cfg.vocab_size, d)),
        "norm": sds((d,)),
        "layers": {k: sds((n, *s)) for k, s in layer.items()},
    }


def init_params(cfg: Qwen2Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters (normal(0, scale) matrices and biases, norm weights around 1) for tests and tiny runs."""
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(cfg, dtype))
    sizes = [math.prod(s.shape) for _, s in leaves]
    # One draw split into the leaves: XLA:CPU compiles one threefry per random call, seconds for a dozen.
    noise = scale * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out = []
    for (path, s), start, size in zip(leaves, np.cumsum([0, *sizes[:-1]]), sizes):
        x = noise[start : start + size].reshape(s.shape)
        out.append((x + 1.0 if path[-1].key.endswith("norm") else x).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight, statistics in float32, scaled in x's dtype (as transformers does)."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_cos_sin(cfg: Qwen2Config, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin (L, head_dim) float32 of positions 0..L-1, angle vector duplicated over the two halves.

    The inverse frequencies are computed in float32 exactly as transformers does (theta^(2i/d) then 1/x), so that
    angles of late positions (up to ~500 rad) agree to the ulp.
    """
    exps = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exps, dtype=np.float32)
    ang_lf = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    ang_ld = jnp.concatenate([ang_lf, ang_lf], axis=-1)
    return jnp.cos(ang_ld), jnp.sin(ang_ld)


def _apply_rope(x_blhd: jax.Array, cos_ld: jax.Array, sin_ld: jax.Array) -> jax.Array:
    """Rotate-half RoPE in float32: y = x cos + concat(-x2, x1) sin; returned in x's dtype."""
    x = x_blhd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos_ld[None, :, None, :] + rotated * sin_ld[None, :, None, :]).astype(x_blhd.dtype)


def _layer(cfg: Qwen2Config, p: dict, x_bld: jax.Array, cos_ld: jax.Array, sin_ld: jax.Array) -> jax.Array:
    """One decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""
    h = rms_norm(x_bld, p["input_norm"], cfg.rms_norm_eps)
    q = rearrange(h @ p["q_w"] + p["q_b"], "b l (h d) -> b l h d", d=cfg.head_dim)
    k = rearrange(h @ p["k_w"] + p["k_b"], "b l (h d) -> b l h d", d=cfg.head_dim)
    v = rearrange(h @ p["v_w"] + p["v_b"], "b l (h d) -> b l h d", d=cfg.head_dim)
    q, k = _apply_rope(q, cos_ld, sin_ld), _apply_rope(k, cos_ld, sin_ld)
    # Grouped-query attention is native here (num_heads a multiple of num_kv_heads); scale 1/sqrt(head_dim).
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x_bld = x_bld + rearrange(o, "b l h d -> b l (h d)") @ p["o_w"]
    h = rms_norm(x_bld, p["post_norm"], cfg.rms_norm_eps)
    return x_bld + (jax.nn.silu(h @ p["gate_w"]) * (h @ p["up_w"])) @ p["down_w"]


def hidden_states(cfg: Qwen2Config, params: dict, ids_bl: jax.Array) -> jax.Array:
    """Outputs of layers 1..N, (N, B, L, D) in the parameter dtype; the last one after the final norm.

    This is transformers' `output_hidden_states[1:]` for a call without attention mask (causal attention only).
    Sharding is left to XLA: with FSDP-sharded weights and a batch of a few thousand tokens it keeps the weights
    where they are and moves the (much smaller) activations, which is what the memory benchmark measured best
    (benchmarks/text_encoder_memory.py; pinning activations to the batch sharding gathered whole layers instead).
    """
    ids_bl = jnp.asarray(ids_bl, jnp.int32)
    cos_ld, sin_ld = rope_cos_sin(cfg, ids_bl.shape[1])
    x_bld = jnp.take(params["embed"], ids_bl, axis=0)

    def body(x, p):
        x = _layer(cfg, p, x, cos_ld, sin_ld)
        return x, x

    _, hs_nbld = lax.scan(body, x_bld, params["layers"])
    last = rms_norm(hs_nbld[-1], params["norm"], cfg.rms_norm_eps)
    return jnp.concatenate([hs_nbld[:-1], last[None]], axis=0)
