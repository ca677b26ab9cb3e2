"""Teacher pretraining objective and the evaluation harness, on a mini DiT (fast)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill import toy
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit
from trigflow_distill.toy import evaluate, pretrain
from trigflow_distill.training import builder

METRICS = {
    "prompt_accuracy",
    "motion_accuracy",
    "amplitude_ratio",
    "diversity",
    "fd_hand",
    "fd_proj",
    "cond_consistency",
}


@pytest.fixture(scope="module")
def world():
    return toy.make_world(toy.WorldConfig(scale_samples=256))


@pytest.fixture(scope="module")
def mini_config(world):
    return cosmos_dit.get_preset(
        "tiny",
        model_channels=32,
        num_blocks=1,
        num_heads=2,
        mlp_ratio=2.0,
        adaln_lora_dim=8,
        crossattn_emb_channels=16,
        crossattn_proj_in_channels=world.config.text_width,
    )


def test_velocity_loss_matches_direct_velocity(world, mini_config):
    """Through the denoiser the loss is the plain RF velocity MSE, on the non-conditional frames only."""
    params = cosmos_dit.init_params(mini_config, jax.random.PRNGKey(1))
    data = toy.sample_videos(world, 3, 4)
    x0 = jnp.asarray(data["latents"])
    num_cond = jnp.array([0, 1, 2, 0], jnp.int32)
    t_b = jnp.array([0.9, 0.5, 0.2, 0.05], jnp.float32)
    eps = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    tau_b = jnp.arctan2(t_b, 1 - t_b)
    loss = jax.jit(pretrain.velocity_loss, static_argnums=0)(
        mini_config, params, x0, data["text"], num_cond, tau_b, eps
    )

    @jax.jit
    def direct(params):
        t = t_b[:, None, None, None, None]
        mask = video2world.cond_mask(num_cond, x0.shape)
        net_in = mask * x0 + (1 - mask) * ((1 - t) * x0 + t * eps)
        t_cond = 1e-4 / (1 + 1e-4)
        t_frames = jnp.where(mask[:, 0, :, 0, 0] > 0.5, t_cond, t_b[:, None])
        v = cosmos_dit.velocity(mini_config, params, net_in, t_frames, data["text"], cond_mask_b1thw=mask)
        err = (1 - mask) * jnp.square(v - (eps - x0))
        return jnp.sum(err) / jnp.sum(jnp.broadcast_to(1 - mask, x0.shape))

    np.testing.assert_allclose(loss, direct(params), rtol=1e-4)


@pytest.mark.slow
def test_pretraining_lowers_the_loss(world, mini_config):
    _, ema, losses = pretrain.pretrain(
        world, mini_config, steps=60, batch_size=8, lr=3e-3, log_every=20, log=lambda s: None
    )
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])
    assert jax.tree.structure(ema) == jax.tree.structure(cosmos_dit.init_params(mini_config, jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_evaluate_writes_schema_and_files(world, mini_config, tmp_path):
    teacher = builder.split_teacher(cosmos_dit.init_params(mini_config, jax.random.PRNGKey(0)))
    student = teacher["net"]  # as the trainer keeps it: no text projection
    raw = jax.tree.map(lambda x: x + 0.01, student)
    out = tmp_path / "eval"
    n = 32
    result = evaluate.evaluate(
        world,
        mini_config,
        teacher,
        {"student_ema": student, "student": raw},
        str(out),
        num_samples=n,
        batch_size=24,
        guidance=3.0,
        log=lambda s: None,
    )

    with open(out / "eval.json") as f:
        on_disk = json.load(f)
    assert on_disk == result and set(on_disk) == {"samplers", "floor"}
    rows = [(r["name"], r["steps"], r["guidance"], r["nfe"]) for r in on_disk["samplers"]]
    assert rows == [
        ("teacher", 2, 3.0, 4),
        ("teacher", 4, None, 4),
        ("teacher", 4, 3.0, 8),
        ("teacher", 8, 3.0, 16),
        ("teacher", 16, 3.0, 32),
        ("teacher", 35, 3.0, 70),
        ("teacher", 35, None, 35),
        ("student_ema", 1, None, 1),
        ("student_ema", 2, None, 2),
        ("student_ema", 4, None, 4),
        ("student", 1, None, 1),
        ("student", 2, None, 2),
        ("student", 4, None, 4),
        (
            "data",
            0,
            None,
            0,
        ),
    ]
    for r in on_disk["samplers"]:
        assert set(r) == {"name", "steps", "guidance", "nfe", "seconds_per_sample", "metrics"}
        assert set(r["metrics"]) == METRICS
        assert (r["seconds_per_sample"] is None) == (r["name"] == "data")
        assert r["seconds_per_sample"] is None or r["seconds_per_sample"] > 0
    assert set(on_disk["floor"]) == METRICS
    data_row = on_disk["samplers"][-1]["metrics"]
    assert data_row["prompt_accuracy"] == 1.0 and data_row["motion_accuracy"] == 1.0
    assert data_row["cond_consistency"] == 1.0

    # The 4-step samples of the EMA student keep the Video2World ground-truth frames.
    cond = evaluate.conditioning_set(world, n)
    saved = np.load(out / "samples_student4.npz")
    assert set(saved.files) == {"latents", "prompt"} and saved["latents"].shape == (n, *world.config.latent_shape)
    np.testing.assert_array_equal(saved["prompt"], cond["prompt"])
    for i, k in enumerate(cond["num_cond_frames"]):
        np.testing.assert_allclose(saved["latents"][i, :, :k], cond["latents"][i, :, :k], atol=1e-5)
    assert np.all(np.isfinite(saved["latents"]))

    assert os.path.getsize(out / "quality_vs_nfe.png") > 0  # FDs against NFE, beside eval.json
    table = evaluate.format_markdown(result).splitlines()
    assert len(table) == 2 + len(rows) + 1 and table[2].startswith("| teacher | 2 | 3 | 4 |")
    for label in (
        "teacher35_cfg3",
        "teacher35",
        "teacher4_cfg3",
        "teacher2_cfg3",
        "teacher4",
        "student_ema1",
        "student_ema4",
        "student2",
        "data",
    ):
        for ext in ("png", "gif"):
            assert os.path.getsize(out / f"{label}.{ext}") > 0


def test_evaluate_rejects_bad_inputs(world, mini_config, tmp_path):
    teacher = builder.split_teacher(cosmos_dit.init_params(mini_config, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="unknown keys"):
        evaluate.evaluate(world, mini_config, teacher, {"critic": teacher["net"]}, str(tmp_path), num_samples=4)
    no_proj = {"net": teacher["net"], "text_proj": None}
    with pytest.raises(ValueError, match="no text projection"):
        evaluate.evaluate(world, mini_config, no_proj, {}, str(tmp_path), num_samples=4)
