"""Multi-head attention kernels (no mask, scale 1/sqrt(D)) and a sequence-parallel wrapper.

Shapes: q_blhd (B, L, H, D), k_bshd / v_bshd (B, S, H, D) -> o_blhd (B, L, H, D); L != S (cross attention) is fine.

impl:
  "auto"      "einsum" on the CPU backend, "xla" elsewhere (the default).
  "xla"       jax.nn.dot_product_attention(implementation=None): cuDNN flash attention on GPU when its dtype/shape
              rules allow, otherwise XLA's dense softmax.
  "einsum"    dense softmax written so XLA:CPU fuses it well: heads moved in front (BHLD), q pre-scaled, fp32 logits
              and softmax. When the score tensor of one call is larger than ~8 MB, queries are processed in chunks
              (lax.map + checkpoint, each chunk sees all keys, so the softmax stays exact) to keep it in cache.
              This is the fastest formulation measured on the project's CPUs (benchmarks/attention_cpu.py).
  "blockwise" memory-efficient pure JAX (FlashAttention-2 scheme): queries in chunks of `q_block_size`, keys in
              blocks of `block_size` (padded and masked), an online (running max / running sum) softmax in fp32,
              and a custom VJP that recomputes each (query chunk x key block) score tile from q, k and the saved
              per-query log-sum-exp. Neither pass holds more than one score tile; the backward keeps only q, k, v,
              the output and the log-sum-exp. q_block_size None picks the chunk so that a tile is ~32 MiB.
  "splash"    TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention); TPU only, raises elsewhere.
              Untested on hardware here (the kernel itself is exercised in Pallas interpret mode by the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

IMPLS = ("auto", "xla", "einsum", "blockwise", "blockwise_jvp", "splash")
# Score bytes (B*H*rows*S*4) per query chunk above which "einsum" chunks the queries (fits L2/L3 on the CPUs here).
_EINSUM_CHUNK_BYTES = 8 * 2**20
# fp32 score-tile bytes (B*H*query chunk*key block*4) that "blockwise" aims for when it picks its query chunk.
_TILE_BYTES = 32 * 2**20


def resolve_impl(impl: str) -> str:
    """Maps "auto" to the fastest implementation for the default backend; validates the name."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "einsum" if jax.default_backend() == "cpu" else "xla"
    return impl


def attention(q_blhd, k_bshd, v_bshd, impl: str = "auto", block_size: int = 512, q_block_size: int | None = None):
    """Softmax attention softmax(q k^T / sqrt(D)) v over all S keys for every query; returns (B, L, H, D) in q's dtype.

    block_size: keys per scan step ("blockwise"). q_block_size: queries per chunk ("einsum", "blockwise");
    None = automatic (see module doc).
    """
    return _attention(q_blhd, k_bshd, v_bshd, impl, block_size, q_block_size, kv_valid=None)


def _attention(q, k, v, impl, block_size, q_block_size, kv_valid):
    """attention() where only the first `kv_valid` keys are attended to (None = all); used for padded K/V."""
    _check_shapes(q, k, v)
    impl = resolve_impl(impl)
    if block_size < 1 or (q_block_size is not None and q_block_size < 1):
        raise ValueError(f"block_size={block_size} and q_block_size={q_block_size} must be positive")
    if impl == "xla":
        lengths = None if kv_valid is None else jnp.full((q.shape[0],), kv_valid, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=None)
    if impl == "splash":
        if jax.default_backend() != "tpu":
            raise ValueError(
                f"impl='splash' needs a TPU backend (this is {jax.default_backend()!r}); "
                "use impl='xla', 'einsum' or 'blockwise'"
            )
        return _splash(q, k, v, kv_valid)
    if impl == "einsum":
        if q_block_size is None:
            b, _, h, _ = q.shape
            rows = _EINSUM_CHUNK_BYTES // (b * h * k.shape[1] * 4)
            q_block_size = max(16, 2 ** int(math.log2(max(rows, 1))))
        return _map_query_chunks(functools.partial(_dense_chunk, k=k, v=v, kv_valid=kv_valid), q, q_block_size)
    if kv_valid is not None:  # padded keys are dropped, so the kernel needs no mask
        k, v = k[:, :kv_valid], v[:, :kv_valid]
    # Inside shard_map the custom VJP must return cotangents of its inputs' types: give q, k, v the same varying
    # mesh axes first (e.g. context K/V that every `seq` device shares), so autodiff adds the psum of dk, dv.
    q, k, v = (_vary_like(x, q, k, v) for x in (q, k, v))
    return (_flash_jvp if impl == "blockwise_jvp" else _flash)(q, k, v, block_size, q_block_size)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants q (B,L,H,D), k/v (B,S,H,D); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention shapes disagree: q {q.shape} (B,L,H,D), k {k.shape}, v {v.shape} (B,S,H,D); "
            "batch, heads and head dim must match and k, v must have the same shape"
        )


def _map_query_chunks(fn, q_blhd, q_block_size):
    """fn over query chunks of q_block_size (padded with zero queries, sliced off), checkpointed per chunk."""
    length = q_blhd.shape[1]
    if q_block_size is None or length <= q_block_size:
        return fn(q_blhd)
    n = -(-length // q_block_size)
    q_pad = jnp.pad(q_blhd, ((0, 0), (0, n * q_block_size - length), (0, 0), (0, 0)))
    chunks = rearrange(q_pad, "b (n c) h d -> n b c h d", n=n)
    out = lax.map(jax.checkpoint(fn), chunks)
    return rearrange(out, "n b c h d -> b (n c) h d")[:, :length]


def _key_mask(start, size, kv_valid):
    """(size,) bool: which keys start..start+size-1 are real (index < kv_valid)."""
    return lax.iota(jnp.int32, size) + start < kv_valid


def _dense_chunk(q_blhd, k, v, kv_valid):
    """Exact softmax over all keys; heads-first layout and pre-scaled q let XLA:CPU fuse dot-softmax-dot."""
    scale = q_blhd.shape[-1] ** -0.5
    q_bhld = rearrange(q_blhd * jnp.asarray(scale, q_blhd.dtype), "b l h d -> b h l d")
    k_bhsd, v_bhsd = (rearrange(x, "b s h d -> b h s d") for x in (k, v))
    s = jnp.einsum("bhld,bhsd->bhls", q_bhld, k_bhsd, preferred_element_type=jnp.float32)
    if kv_valid is not None:
        s = jnp.where(_key_mask(0, s.shape[-1], kv_valid), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhls,bhsd->bhld", p, v_bhsd, preferred_element_type=jnp.float32)
    return rearrange(o, "b h l d -> b l h d").astype(q_blhd.dtype)


def _blocks(x_bnhd, size, n):
    """(B, N, H, D) -> (n, B, H, size, D): zero-padded to n * size along N, split into n blocks, heads first."""
    x_bnhd = jnp.pad(x_bnhd, ((0, 0), (0, n * size - x_bnhd.shape[1]), (0, 0), (0, 0)))
    return rearrange(x_bnhd, "b (n c) h d -> n b h c d", n=n)


def _vary_like(x, *like):
    """x, varying (inside shard_map) over every mesh axis that x or one of `like` varies over; same values."""
    return x + sum(jnp.zeros_like(y, x.dtype, shape=()) for y in like)


def _full(shape, value, *like, dtype=jnp.float32):
    """Constant of `shape` that varies over the mesh axes `like` vary over (inside shard_map), so that it can start
    a loop carry the body makes depend on them."""
    return _vary_like(jnp.full(shape, value, dtype), *like)


def _tiles(q, k, block_size, q_block_size):
    """(key block, full key blocks, keys in the last partial block, query chunk, query chunks).

    q_block_size None: the largest power-of-two chunk (>= 16) whose fp32 score tile B*H*chunk*block stays within
    _TILE_BYTES.
    """
    b, length, h, _ = q.shape
    num_keys = k.shape[1]
    block = min(block_size, num_keys)
    if q_block_size is None:
        q_block_size = max(16, 2 ** int(math.log2(max(_TILE_BYTES // (b * h * block * 4), 1))))
    q_block = min(q_block_size, length)
    return block, num_keys // block, num_keys % block, q_block, -(-length // q_block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, block_size, q_block_size):
    """Blockwise softmax attention with a recomputing backward (FlashAttention-2 scheme): `_flash_fwd`, `_flash_bwd`.

    Every key is real (callers slice padding off). Keys are read in blocks by dynamic slicing inside the loops (a
    tail block of S % block keys is one extra step), queries in zero-padded chunks. Memory: both passes hold one
    (query chunk x key block) score tile at a time; the backward keeps only q, k, v, the output and the per-query
    log-sum-exp from the forward.
    """
    return _flash_fwd(q, k, v, block_size, q_block_size)[0]


def _flash_fwd(q, k, v, block_size, q_block_size):
    o, lse_chunks, _ = _online_softmax(q, k, v, block_size, q_block_size)
    return o, (q, k, v, o, lse_chunks)


def _online_softmax(q, k, v, block_size, q_block_size, tangents=None):
    """Per query chunk (lax.map), a loop over key blocks with an online (running max / sum) softmax in fp32.

    Returns (o, per-chunk log-sum-exp, do): do is the output tangent for `tangents` = (dq, dk, dv) (None without).
    With S = scale q k^T, P = softmax(S), dS = scale (dq k^T + q dk^T), the tangent is
    do = sum_j P_j (dv_j + dS_j v_j) - (sum_j P_j dS_j) o: two more running sums, num_v and num_s, over the same
    unnormalised e^(S - m) tiles and rescaled with the running max like the primal's.
    """
    block, n_full, rem, q_block, nq = _tiles(q, k, block_size, q_block_size)
    scale = q.shape[-1] ** -0.5
    chunks = (_blocks(q * jnp.asarray(scale, q.dtype), q_block, nq),)
    like = (q, k, v)
    if tangents is not None:
        dq, dk, dv = tangents
        chunks += (_blocks(dq * jnp.asarray(scale, dq.dtype), q_block, nq),)
        like += tuple(tangents)

    def chunk(xs):
        q_c = xs[0]

        def step(carry, start, size):
            (m, total, acc), tan = carry
            k_b, v_b = (lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (k, v))
            s = jnp.einsum("bhld,bshd->bhls", q_c, k_b, preferred_element_type=jnp.float32)
            m_new = jnp.maximum(m, s.max(-1))  # finite after the first block: every key is real
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bhls,bshd->bhld", p.astype(v.dtype), v_b, preferred_element_type=jnp.float32)
            primal = (m_new, total * alpha + p.sum(-1), acc * alpha[..., None] + pv)
            if tangents is None:
                return primal, tan
            num_v, num_s = tan
            dk_b, dv_b = (lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (dk, dv))
            ds = jnp.einsum("bhld,bshd->bhls", xs[1], k_b, preferred_element_type=jnp.float32) + jnp.einsum(
                "bhld,bshd->bhls", q_c, dk_b, preferred_element_type=jnp.float32
            )
            p_ds = p * ds
            dpv = jnp.einsum("bhls,bshd->bhld", p.astype(dv.dtype), dv_b, preferred_element_type=jnp.float32)
            dpv += jnp.einsum("bhls,bshd->bhld", p_ds.astype(v.dtype), v_b, preferred_element_type=jnp.float32)
            return primal, (num_v * alpha[..., None] + dpv, num_s * alpha + p_ds.sum(-1))

        rows = q_c.shape[:-1]
        carry = (_full(rows, -jnp.inf, q_c, k, v), _full(rows, 0.0, q_c, k, v), _full(q_c.shape, 0.0, q_c, k, v))
        tan = () if tangents is None else (_full(q_c.shape, 0.0, *xs, *like), _full(rows, 0.0, *xs, *like))
        carry = lax.fori_loop(0, n_full, lambda j, c: step(c, j * block, block), (carry, tan))
        if rem:
            carry = step(carry, n_full * block, rem)
        (m, total, acc), tan = carry
        o = acc / total[..., None]
        if tangents is None:
            return o.astype(q.dtype), m + jnp.log(total), ()
        num_v, num_s = tan
        do = (num_v - num_s[..., None] * o) / total[..., None]
        return o.astype(q.dtype), m + jnp.log(total), do.astype(q.dtype)

    o_chunks, lse_chunks, do_chunks = lax.map(chunk, chunks)
    unchunk = lambda x: rearrange(x, "n b h c d -> b (n c) h d")[:, : q.shape[1]]  # noqa: E731
    return unchunk(o_chunks), lse_chunks, None if tangents is None else unchunk(do_chunks)


def _flash_bwd(block_size, q_block_size, res, do):
    """Loop over key blocks (outer) and query chunks (inner); each step recomputes one score tile from q, k and the
    saved log-sum-exp. dq accumulates in fp32 over key blocks, dk / dv of a key block in fp32 over query chunks."""
    q, k, v, o, lse_chunks = res
    block, n_full, rem, q_block, nq = _tiles(q, k, block_size, q_block_size)
    scale, dt = q.shape[-1] ** -0.5, q.dtype
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # rowsum(dP * P)
    q_chunks, do_chunks = _blocks(q * jnp.asarray(scale, dt), q_block, nq), _blocks(do.astype(dt), q_block, nq)
    delta_chunks = _blocks(delta, q_block, nq)[..., 0]

    def key_block(carry, start, size):
        dq_chunks, dk, dv = carry
        k_b, v_b = (lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (k, v))

        def query_chunk(acc, ys):
            q_c, do_c, lse_c, delta_c, dq_c = ys
            s = jnp.einsum("bhld,bshd->bhls", q_c, k_b, preferred_element_type=jnp.float32)
            p = jnp.exp(s - lse_c[..., None])
            dp = jnp.einsum("bhld,bshd->bhls", do_c, v_b, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_c[..., None])).astype(dt)
            dk_b = acc[0] + jnp.einsum("bhls,bhld->bshd", ds, q_c, preferred_element_type=jnp.float32)
            dv_b = acc[1] + jnp.einsum("bhls,bhld->bshd", p.astype(dt), do_c, preferred_element_type=jnp.float32)
            return (dk_b, dv_b), dq_c + jnp.einsum("bhls,bshd->bhld", ds, k_b, preferred_element_type=jnp.float32)

        zeros = _full(k_b.shape, 0.0, q, k, v, do)
        (dk_b, dv_b), dq_chunks = lax.scan(
            query_chunk, (zeros, zeros), (q_chunks, do_chunks, lse_chunks, delta_chunks, dq_chunks)
        )
        dk, dv = (
            lax.dynamic_update_slice_in_dim(x, x_b.astype(x.dtype), start, axis=1)
            for x, x_b in ((dk, dk_b), (dv, dv_b))
        )
        return dq_chunks, dk, dv

    carry = (
        _full(q_chunks.shape, 0.0, q, k, v, do),
        _full(k.shape, 0.0, q, k, v, do, dtype=k.dtype),
        _full(v.shape, 0.0, q, k, v, do, dtype=v.dtype),
    )
    carry = lax.fori_loop(0, n_full, lambda j, c: key_block(c, j * block, block), carry)
    if rem:
        carry = key_block(carry, n_full * block, rem)
    dq_chunks, dk, dv = carry
    dq = rearrange(dq_chunks * scale, "n b h c d -> b (n c) h d")[:, : q.shape[1]].astype(q.dtype)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _flash_jvp(q, k, v, block_size, q_block_size):
    """`_flash`'s forward pass with forward-mode autodiff instead of the custom VJP ("blockwise_jvp").

    The JVP rule runs `_online_softmax` once with the tangents: output and output tangent from the same loop over
    key blocks, one (query chunk x key block) score tile and its tangent at a time. Reverse mode (jax.grad,
    jax.vjp) works by JAX linearising and transposing that rule: correct, but the transposed loops save every score
    tile of the forward, i.e. dense attention's (L x S) memory; train with "blockwise" instead.
    """
    return _online_softmax(q, k, v, block_size, q_block_size)[0]


@_flash_jvp.defjvp
def _flash_jvp_rule(block_size, q_block_size, primals, tangents):
    o, _, do = _online_softmax(*primals, block_size, q_block_size, tangents=tangents)
    return o, do


def _splash(q, k, v, kv_valid, interpret=False):
    """TPU splash attention (per-example kernel vmapped over batch); L, S padded to the 128 block, padded keys masked
    through segment ids. interpret=True runs the Pallas kernel in interpret mode (any backend, slow; for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, length, h, d = q.shape
    num_keys = k.shape[1]
    kv_valid = num_keys if kv_valid is None else kv_valid
    block = 128
    lp, sp = -(-length // block) * block, -(-num_keys // block) * block
    q_bhld = rearrange(
        jnp.pad(q * jnp.asarray(d**-0.5, q.dtype), ((0, 0), (0, lp - length), (0, 0), (0, 0))), "b l h d -> b h l d"
    )
    k_bhsd, v_bhsd = (
        rearrange(jnp.pad(x, ((0, 0), (0, sp - num_keys), (0, 0), (0, 0))), "b s h d -> b h s d") for x in (k, v)
    )
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.FullMask((lp, sp))] * h),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sk.BlockSizes.get_default(),
        interpret=interpret,
    )
    segments = sk.SegmentIds(
        q=jnp.zeros((lp,), jnp.int32), kv=jnp.where(jnp.arange(sp) < kv_valid, 0, 1).astype(jnp.int32)
    )
    o = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(q_bhld, k_bhsd, v_bhsd)
    return rearrange(o, "b h l d -> b l h d")[:, :length].astype(q.dtype)


__all__ = ["IMPLS", "attention", "resolve_impl"]
