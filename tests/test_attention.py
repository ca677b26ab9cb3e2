"""Attention kernels vs a float64 numpy softmax reference (values and gradients), the blockwise kernels' memory and
custom derivatives (VJP of "blockwise", JVP of "blockwise_jvp"), padded keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.models.cosmos_dit import attention as attn


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


@pytest.mark.parametrize(
    "dtype,num_keys,kv_valid,block,q_block",
    [
        (jnp.float32, 26, 20, 8, 8),
        (jnp.float32, 26, 20, 7, None),
        (jnp.float32, 13, None, 4, 16),
        (jnp.float32, 26, None, 512, 5),
        (jnp.bfloat16, 40, 33, 16, 24),
    ],
)
def test_blockwise_jvp_matches_einsum_jvp(dtype, num_keys, kv_valid, block, q_block):
    """jax.jvp of "blockwise_jvp" (output tangent accumulated over key blocks) equals jax.jvp of the dense "einsum"
    softmax (JAX's own forward mode), value and tangent, with padded keys (kv_valid; padding = 3.0 so a leak shows),
    key blocks that do not divide the keys, padded query chunks and one single-block case. fp32: 1e-5 (relative,
    and absolute times the largest entry); bf16 inputs vs the fp32 dense JVP of the same bf16-rounded inputs: 2e-2."""
    rng = np.random.default_rng(5)
    q, dq = (jnp.asarray(rng.standard_normal((2, 19, 2, 16)), dtype) for _ in range(2))
    k, v, dk, dv = (jnp.asarray(rng.standard_normal((2, num_keys, 2, 16)), dtype) for _ in range(4))
    if kv_valid is not None:  # keys past kv_valid are padding: large values in them must not reach o or its tangent
        k, v, dk, dv = (x.at[:, kv_valid:].set(3.0) for x in (k, v, dk, dv))

    def jvp(impl, cast, block_size=512, q_block_size=None):
        f = lambda *a: attn._attention(*(x.astype(cast) for x in a), impl, block_size, q_block_size, kv_valid)
        return jax.jvp(lambda *a: f(*a).astype(jnp.float32), (q, k, v), (dq, dk, dv))

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got = jax.jit(lambda: jvp("blockwise_jvp", dtype, block, q_block))()
    want = jax.jit(lambda: jvp("einsum", jnp.float32))()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.max(jnp.abs(b))), rtol=tol)


def test_blockwise_jvp_never_holds_full_score_matrix():
    """Compiled (not run) jax.jvp temp memory of "blockwise_jvp": below one L x S fp32 score buffer and linear in L,
    where the dense ("xla") JVP holds at least the scores and their tangent."""

    def temp_bytes(impl, length):
        x = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
        f = lambda q, k, v: attn.attention(q, k, v, impl=impl, block_size=512)
        jvp = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))
        return jvp.lower(*[x] * 6).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes("blockwise_jvp", 4096), temp_bytes("blockwise_jvp", 8192)
    assert small < 4096 * 4096 * 4 and large < 8192 * 8192 * 4 / 2 and large < 2.2 * small
    assert temp_bytes("xla", 4096) >= 2 * 4096 * 4096 * 4


def test_blockwise_jvp_reverse_mode_is_the_transposed_jvp():
    """jax.vjp of "blockwise_jvp" (no custom VJP: JAX linearises and transposes the JVP rule) gives the float64
    reference output and gradients; only its memory is dense-like (see the module doc)."""
    q, k, v, g = _inputs(8, 1, 40, 130, 2, 32)
    o_ref, grads_ref = _reference(q, k, v, g)
    f = lambda q, k, v: attn.attention(q, k, v, impl="blockwise_jvp", block_size=16, q_block_size=24)

    @jax.jit
    def run(q, k, v):
        o, pullback = jax.vjp(f, q, k, v)
        return o, pullback(jnp.asarray(g))

    o, grads = run(q, k, v)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
