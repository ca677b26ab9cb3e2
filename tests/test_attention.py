"""Attention kernels vs a float64 numpy softmax reference (values and gradients), blockwise memory, seq sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.networks import attention as attn


def _reference(q, k, v, g):
    """Output and (dq, dk, dv) of sum(g * softmax(q k^T / sqrt(D)) v), by hand in float64."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhls,bshd->blhd", p, v)
    dp = np.einsum("blhd,bshd->bhls", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(q.shape[-1])
    return o, (
        np.einsum("bhls,bshd->blhd", ds, k),
        np.einsum("bhls,blhd->bshd", ds, q),
        np.einsum("bhls,blhd->bshd", p, g),
    )


def _inputs(seed, b, length, num_keys, h, d):
    rng = np.random.default_rng(seed)
    q, g = (rng.standard_normal((b, length, h, d), dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, num_keys, h, d), dtype=np.float32) for _ in range(2))
    return q, k, v, g


SHAPES = [(2, 37, 37, 3, 16), (1, 40, 130, 2, 32), (2, 70, 9, 2, 8)]  # self, cross (S % block != 0), short text
CASES = [
    ("xla", {}),
    ("einsum", {}),
    ("einsum", {"q_block_size": 16}),
    ("blockwise", {"block_size": 32}),
    ("blockwise", {"block_size": 512}),
    ("blockwise", {"block_size": 16, "q_block_size": 24}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl,kwargs", CASES)
def test_matches_reference_values_and_grads(shape, impl, kwargs):
    q, k, v, g = _inputs(0, *shape)
    o_ref, grads_ref = _reference(q, k, v, g)
    fn = jax.jit(lambda q, k, v, g: jax.vjp(lambda *a: attn.attention(*a, impl=impl, **kwargs), q, k, v)[1](g))
    o = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl=impl, **kwargs))(q, k, v)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
    for got, want in zip(fn(q, k, v, g), grads_ref):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)


def test_auto_picks_einsum_on_cpu_and_bad_input_raises():
    assert attn.resolve_impl("auto") == "einsum"
    q, k, v, _ = _inputs(0, 1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="shapes disagree"):
        attn.attention(q, k[..., :2], v[..., :2])
    with pytest.raises(ValueError, match="TPU"):
        attn.attention(q, k, v, impl="splash")


def test_splash_kernel_in_interpret_mode_with_padding():
    """The TPU path's layout, scaling and key padding, run through Pallas' interpreter on CPU."""
    q, k, v, g = _inputs(1, 1, 20, 150, 2, 16)
    o_ref, _ = _reference(q, k, v, g)
    np.testing.assert_allclose(attn._splash(q, k, v, kv_valid=None, interpret=True), o_ref, atol=2e-5, rtol=1e-4)


def test_blockwise_fwd_bwd_never_holds_full_score_matrix():
    """Compiled (not run) fwd+bwd temp memory: below one L x S fp32 buffer and linear, not quadratic, in L."""

    def temp_bytes(impl, length):
        x = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
        loss = lambda q, k, v: attn.attention(q, k, v, impl=impl, block_size=512).sum()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes("blockwise", 4096), temp_bytes("blockwise", 8192)
    assert small < 4096 * 4096 * 4 and large < 8192 * 8192 * 4 / 2
    assert large < 2.2 * small
    assert temp_bytes("xla", 4096) >= 4096 * 4096 * 4  # the measure sees a dense kernel's score matrix


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("length,num_keys,block,q_block", [(50, 77, 16, 16), (33, 64, 32, None), (9, 5, 512, 4)])
def test_blockwise_custom_vjp_matches_dense(dtype, tol, length, num_keys, block, q_block):
    """The recomputing backward (query chunks x key blocks, tail block, padded query chunk) gives dense attention's
    value and gradients, in fp32 and in bf16 (dense reference on the same bf16-rounded inputs, computed in fp32)."""
    q, k, v, g = (jnp.asarray(x, dtype) for x in _inputs(3, 2, length, num_keys, 2, 16))

    def vjp(impl, cast, **kw):
        f = lambda q, k, v: attn.attention(*(x.astype(cast) for x in (q, k, v)), impl=impl, **kw).astype(jnp.float32)
        o, pullback = jax.vjp(f, q, k, v)
        return (o,) + pullback(g.astype(jnp.float32))

    got = jax.jit(lambda: vjp("blockwise", dtype, block_size=block, q_block_size=q_block))()
    want = jax.jit(lambda: vjp("xla", jnp.float32))()
    for a, b in zip(got, want):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale, rtol=tol)


def test_blockwise_padded_keys_are_dropped_and_get_no_gradient():
    """kv_valid (the seq-parallel key padding): equal to attention over the real keys; padded keys' grads are 0."""
    q, k, v, g = _inputs(4, 1, 12, 20, 2, 8)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 6), (0, 0), (0, 0)), constant_values=3.0)
    f = lambda q, k, v: attn._attention(q, k, v, "blockwise", 8, 8, kv_valid=20)

    @jax.jit
    def run(q, k, v):
        o, pullback = jax.vjp(f, q, k, v)
        return o, pullback(jnp.asarray(g))

    o, (dq, dk, dv) = run(q, pad(k), pad(v))
    o_ref, (dq_ref, dk_ref, dv_ref) = _reference(q, k, v, g)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
    for got, want in ((dq, dq_ref), (dk[:, :20], dk_ref), (dv[:, :20], dv_ref)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
    assert not np.any(dk[:, 20:]) and not np.any(dv[:, 20:])


def test_blockwise_backward_memory_is_one_tile_not_one_query_row_block():
    """With query chunks, the compiled fwd+bwd temp memory stays near the O(L*D) tensors (q, k, v, o, grads): far
    below one (all queries x key block) fp32 score block, which a backward without query chunking holds."""
    length, d, block = 8192, 32, 2048
    x = jax.ShapeDtypeStruct((1, length, 1, d), jnp.float32)

    def temp_bytes(q_block):
        loss = lambda q, k, v: attn.attention(q, k, v, impl="blockwise", block_size=block, q_block_size=q_block).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    chunked, unchunked = temp_bytes(256), temp_bytes(length)
    assert unchunked >= length * block * 4  # the score block of every query
    assert chunked < 16 * length * d * 4 <= length * block * 4 / 4
