"""The trainer: what each update may change, non-finite skips, loss decrease, sharded == unsharded, config errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill import data, data_kinds, toy
from trigflow_distill.common import sharding
from trigflow_distill.core import optim
from trigflow_distill.methods import dmd2, train_state
from trigflow_distill.training import builder, loop, run_config

import predict25_4step  # configs/ is on the pytest pythonpath

BATCH = 8


def tiny_config(teacher_path, **overrides):
    c = predict25_4step.get_config("tiny")
    c.teacher.path = str(teacher_path)
    c.data.batch_size = BATCH
    c.total_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.sample_every = 0
    c.eval.at_end = False
    c.mesh.data = 1
    c.critic_optim.lr = 1e-3
    for k, v in overrides.items():
        section, _, field = k.rpartition(".")
        (c[section] if section else c)[field] = v
    return c


@pytest.fixture(scope="module")
def setup(teacher_pt, tmp_path_factory):
    config = tiny_config(teacher_pt)
    workdir = str(tmp_path_factory.mktemp("run"))
    net_config, teacher = builder.load_teacher(config, workdir)
    algo = dmd2.algo_from_config(config, net_config)
    student_tx, critic_tx = train_state.make_optimizers(config)
    state = jax.jit(functools.partial(train_state.init_state, student_tx=student_tx, critic_tx=critic_tx, seed=0))(
        teacher
    )
    critic_fn, student_fn = dmd2.make_update_fns(algo, student_tx, critic_tx, optim.ema_gamma(0.1))
    source = toy.RecordSource(toy.make_world())
    records = [source[i] for i in range(BATCH)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in records])) for k in records[0]}
    return dict(
        config=config,
        teacher=teacher,
        state=state,
        critic=critic_fn,
        student=student_fn,
        batch=batch,
        algo=algo,
        student_tx=student_tx,
    )


def _copy(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_critic_update_changes_only_the_critic(setup):
    before, teacher_before = _copy(setup["state"]), _copy(setup["teacher"])
    state, m = setup["critic"](jax.tree.map(jnp.array, setup["state"]), setup["teacher"], setup["batch"])
    after = _copy(state)
    assert np.isfinite(float(m["critic/loss"])) and float(m["critic/skipped"]) == 0
    assert _changed(before.critic, after.critic) and _changed(before.critic_opt, after.critic_opt)
    for name in ("student", "student_ema", "student_opt"):
        assert not _changed(getattr(before, name), getattr(after, name)), name
    assert int(after.step) == 1 and int(after.student_updates) == 0
    assert not _changed(teacher_before, _copy(setup["teacher"]))


def test_student_update_changes_only_student_and_ema(setup):
    before, teacher_before = _copy(setup["state"]), _copy(setup["teacher"])
    state, m = setup["student"](jax.tree.map(jnp.array, setup["state"]), setup["teacher"], setup["batch"])
    after = _copy(state)
    assert np.isfinite(float(m["student/loss"])) and float(m["student/skipped"]) == 0
    assert _changed(before.student, after.student) and _changed(before.student_ema, after.student_ema)
    assert not _changed(before.critic, after.critic) and not _changed(before.critic_opt, after.critic_opt)
    assert int(after.student_updates) == 1
    # beta counts the updates before this one (docs/algorithm.md §13): beta(0) = 0, the EMA is the new student.
    for e, s in zip(jax.tree.leaves(after.student_ema), jax.tree.leaves(after.student)):
        np.testing.assert_array_equal(e, s)
    assert not _changed(teacher_before, _copy(setup["teacher"]))


def test_non_finite_batch_skips_the_update(setup):
    bad = dict(setup["batch"], latents=setup["batch"]["latents"].at[0, 0, 0, 0, 0].set(jnp.inf))
    bad["num_cond_frames"] = jnp.full((BATCH,), 1, jnp.int32)  # the inf sits in a conditional frame: reaches all nets
    before = _copy(setup["state"])
    state, m = setup["critic"](jax.tree.map(jnp.array, setup["state"]), setup["teacher"], bad)
    after = _copy(state)
    assert float(m["critic/skipped"]) == 1.0
    assert not _changed(before.critic, after.critic) and not _changed(before.critic_opt, after.critic_opt)
    assert int(after.consecutive_skips) == 1 and int(after.total_skips) == 1 and int(after.step) == 1


def test_skipped_student_update_does_not_advance_the_ema_count(setup):
    """A skipped (non-finite) student update leaves the student, its optimizer, the EMA and the EMA's update count
    n as they were, so the next good update averages with beta(n) of the updates actually applied (docs/algorithm.md
    §6). Cosmos' reference never skips: it zeroes non-finite gradients and counts n from the iteration number."""
    bad = dict(setup["batch"], latents=setup["batch"]["latents"].at[0, 0, 0, 0, 0].set(jnp.inf))
    bad["num_cond_frames"] = jnp.full((BATCH,), 1, jnp.int32)
    gamma = optim.ema_gamma(0.1)
    algo = dataclasses.replace(setup["algo"], ema_start=0)  # the reference's EMA (the tiny recipe delays it)
    student = jax.jit(functools.partial(dmd2.student_update, algo, setup["student_tx"], gamma))
    state, _ = student(jax.tree.map(jnp.array, setup["state"]), setup["teacher"], setup["batch"])
    good = _copy(state)
    state, m = student(state, setup["teacher"], bad)
    assert float(m["student/skipped"]) == 1.0 and int(state.student_updates) == 1
    for name in ("student", "student_opt", "student_ema"):
        assert not _changed(getattr(good, name), _copy(getattr(state, name))), name
    state, m = student(state, setup["teacher"], setup["batch"])
    assert float(m["student/skipped"]) == 0.0 and int(state.student_updates) == 2
    beta = float(optim.ema_beta(1, gamma))  # (1/2)^(gamma+1) = 0.0041: the EMA keeps a little of update 1
    leaves = [jax.tree.leaves(t) for t in (state.student_ema, good.student_ema, state.student)]
    for e_new, e_old, p in zip(*leaves):
        expected = beta * np.asarray(e_old, np.float64) + (1 - beta) * np.asarray(p, np.float64)
        np.testing.assert_allclose(e_new, expected, rtol=1e-6, atol=1e-9)
    assert _changed(leaves[0], leaves[2])  # beta > 0: the EMA is not the student (beta(2) would differ too)


def test_critic_loss_decreases(setup):
    """Critic-only training against a fixed student: the fake-score fit improves on a fixed draw (step-0 keys)."""
    state = jax.tree.map(jnp.array, setup["state"])

    def loss_on_fixed_draws(state):  # the update reports the loss before it applies the step
        return np.mean(
            [
                float(
                    setup["critic"](
                        jax.tree.map(jnp.array, state).replace(step=jnp.int32(s)), setup["teacher"], setup["batch"]
                    )[1]["critic/loss"]
                )
                for s in range(4)
            ]
        )

    before = loss_on_fixed_draws(state)
    for _ in range(30):
        state, _ = setup["critic"](state, setup["teacher"], setup["batch"])
    after = loss_on_fixed_draws(state)
    print(f"critic loss on fixed draws: before {before:.4f}, after 30 steps {after:.4f}")
    assert after < 0.9 * before


@pytest.mark.slow
def test_sharded_equals_unsharded(teacher_pt, tmp_path):
    """Two steps (student, critic) on one device vs FSDP over 8 simulated devices: equal within fp32 tolerance."""
    results = []
    for mesh_cfg in ({"data": 1, "fsdp": 1}, {"data": 2, "fsdp": 4}):
        config = tiny_config(teacher_pt)
        devices = jax.devices()[: int(np.prod(list(mesh_cfg.values())))]
        mesh = sharding.make_mesh(mesh_cfg, devices=devices)
        net_config, teacher = builder.load_teacher(config, str(tmp_path))
        run = builder.build(config, net_config, teacher, mesh)
        fns, teacher = (run.critic_step, run.student_step), run.teacher
        state = run.init(teacher)
        source = toy.RecordSource(toy.make_world())
        records = [source[i] for i in range(BATCH)]
        batch = sharding.global_batch({k: np.stack([r[k] for r in records]) for k in records[0]}, BATCH, mesh)
        state, _ = fns[1](state, teacher, batch)
        state, _ = fns[0](state, teacher, batch)
        results.append(_copy(state))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_missing_teacher_path_is_a_clear_error():
    config = predict25_4step.get_config("")
    with pytest.raises(ValueError, match="huggingface.co/nvidia/Cosmos-Predict2.5-2B"):
        run_config.validate_config(config)
    config.teacher.path = "/nonexistent/teacher.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_config.validate_config(config)


def test_bad_config_values_are_rejected(teacher_pt):
    with pytest.raises(ValueError, match="cond_frame_probs"):
        run_config.validate_config(tiny_config(teacher_pt, **{"distill.cond_frame_probs": (0.5, 0.2)}))
    with pytest.raises(ValueError, match="data.kind"):
        data_kinds.get(tiny_config(teacher_pt, **{"data.kind": "imagenet"}))
    with pytest.raises(ValueError, match="data.path"):
        run_config.validate_config(tiny_config(teacher_pt, **{"data.kind": "dir"}))


def test_samples_use_one_fixed_validation_batch(teacher_pt, tmp_path):
    """Every sample call sees the dataset's first batch (the same at every step), not the batch just trained on."""
    config = tiny_config(teacher_pt, sample_every=2, total_steps=4, **{"mesh.data": -1})
    source = toy.RecordSource(toy.make_world())
    seen = []

    def write_samples(x, batch, path, writer):
        seen.append((x.shape, batch["latents"]))

    loop.train(config, str(tmp_path / "run"), source, write_samples)
    first = next(data.make_iterator(source, BATCH, int(config.data.seed)))
    assert len(seen) == 2
    for shape, latents in seen:
        assert shape == first["latents"].shape
        np.testing.assert_array_equal(latents, first["latents"])
