"""The umT5 encoder (Wan2.1's text encoder) as pure JAX functions of a nested-dict parameter tree.

Token embedding, `num_layers` pre-norm blocks (T5 RMS norm -> self-attention with this layer's own bucketed
relative-position bias, no 1/sqrt(d) scaling, padding keys masked -> residual; T5 RMS norm -> gated-GELU FFN ->
residual) and a final T5 RMS norm. Unlike T5 v1.1, every umT5 layer has its own `relative_attention_bias`.

Parameter tree (see `param_shapes`): Linear kernels are (in, out), i.e. transposed from PyTorch; the blocks are
stacked on a leading num_layers axis and `encode` scans over them. Compute follows transformers / Wan in the
parameter dtype: residual stream and matmuls in that dtype, the norm statistics, attention logits and softmax in
float32 (as Wan's softmax; transformers' eager softmax stays in the parameter dtype, the same in float32).
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
class UMT5Config:
    """Sizes of the encoder; inner attention width = num_heads * d_kv (need not equal d_model)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self):
        if self.num_buckets % 4 or self.num_buckets < 4:
            raise ValueError(f"umT5 config: num_buckets {self.num_buckets} must be a positive multiple of 4")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"umT5 config: max_distance {self.max_distance} must exceed num_buckets / 4 = {self.num_buckets // 4}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# google/umt5-xxl's encoder, the text encoder of every Wan2.1 model (wan/modules/t5.py `umt5_xxl`).
UMT5_XXL = UMT5Config(vocab_size=256384, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240)
# A few-KB encoder for tests and toy runs.
UMT5_TINY = UMT5Config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128)
PRESETS = {"umt5-xxl": UMT5_XXL, "tiny": UMT5_TINY}


def param_shapes(cfg: UMT5Config, dtype=jnp.float32) -> dict:
    """Tree of ShapeDtypeStruct: {"embed": (V, D), "norm": (D,), "layers": {leaf: (N, ...)}} (kernels (in, out))."""
    n, d, f, i = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.inner_dim
    layer = {
        "attn_norm": (d,),
        "q": (d, i),
        "k": (d, i),
        "v": (d, i),
        "o": (i, d),
        "rel_bias": (cfg.num_buckets, cfg.num_heads),
        "ffn_norm": (d,),
        "wi_0": (d, f),
        "wi_1": (d, f),
        "wo": (f, d),
    }
    sds = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
    return {
        "embed": sds((cfg.vocab_size, d)),
        "norm": sds((d,)),
        "layers": {k: sds((n, *s)) for k, s in layer.items()},
    }


def init_params(cfg: UMT5Config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters for tests and tiny runs: matrices normal(0, 1 / sqrt(fan_in)) so that activations stay
    O(1) through the layers, embeddings and position biases normal(0, 1), norm weights 1 + normal(0, 0.1)."""
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(cfg, dtype))
    sizes = [math.prod(s.shape) for _, s in leaves]
    # One draw split into the leaves: XLA:CPU compiles one threefry per random call.
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out = []
    for (path, s), start, size in zip(leaves, np.cumsum([0, *sizes[:-1]]), sizes):
        x = noise[start : start + size].reshape(s.shape)
        name = path[-1].key
        if name.endswith("norm"):
            x = 1.0 + 0.1 * x
        elif name not in ("embed", "rel_bias"):
            x = x / math.sqrt(s.shape[-2])
        out.append(x.astype(dtype))
    return jax.tree.unflatten(treedef, out)


def relative_position_buckets(cfg: UMT5Config, length: int) -> np.ndarray:
    """int32 (L, L) bucket of key position j seen from query position i (bidirectional T5 bucketing).

    Half of the buckets are for keys after the query; within each half, distances below a quarter of the buckets
    are exact and the rest are logarithmic up to max_distance. Computed on the host in float32 exactly as
    transformers and Wan do, so that the distances on a bucket boundary (16, 32, 64) land in the same bucket.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = cfg.num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    # Distance 0 would take log(0); it is an exact bucket, so any finite stand-in does.
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)
    log_ratio = np.log(ratio) / np.float32(math.log(cfg.max_distance / exact))
    large = exact + (log_ratio * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = (rel > 0) * half + np.where(dist < exact, dist, large)
    return buckets.astype(np.int32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * weight, no mean subtracted, no bias; statistics in float32, the
    scaling in the weight's dtype (as transformers and Wan do)."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(weight.dtype)


def _block(cfg: UMT5Config, p: dict, x_bld: jax.Array, buckets_ll: jax.Array, mask_bl: jax.Array) -> jax.Array:
    """One encoder block: x + attn(norm(x)), then + ffn(norm(.))."""
    h = rms_norm(x_bld, p["attn_norm"], cfg.eps)
    q, k, v = (rearrange(h @ p[n], "b l (h d) -> b h l d", d=cfg.d_kv) for n in ("q", "k", "v"))
    bias_hll = rearrange(jnp.take(p["rel_bias"], buckets_ll, axis=0), "q k h -> h q k").astype(jnp.float32)
    # T5 folds the scale into its initialisation: no 1/sqrt(d_kv) here.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) + bias_hll
    logits = jnp.where(mask_bl[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(x_bld.dtype)
    o = jnp.einsum("bhqk,bhkd->bqhd", weights, v)
    x_bld = x_bld + rearrange(o, "b l h d -> b l (h d)") @ p["o"]
    h = rms_norm(x_bld, p["ffn_norm"], cfg.eps)
    # gelu_new (the tanh approximation) gates the wi_1 branch.
    gated = jax.nn.gelu(h @ p["wi_0"], approximate=True) * (h @ p["wi_1"])
    return x_bld + gated @ p["wo"]


def encode(cfg: UMT5Config, params: dict, ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
    """Last hidden state (B, L, d_model) in the parameter dtype: transformers' `UMT5EncoderModel(...)
    .last_hidden_state`. `mask_bl` (1 = token, 0 = padding; default all ones) hides padding keys; padded query
    positions are computed like any other (callers drop them, see `api.embed`)."""
    ids_bl = jnp.asarray(ids_bl, jnp.int32)
    mask_bl = jnp.ones(ids_bl.shape, bool) if mask_bl is None else jnp.asarray(mask_bl) > 0
    buckets_ll = jnp.asarray(relative_position_buckets(cfg, ids_bl.shape[1]))
    x_bld = jnp.take(params["embed"], ids_bl, axis=0)

    def body(x, p):
        return _block(cfg, p, x, buckets_ll, mask_bl), None

    x_bld, _ = lax.scan(body, x_bld, params["layers"])
    return rms_norm(x_bld, params["norm"], cfg.eps)
