"""The toy world (trigflow_distill.toy) and its analytic evaluator (trigflow_distill.toy.metrics)."""

import grain
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from trigflow_distill import toy
from trigflow_distill.toy import metrics as tm


@pytest.fixture(scope="module")
def world():
    return toy.make_world(toy.WorldConfig(seed=0))


@pytest.fixture(scope="module")
def real(world):
    return toy.sample_videos(world, seed=11, n=1024)


@pytest.fixture(scope="module")
def reference(world):
    return toy.reference_set(world, 1024)


def test_world_and_samples_are_deterministic_per_seed(world):
    again = toy.make_world(toy.WorldConfig(seed=0))
    for name in ("shared", "signatures", "velocities", "text"):
        np.testing.assert_array_equal(getattr(world, name), getattr(again, name))
    assert world.scale == again.scale
    other = toy.make_world(toy.WorldConfig(seed=1))
    assert not np.allclose(world.signatures, other.signatures)

    a, b, c = (toy.sample_videos(world, s, 16) for s in (3, 3, 4))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["latents"], c["latents"])

    src = toy.RecordSource(world, seed=5, size=100)
    backwards = {i: src[i] for i in (7, 3, 0)}
    fresh = toy.RecordSource(world, seed=5, size=100)
    for i in (0, 3, 7):
        for key in backwards[i]:
            np.testing.assert_array_equal(backwards[i][key], fresh[i][key])
    assert not np.allclose(src[3]["latents"], toy.RecordSource(world, seed=6)[3]["latents"])
    assert not np.allclose(src[3]["latents"], src[4]["latents"])


def test_world_structure(world):
    c = world.config
    assert world.signatures.shape == (c.num_prompts, c.channels) and world.text.shape == (8, 8, 96)
    np.testing.assert_allclose(np.linalg.norm(world.signatures, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(world.shared), 1.0, rtol=1e-12)
    # The shared part dominates the mean signature, so the prompt-averaged (unconditional) blob is non-zero.
    mean_sig = world.signatures.mean(0)
    assert mean_sig @ world.shared / np.linalg.norm(mean_sig) > 0.9
    # Per-token normalised text, distinct prompts, zero unconditional text.
    np.testing.assert_allclose(world.text.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(world.text.std(-1), 1.0, rtol=1e-4)
    flat = world.text.reshape(c.num_prompts, -1)
    assert np.abs(np.corrcoef(flat) - np.eye(c.num_prompts)).max() < 0.3
    assert world.uncond_text.shape == (8, 96) and not world.uncond_text.any()
    with pytest.raises(ValueError):
        world.signatures[0, 0] = 1.0


def test_sample_parameters(world):
    c = world.config
    d = toy.sample_videos(world, 21, 4096)
    assert d["latents"].shape == (4096, 16, 4, 8, 8) and d["latents"].dtype == np.float32
    assert d["text"].shape == (4096, 8, 96) and d["prompt"].dtype == np.int32
    np.testing.assert_array_equal(d["text"], world.text[d["prompt"]])
    # Unit variance from the world's fixed scale, on data it was not computed from.
    assert abs(d["latents"].std() - 1.0) < 0.02
    # 1 px/frame in direction k * 45 degrees, mid-clip position uniform in the central region.
    step = np.diff(d["positions"], axis=1)
    np.testing.assert_allclose(np.linalg.norm(step, axis=-1), 1.0, atol=1e-5)
    angle = np.arctan2(step[..., 0], step[..., 1])
    expected = d["prompt"][:, None] * np.pi / 4
    np.testing.assert_allclose(np.angle(np.exp(1j * (angle - expected))), 0.0, atol=1e-5)
    mid = d["positions"].mean(1)
    assert np.all(np.abs(mid - 3.5) <= c.center_halfwidth + 1e-5)
    assert np.abs(mid - 3.5).max() > 0.95 * c.center_halfwidth
    lo, hi = c.amplitude_range
    assert d["amplitude"].min() >= lo and d["amplitude"].max() <= hi
    # Conditional-frame counts follow docs/algorithm.md §7.
    freq = np.bincount(d["num_cond_frames"], minlength=3) / 4096
    np.testing.assert_allclose(freq, [0.6, 0.2, 0.2], atol=0.03)
    # Prompts given explicitly are used as given.
    p = np.arange(8, dtype=np.int32)
    np.testing.assert_array_equal(toy.sample_videos(world, 1, 8, prompts=p)["prompt"], p)


def test_record_source_feeds_grain(world):
    src = toy.RecordSource(world, seed=0, size=64)
    rec = src[0]
    assert set(rec) == {"latents", "text", "num_cond_frames", "prompt"}
    np.testing.assert_array_equal(rec["text"], world.text[rec["prompt"]])
    ds = grain.MapDataset.source(src).seed(1).shuffle().batch(8, drop_remainder=True)
    batch = next(iter(ds.to_iter_dataset()))
    assert batch["latents"].shape == (8, 16, 4, 8, 8) and batch["num_cond_frames"].shape == (8,)
    with pytest.raises(IndexError):
        src[64]


def test_evaluator_recovers_known_parameters(world, real):
    a = tm.analyse(world, real["latents"])
    assert np.mean(a["prompt"] == real["prompt"]) == 1.0
    assert np.mean(a["direction"] == real["prompt"]) == 1.0
    err = np.linalg.norm(a["positions"] - real["positions"], axis=-1)
    assert err.mean() < 0.05 and err.max() < 0.15
    assert np.abs(a["amplitude"] - real["amplitude"]).max() < 0.05
    sig_cos = np.einsum("bc,bc->b", a["signature"], world.signatures[real["prompt"]])
    assert sig_cos.min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(a["velocity"], axis=1), 1.0, atol=0.05)


def test_metrics_of_real_data_hit_their_ideal_values(world, real, reference):
    m = tm.metrics(world, real["latents"], real["prompt"], reference=reference, num_cond_frames=real["num_cond_frames"])
    assert m["prompt_accuracy"] == 1.0 and m["motion_accuracy"] == 1.0
    assert abs(m["amplitude_ratio"] - 1.0) < 0.02
    assert abs(m["diversity"] - 1.0) < 0.1
    assert m["cond_consistency"] > 0.99
    # Collapsing every clip of a prompt onto one start position kills diversity.
    first = np.array([np.flatnonzero(real["prompt"] == p)[0] for p in real["prompt"]])
    collapsed = tm.metrics(world, real["latents"][first], real["prompt"], reference=reference)
    assert collapsed["diversity"] < 0.05
    assert np.isnan(collapsed["cond_consistency"])


def test_cond_consistency_detects_broken_continuation(world, real):
    x, p, n = real["latents"], real["prompt"], real["num_cond_frames"]
    assert tm.metrics(world, x, p, reference=real, cond_latents=x, num_cond_frames=n)["cond_consistency"] > 0.99
    # Time reversed: the blob moves backwards, 2 px from where it should be.
    rev = tm.metrics(world, x[:, :, ::-1], p, reference=real, num_cond_frames=n)
    assert rev["cond_consistency"] < 0.05
    # Generated frames taken from another clip of the same prompt, after the true conditional frames.
    other = np.array(
        [np.roll(np.flatnonzero(p == k), 1)[list(np.flatnonzero(p == k)).index(i)] for i, k in enumerate(p)]
    )
    t = np.arange(x.shape[2])[None, None, :, None, None]
    mixed = np.where(t < n[:, None, None, None, None], x, x[other])
    assert tm.metrics(world, mixed, p, reference=real, cond_latents=x, num_cond_frames=n)["cond_consistency"] < 0.3


def test_frechet_distances_separate_real_from_noise(world, real, reference):
    floor = tm.real_floor(world, n=1024, seed=12, reference=reference)
    noise = np.random.default_rng(0).standard_normal(real["latents"].shape).astype(np.float32)
    bad = tm.metrics(world, noise, real["prompt"], reference=reference)
    assert bad["fd_hand"] > 100 * floor["fd_hand"]
    assert bad["fd_proj"] > 10 * floor["fd_proj"]
    # Dimming every clip by 30% is visible in both distances and in the amplitude ratio.
    dim = tm.metrics(world, 0.7 * real["latents"], real["prompt"], reference=reference)
    assert dim["fd_hand"] > 10 * floor["fd_hand"] and dim["fd_proj"] > 2 * floor["fd_proj"]
    assert abs(dim["amplitude_ratio"] - 0.7) < 0.02


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.trace(ca)
        + np.trace(cb)
        - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real)
    )
    np.testing.assert_allclose(tm.frechet_distance(a, b), expected, rtol=1e-8)
    assert abs(tm.frechet_distance(a, a)) < 1e-8
    np.testing.assert_allclose(tm.frechet_distance(a, a + np.arange(6)), np.sum(np.arange(6) ** 2), rtol=1e-8)


def test_pictures_have_the_grid_size(world, real, tmp_path):
    n, zoom, gap, per = 64, 4, 2, 3
    x, p = real["latents"][:n], real["prompt"][:n]
    png, gif = tmp_path / "g.png", tmp_path / "g.gif"
    toy.save_grid_png(world, x, p, str(png), per_prompt=per, zoom=zoom, gap=gap)
    toy.save_gif(world, x, p, str(gif), per_prompt=per, zoom=zoom, gap=gap)
    cell = 8 * zoom
    height = 8 * (cell + gap) + gap
    with Image.open(png) as im:
        # per * T frame columns, an extra 2*gap between consecutive samples.
        assert im.size == (per * 4 * (cell + gap) + gap + (per - 1) * 2 * gap, height) and im.mode == "RGB"
        rgb = np.asarray(im).astype(float)
    with Image.open(gif) as im:
        assert im.size == (per * (cell + gap) + gap + (per - 1) * 2 * gap, height) and im.n_frames == 4
    # Prompt 0 is drawn red: its row is redder than green or blue.
    row0 = rgb[gap : gap + cell]
    assert row0[..., 0].mean() > 3 * max(row0[..., 1].mean(), row0[..., 2].mean())


def test_bad_input_raises_clear_errors(world):
    with pytest.raises(ValueError, match="shape"):
        tm.analyse(world, np.zeros((2, 16, 4, 8, 9)))
    with pytest.raises(ValueError, match="prompts"):
        toy.sample_videos(world, 0, 2, prompts=np.array([0, 8]))
    with pytest.raises(ValueError, match="cond_frame_probs"):
        toy.WorldConfig(cond_frame_probs=(0.5, 0.2))
    with pytest.raises(ValueError, match="prompts"):
        tm.metrics(world, np.zeros((2, 16, 4, 8, 8)), np.zeros(3, np.int32))
