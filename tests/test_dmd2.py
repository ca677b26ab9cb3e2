"""The DMD2 method at its edges (docs/algorithm.md §3, §13): EDM teachers, projected-context data, padding masks,
lambda per frame chunk, the two backward simulations."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trigflow_distill.core import losses, optim, sampling, trigflow
from trigflow_distill.data import format as data_format
from trigflow_distill.methods import dmd2, train_state, video2world
from trigflow_distill.models import cosmos_dit
from trigflow_distill.training import builder, run_config

import predict25_4step  # configs/ is on the pytest pythonpath

NET = cosmos_dit.get_preset("tiny", num_blocks=1)
B = 2


@pytest.fixture(scope="module")
def teacher():
    params = cosmos_dit.init_params(NET, jax.random.PRNGKey(0))
    # Non-zero AdaLN outputs and projection bias, so every path (and GELU(b)) matters.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jnp.asarray(0.05 * rng.standard_normal(a.shape), jnp.float32)
            if "linear_2" in str(p) or "bias" in str(p)
            else a
        ),
        params,
    )
    return builder.split_teacher(params)


def _batch(key, text_width=NET.crossattn_proj_in_channels, t=2):
    k = jax.random.split(key, 2)
    return {
        "latents": jax.random.normal(k[0], (B, 16, t, 4, 4)),
        "text": jax.random.normal(k[1], (B, 3, text_width)),
        "num_cond_frames": jnp.array([0, 1], jnp.int32),
    }


def _state(teacher, tx):
    return train_state.init_state(teacher, tx, tx, seed=0)


def _steps(algo, tx, teacher, batch, state):
    """A student update, then a critic update (one compiled function): (state after each)."""

    @jax.jit
    def both(state, teacher, batch):
        s1, m1 = dmd2.student_update(algo, tx, optim.EMA_GAMMA, state, teacher, batch)
        return (s1, m1), dmd2.critic_update(algo, tx, s1, teacher, batch)

    return both(state, teacher, batch)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_edm_teacher_training_steps_stay_finite_and_update(teacher):
    """The first student step evaluates tau = float32(pi/2), where float32 ln(tan) was NaN (§13)."""
    algo = dmd2.Algo(net_config=NET, scaling="edm", sim_steps=4)
    tx = optax.adam(1e-3)
    state = _state(teacher, tx)
    (s1, m1), (s2, m2) = _steps(algo, tx, teacher, _batch(jax.random.PRNGKey(1)), state)
    assert float(m1["student/skipped"]) == 0 and float(m2["critic/skipped"]) == 0
    assert np.isfinite(float(m1["student/loss"])) and np.isfinite(float(m2["critic/loss"]))
    for before, after in ((state.student, s1.student), (state.critic, s2.critic)):
        assert all(np.isfinite(a).all() for a in _leaves(after))
        assert any(not np.array_equal(a, b) for a, b in zip(_leaves(before), _leaves(after)))


def test_projected_context_dataset_gives_the_same_updates(teacher):
    """A dataset of projected context (B, L, D_out) and its raw twin (B, L, D_in): identical critic and student
    updates; the unconditional context of projected data is GELU(b), the projection of zeros (§7, §13)."""
    raw = _batch(jax.random.PRNGKey(2))
    proj = {"crossattn_proj": teacher["text_proj"]}
    projected = dict(raw, text=cosmos_dit.project_text(proj["crossattn_proj"], raw["text"]))
    algo = dmd2.Algo(net_config=NET)
    cond_raw, uncond_raw = video2world.contexts(algo, teacher, raw["text"])
    cond_proj, uncond_proj = video2world.contexts(algo, teacher, projected["text"])
    np.testing.assert_array_equal(uncond_proj, uncond_raw)
    np.testing.assert_allclose(cond_proj, cond_raw, rtol=1e-6, atol=1e-7)
    tx = optax.sgd(0.1)  # update = -lr * grad: equal updates mean equal gradients
    results = [_steps(algo, tx, teacher, b, _state(teacher, tx)) for b in (raw, projected)]
    (s1_raw, _), (s2_raw, _) = results[0]
    (s1_proj, _), (s2_proj, _) = results[1]
    for a, b in ((s1_raw.student, s1_proj.student), (s2_raw.critic, s2_proj.critic)):
        for x, y in zip(_leaves(a), _leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert cosmos_dit.text_kind(NET, 96) == "raw" and cosmos_dit.text_kind(NET, 64) == "projected"
    with pytest.raises(ValueError, match=r"50 wide, but this teacher takes 96 \(raw .* maps to 64\) or 64"):
        cosmos_dit.text_kind(NET, 50)
    with pytest.raises(ValueError, match=r"projected text embeddings are 96 wide"):  # what the dataset declares wins
        cosmos_dit.text_kind(NET, 96, "projected")


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_padding_mask_reaches_every_network_call(teacher, monkeypatch):
    calls = _spy(monkeypatch, video2world, "denoise")
    batch = dict(_batch(jax.random.PRNGKey(3)), padding_mask=jnp.zeros((B, 1, 32, 32)).at[:, :, :, 24:].set(1.0))
    algo = dmd2.Algo(net_config=NET)
    tx = optax.sgd(0.1)
    state = _state(teacher, tx)
    jax.eval_shape(functools.partial(dmd2.student_update, algo, tx, optim.EMA_GAMMA), state, teacher, batch)
    # backward simulation (loop body + last step), critic, teacher cond + uncond
    assert len(calls) >= 5
    jax.eval_shape(functools.partial(dmd2.critic_update, algo, tx), state, teacher, batch)
    assert all(c["padding_mask_b1hw"] is not None and c["padding_mask_b1hw"].shape == (B, 1, 32, 32) for c in calls)
    n = len(calls)
    jax.eval_shape(functools.partial(dmd2.critic_update, algo, tx), state, teacher, _batch(jax.random.PRNGKey(3)))
    assert len(calls) > n and all(c["padding_mask_b1hw"] is None for c in calls[n:])  # missing: zeros in the net


def test_lambda_frame_chunks_reaches_the_loss(teacher, monkeypatch):
    calls = _spy(monkeypatch, losses, "dmd_loss")
    config = predict25_4step.get_config("tiny")
    assert config.distill.lambda_frame_chunks == 1
    config.distill.lambda_frame_chunks = 2
    algo = dmd2.algo_from_config(config, NET)
    tx = optax.sgd(0.1)
    jax.eval_shape(
        functools.partial(dmd2.student_update, algo, tx, optim.EMA_GAMMA),
        _state(teacher, tx),
        teacher,
        _batch(jax.random.PRNGKey(4), t=4),
    )
    assert [c.get("lambda_frame_chunks") for c in calls] == [2]


def test_random_backward_simulation_draws_decreasing_times_and_fresh_noise():
    """NVlabs/rcm's backward simulation (docs/algorithm.md §3): tau_0 = pi/2, tau_j = min(tau_{j-1}, tau'_j) per
    sample with tau'_j shifted-uniform, fresh noise at every re-noise. A probe x0 function that returns its time
    input shows the times; one that returns zeros shows the noise (x = sin tau_j eps_j)."""
    key, b = jax.random.PRNGKey(7), 64
    eps = jax.random.normal(jax.random.PRNGKey(8), (b, 3))
    seen = []

    def probe(params, x, tau_b):
        seen.append((x, tau_b))
        return jnp.zeros_like(x) + tau_b[:, None]

    out = sampling.backward_simulation_random(probe, None, eps, 3, key, shift=5.0)
    # Independent reference: the same draws, written out.
    tau, taus = np.full(b, np.pi / 2, np.float32), [np.full(b, np.pi / 2, np.float32)]
    for j in range(2):
        k_tau, _ = jax.random.split(jax.random.fold_in(key, j))
        tau = np.minimum(tau, np.asarray(trigflow.sample_tau(k_tau, (b,), shift=5.0)))
        taus.append(tau)
    np.testing.assert_allclose(out[:, 0], taus[2], rtol=1e-6)
    assert np.all(np.diff(np.stack(taus), axis=0) <= 0) and np.any(np.diff(np.stack(taus), axis=0) < 0)
    assert len(np.unique(taus[2])) > b // 2  # per-sample times

    zero = lambda params, x, tau_b: jnp.zeros_like(x)  # noqa: E731
    x_in = []
    sampling.backward_simulation_random(lambda p, x, t: (x_in.append(x), zero(p, x, t))[1], None, eps, 2, key)
    k_tau, k_eps = jax.random.split(jax.random.fold_in(key, 0))
    tau1 = np.minimum(np.pi / 2, np.asarray(trigflow.sample_tau(k_tau, (b,), shift=5.0)))
    fresh = np.asarray(jax.random.normal(k_eps, eps.shape))
    np.testing.assert_allclose(x_in[-1], np.sin(tau1)[:, None] * fresh, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fresh, eps)
    # The fixed variant re-noises with eps itself on the schedule.
    fixed_in = []
    taus_fixed = sampling.student_schedule(4)
    sampling.backward_simulation(lambda p, x, t: (fixed_in.append(x), zero(p, x, t))[1], None, eps, 2, taus_fixed)
    np.testing.assert_allclose(fixed_in[-1], np.sin(taus_fixed[1]) * eps, rtol=1e-5, atol=1e-6)


def test_backward_simulation_option_reaches_both_updates(teacher):
    """distill.backward_simulation="random" changes the student's and the critic's samples (not the fixed runs:
    their draws are untouched), and the updates stay finite."""
    config = predict25_4step.get_config("tiny")
    assert config.distill.backward_simulation == "fixed"
    tx = optax.sgd(0.1)
    batch = _batch(jax.random.PRNGKey(5))
    out = {}
    for kind in ("fixed", "random"):
        config.distill.backward_simulation = kind
        algo = dataclasses.replace(dmd2.algo_from_config(config, NET), sim_steps=3)
        (s1, m1), (s2, m2) = _steps(algo, tx, teacher, batch, _state(teacher, tx))
        assert np.isfinite(float(m1["student/loss"])) and np.isfinite(float(m2["critic/loss"]))
        out[kind] = (float(m1["student/loss"]), float(m2["critic/loss"]))
    assert out["fixed"][0] != out["random"][0] and out["fixed"][1] != out["random"][1]
    config.distill.backward_simulation = "euler"
    with pytest.raises(ValueError, match="backward_simulation"):
        run_config.validate_config(config)


def test_lambda_chunks_that_do_not_divide_the_frames_fail_before_compiling(teacher):
    """distill.lambda_frame_chunks = 4 (the real recipe) on data with 5 latent frames: a one-line error naming the
    divisors, from the data check that runs before the mesh plan, not a trace from inside the loss."""
    spec = data_format.RecordSpec(latent_shape=(16, 5, 4, 4), text_shape=(3, NET.crossattn_proj_in_channels))
    source = types.SimpleNamespace(buckets=lambda: [("a", spec, 2)], text_kind=None)
    with pytest.raises(ValueError, match=r"lambda_frame_chunks=4 does not divide the data's 5 latent frames.*\[1, 5\]"):
        builder.check_source(source, NET, 4)
    builder.check_source(source, NET, 5)
