"""Optimizer chain against a numpy AdamW (torch.optim.AdamW semantics); power EMA constants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.core import optim


def test_ema_gamma_is_largest_root_of_the_cubic():
    gamma = optim.ema_gamma(0.1)
    assert gamma == pytest.approx(6.937204, abs=1e-6) and optim.EMA_GAMMA == gamma
    assert abs(gamma**3 + 7 * gamma**2 + (16 - 100) * gamma + (12 - 100)) < 1e-9
    with pytest.raises(ValueError, match="rate"):
        optim.ema_gamma(0.0)


def test_ema_beta_values():
    assert float(optim.ema_beta(0)) == 0.0
    assert float(optim.ema_beta(1)) == pytest.approx(0.0041, abs=5e-5)
    assert float(optim.ema_beta(100)) == pytest.approx(0.924, abs=5e-4)
    assert float(optim.ema_beta(1000)) == pytest.approx(0.992, abs=5e-4)
    assert float(optim.ema_beta(7)) == pytest.approx((7 / 8) ** (optim.EMA_GAMMA + 1), rel=1e-6)


def test_ema_update():
    ema = {"a": jnp.ones(3), "b": jnp.full((2,), 4.0, jnp.bfloat16)}
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2,), jnp.bfloat16)}
    new = jax.jit(optim.ema_update)(ema, params, 100)
    beta = float(optim.ema_beta(100))
    np.testing.assert_allclose(new["a"], beta, rtol=1e-6)
    assert new["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new["b"], np.float32), 4 * beta, rtol=1e-2)
    first = optim.ema_update(ema, params, 0)  # before any student update the EMA is the parameters
    np.testing.assert_array_equal(first["a"], params["a"])


def test_lr_multiplier_spec_values():
    assert float(optim.lr_multiplier(0)) == pytest.approx(1e-6, rel=1e-5)
    assert float(optim.lr_multiplier(50)) == pytest.approx(1e-6 + (0.99 - 1e-6) * 0.5, rel=1e-6)
    assert float(optim.lr_multiplier(100)) == pytest.approx(0.99, rel=1e-6)
    assert float(optim.lr_multiplier(6000)) == pytest.approx(0.4 + 0.59 * 394000 / 399900, rel=1e-6)
    assert float(optim.lr_multiplier(10**7)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="warmup"):
        optim.lr_multiplier(0, warmup=0)


def _numpy_adamw(params, grads_seq, lr, mult, b1=0.9, b2=0.999, eps=1e-8, wd=0.01, clip=1.0):
    """torch.optim.AdamW after zeroing non-finite grads and a global-norm clip."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for n, grads in enumerate(grads_seq):
        g = {k: np.where(np.isfinite(x), np.asarray(x, np.float64), 0.0) for k, x in grads.items()}
        norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        lr_n = lr * mult(n)
        for k, p_k in p.items():
            p[k] = p_k * (1 - lr_n * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** (n + 1)), v[k] / (1 - b2 ** (n + 1))
            p[k] = p[k] - lr_n * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_make_optimizer_matches_torch_style_adamw():
    warmup, max_steps, lr = 2, 10, 0.1

    def mult(n):
        return 1e-6 + (0.99 - 1e-6) * n / warmup if n < warmup else 0.4 + 0.59 * (max_steps - n) / (max_steps - warmup)

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads_seq = []
    for step in range(5):
        scale = 10.0 if step % 2 else 0.01  # alternate clipped and unclipped steps
        grads = {k: (scale * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
        if step == 3:
            grads["w"][1, 2] = np.nan
            grads["b"][0] = np.inf
        grads_seq.append(grads)

    opt = optim.make_optimizer(lr, warmup=warmup, max_steps=max_steps)
    state = opt.init(params)
    p = {k: jnp.asarray(x) for k, x in params.items()}

    @jax.jit
    def step(p, state, grads):
        updates, state = opt.update(grads, state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), state

    for grads in grads_seq:
        p, state = step(p, state, grads)
    expected = _numpy_adamw(params, grads_seq, lr, mult)
    for k in params:
        assert np.all(np.isfinite(np.asarray(p[k])))
        np.testing.assert_allclose(p[k], expected[k], rtol=1e-5, atol=1e-6)


def test_zero_nonfinite():
    tx = optim.zero_nonfinite()
    grads = {"a": jnp.array([1.0, jnp.nan, -jnp.inf, 2.0])}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(out["a"], [1.0, 0.0, 0.0, 2.0])


def test_ema_counts_the_updates_before_the_current_one():
    """Running the EMA over updates 1..k with n = k - 1 equals the closed-form power-EMA weights."""
    thetas = [np.float32(v) for v in (3.0, -1.0, 2.0, 5.0)]
    ema = {"w": jnp.float32(100.0)}  # arbitrary start: the first update (n = 0) must forget it entirely
    for n, theta in enumerate(thetas):
        ema = optim.ema_update(ema, {"w": jnp.float32(theta)}, n)
        if n == 0:
            assert float(ema["w"]) == thetas[0]
    expected = thetas[0]
    for n, theta in enumerate(thetas[1:], start=1):
        beta = (1 - 1 / (n + 1)) ** (optim.EMA_GAMMA + 1)
        expected = beta * expected + (1 - beta) * theta
    assert float(ema["w"]) == pytest.approx(expected, rel=1e-6)


def test_ema_start_delays_the_averaging():
    assert float(optim.ema_beta(5, start=5)) == 0.0  # the EMA still equals the student
    assert float(optim.ema_beta(7, start=5)) == pytest.approx(float(optim.ema_beta(2)), rel=1e-6)
    assert float(optim.ema_beta(7, start=0)) == pytest.approx(float(optim.ema_beta(7)), rel=1e-6)
