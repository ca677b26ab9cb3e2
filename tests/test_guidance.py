"""The guidance-conditioned student (docs/algorithm.md §15): at init it is the teacher for every scale, the scale
reaches the network once the projection moves, the DMD2 updates draw one scale per sample and use it in student,
critic and teacher alike, and the extra weight survives export and conversion under its documented name."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import predict25_4step
from trigflow_distill import methods
from trigflow_distill.core import losses, optim
from trigflow_distill.methods import dmd2, train_state
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import names as sdm
from trigflow_distill.training import builder, run_config

NET = cosmos_dit.get_preset("tiny", crossattn_proj_in_channels=None)
B, T, H, W, L = 2, 2, 4, 4, 5


def _inputs(key):
    kx, kc = jax.random.split(key)
    x = jax.random.normal(kx, (B, 16, T, H, W))
    context = jax.random.normal(kc, (B, L, NET.crossattn_emb_channels))
    return x, jnp.array([0.3, 0.9]), context


def test_at_init_the_conditioned_net_is_the_teacher_for_every_scale():
    teacher = cosmos_dit.init_params(NET, jax.random.key(0))
    student = cosmos_dit.add_guidance_embedder(teacher)
    x, t, context = _inputs(jax.random.key(1))
    want = cosmos_dit.velocity(NET, teacher, x, t, context)
    for s in (1.0, 2.5, 4.0, 6.0, jnp.array([1.0, 6.0])):
        np.testing.assert_array_equal(cosmos_dit.velocity(NET, student, x, t, context, guidance_b=s), want)


def test_the_scale_reaches_the_network_and_trains_the_projection():
    teacher = cosmos_dit.init_params(NET, jax.random.key(0))
    student = cosmos_dit.add_guidance_embedder(teacher)
    x, t, context = _inputs(jax.random.key(1))

    def loss(p, s):
        return jnp.mean(cosmos_dit.velocity(NET, p, x, t, context, guidance_b=s) ** 2)

    grad = jax.grad(loss)(student, jnp.array([2.0, 5.0]))[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"]
    assert float(jnp.abs(grad).max()) > 0  # the zero projection gets a gradient at init
    moved = {**student, cosmos_dit.GUIDANCE_EMBEDDER: {"linear": {"kernel": -grad / jnp.abs(grad).max()}}}
    out = {s: cosmos_dit.velocity(NET, moved, x, t, context, guidance_b=s) for s in (2.0, 6.0)}
    assert float(jnp.abs(out[2.0] - out[6.0]).mean()) > 1e-3
    # per-sample scales: sample i sees only its own
    both = cosmos_dit.velocity(NET, moved, x, t, context, guidance_b=jnp.array([2.0, 6.0]))
    np.testing.assert_allclose(both[0], out[2.0][0], atol=1e-6)
    np.testing.assert_allclose(both[1], out[6.0][1], atol=1e-6)


def test_missing_or_unexpected_scale_is_an_error():
    teacher = cosmos_dit.init_params(NET, jax.random.key(0))
    x, t, context = _inputs(jax.random.key(1))
    with pytest.raises(ValueError, match="guidance-conditioned student.*pass guidance_b"):
        cosmos_dit.velocity(NET, cosmos_dit.add_guidance_embedder(teacher), x, t, context)
    with pytest.raises(ValueError, match="no guidance embedder"):
        cosmos_dit.velocity(NET, teacher, x, t, context, guidance_b=4.0)


def _algo(guidance_range=(1.0, 6.0)):
    return dmd2.Algo(net_config=NET, guidance_range=guidance_range, cond_frame_probs=(0.5, 0.5))


def _batch(key):
    k1, k2 = jax.random.split(key)
    return {
        "latents": jax.random.normal(k1, (B, 16, T, H, W)),
        "text": jax.random.normal(k2, (B, L, NET.crossattn_emb_channels)),
    }


def _state(guidance_conditioned=True, lr=1e-3):
    teacher = builder.split_teacher(cosmos_dit.init_params(NET, jax.random.key(0)))
    tx = optim.make_optimizer(lr)
    return teacher, tx, train_state.init_state(teacher, tx, tx, seed=0, guidance_conditioned=guidance_conditioned)


def test_init_state_student_samples_equal_the_fixed_student_for_every_scale():
    teacher, _, state = _state()
    _, _, fixed = _state(guidance_conditioned=False)
    for name in ("student", "student_ema", "critic"):
        kernel = getattr(state, name)[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"]
        assert kernel.shape == (NET.model_channels,) * 2 and not np.any(kernel)
    batch, key = _batch(jax.random.key(2)), jax.random.key(3)
    want = dmd2.student_samples(_algo(None), fixed.student, teacher, batch, key)
    for s in (1.0, 4.0, 6.0):
        got = dmd2.student_samples(_algo(), state.student, teacher, batch, key, guidance=s)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="distilled at one scale"):
        dmd2.student_samples(_algo(None), fixed.student, teacher, batch, key, guidance=2.0)


def test_teacher_target_uses_each_samples_scale():
    teacher, _, _ = _state()
    algo = _algo()
    batch = _batch(jax.random.key(2))
    cond = algo.condition(algo, jax.random.key(4), teacher, batch)
    x, tau = jax.random.normal(jax.random.key(5), cond.shape), jnp.array([0.4, 1.1])
    s_b = jnp.array([1.5, 5.0])
    got = dmd2.teacher_cfg_x0(algo, cond, teacher, x, tau, s_b)
    c, u = cond.x0_fn(teacher["net"], x, tau), cond.x0_uncond_fn(teacher["net"], x, tau)
    for i in range(B):
        np.testing.assert_allclose(got[i], losses.cfg_x0(c, u, float(s_b[i]))[i], rtol=1e-6, atol=1e-6)
    draws = [dmd2.draw_guidance(algo, jax.random.key(k), 1000) for k in range(2)]
    assert all(float(d.min()) >= 1.0 and float(d.max()) <= 6.0 for d in draws)
    assert abs(float(draws[0].mean()) - 3.5) < 0.15 and not np.array_equal(draws[0], draws[1])
    assert dmd2.draw_guidance(_algo(None), jax.random.key(0), 4) is None


def test_updates_train_the_guidance_projection_of_student_and_critic():
    teacher, tx, state = _state()
    algo = _algo()
    critic_fn, student_fn = dmd2.make_update_fns(algo, tx, tx, optim.EMA_GAMMA)
    state, _ = critic_fn(state, teacher, _batch(jax.random.key(6)))
    assert np.any(state.critic[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"])
    assert not np.any(state.student[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"])
    state, metrics = student_fn(state, teacher, _batch(jax.random.key(7)))
    assert np.isfinite(float(metrics["student/loss"])) and int(state.student_updates) == 1
    assert np.any(state.student[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"])
    # after training, the student's samples depend on the scale
    batch, key = _batch(jax.random.key(8)), jax.random.key(9)
    sample = jax.jit(functools.partial(dmd2.student_samples, algo))  # one compile for both scales
    a, b = (sample(state.student, teacher, batch, key, guidance=jnp.float32(s)) for s in (1.0, 6.0))
    assert float(jnp.abs(a - b).max()) > 0


def _config(**distill):
    c = predict25_4step.get_config("tiny")
    c.distill.update(distill)
    return c


def test_config_switch_and_its_errors():
    assert predict25_4step.get_config().distill.guidance_conditioned is False  # the default recipe is unchanged
    algo = methods.algo_from_config(_config(guidance_conditioned=True), NET)
    assert algo.guidance_range == (1.0, 6.0)
    assert methods.algo_from_config(_config(), NET).guidance_range is None
    run_config.validate_config(_config(guidance_conditioned=True))
    for bad in ((1.0,), (6.0, 1.0), (0.0, 4.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="distill.guidance_range"):
            run_config.validate_config(_config(guidance_conditioned=True, guidance_range=bad))
    with pytest.raises(ValueError, match="guidance_conditioned=True is for distill.method='dmd2'"):
        methods.algo_from_config(_config(guidance_conditioned=True, method="rcm"), NET)


def test_export_keeps_the_guidance_weight_under_its_documented_name(tmp_path):
    from trigflow_distill.models.cosmos_dit import convert

    net = dataclasses.replace(cosmos_dit.get_preset("tiny"), guidance_embedder=True)
    params = jax.tree.map(np.asarray, cosmos_dit.init_params(net, jax.random.key(0)))
    kernel = np.asarray(jax.random.normal(jax.random.key(1), (net.model_channels,) * 2), np.float32)
    params[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"] = kernel
    sd = sdm.state_dict_from_params(params, net)
    assert sdm.GUIDANCE_WEIGHT == "guidance_embedder.linear.weight"
    np.testing.assert_array_equal(sd[sdm.GUIDANCE_WEIGHT], kernel.T)  # torch layout (out, in)
    assert sdm.infer_config({k: v.shape for k, v in sd.items()}) == dataclasses.replace(net, dtype="float32")
    convert.export_torch(params, net, tmp_path / "student.pt", dtype=np.float32)
    config, loaded = convert.load_torch_checkpoint(str(tmp_path / "student.pt"))
    assert config.guidance_embedder
    np.testing.assert_array_equal(loaded[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"], kernel)
    with pytest.raises(ValueError, match="no guidance input: export it in the native format"):
        convert.export_diffusers(params, net, tmp_path / "diffusers")
    # a fixed-guidance net has no such key, as before
    assert sdm.GUIDANCE_WEIGHT not in sdm.native_shapes(cosmos_dit.get_preset("tiny"))


def test_a_conditioned_runs_export_keeps_the_guidance_weight(tmp_path):
    """Workdir (a conditioned TrainState checkpoint) -> export.export_student -> .pt: the EMA's guidance projection
    is written under its documented name and read back by convert with a conditioned architecture."""
    from trigflow_distill.inference import export
    from trigflow_distill.models.cosmos_dit import convert
    from trigflow_distill.training import checkpoint

    net = cosmos_dit.get_preset("tiny")
    teacher_pt = tmp_path / "teacher.pt"
    convert.export_torch(cosmos_dit.init_params(net, jax.random.key(0)), net, teacher_pt, dtype=np.float32)
    config = _config(guidance_conditioned=True)
    config.teacher.path = str(teacher_pt)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _, teacher = builder.load_teacher(config, str(workdir))
    student_tx, critic_tx = train_state.make_optimizers(config)
    state = jax.jit(lambda t: train_state.init_state(t, student_tx, critic_tx, seed=0, guidance_conditioned=True))(
        teacher
    )
    kernel = np.asarray(jax.random.normal(jax.random.key(1), (net.model_channels,) * 2), np.float32)
    ema = {**state.student_ema, cosmos_dit.GUIDANCE_EMBEDDER: {"linear": {"kernel": jnp.asarray(kernel)}}}
    manager = checkpoint.make_manager(str(workdir), save_interval_steps=1)
    checkpoint.save(manager, 1, state.replace(student_ema=ema))
    checkpoint.wait_until_finished(manager)

    export.export_student(str(workdir), str(tmp_path / "student.pt"))
    loaded_config, loaded = convert.load_torch_checkpoint(str(tmp_path / "student.pt"))
    assert loaded_config.guidance_embedder
    got = np.asarray(loaded[cosmos_dit.GUIDANCE_EMBEDDER]["linear"]["kernel"], np.float32)
    np.testing.assert_allclose(got, kernel, rtol=1e-2, atol=1e-2)  # bf16 export
