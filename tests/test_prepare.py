"""prepare: synthetic videos (two aspect ratios, a corrupt one, a too-short one) + tiny random VAE, text encoder and
teacher -> a dataset whose records match an independent recomputation; resume, refusal, report; then training."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill import data
from trigflow_distill.common import video
from trigflow_distill.models import cosmos_dit, reason1, torchfile, wan_vae
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.prepare import clips, encoders, job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 5
VAE_CFG = wan_vae.WanVAEConfig(dim=8, z_dim=16)
CAPTIONS = {
    "wide_a.mp4": "a red car drives",
    "wide_b.mp4": "a blue boat sails",
    "square_a.mp4": "a cat sleeps",
    "bad.mp4": "noise",
    "short.mp4": "too short",
}
SIDECAR = ("square_b", "a dog runs")  # caption from square_b.txt, not the JSONL


def _frames(t, h, w, seed):
    """Smooth moving colour gradients (compress well, decode close to the source)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, 3)
    out = [np.stack([np.sin(4 * xx + 3 * yy + 0.3 * i + p) for p in phase], -1) for i in range(t)]
    return np.round((np.stack(out) + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    videos = root / "videos"
    videos.mkdir()
    video.write_mp4(videos / "wide_a.mp4", _frames(9, 54, 96, 0), 8.0)  # 16:9 -> bucket 320x192 at "256"
    video.write_mp4(videos / "wide_b.mp4", _frames(10, 72, 128, 1), 8.0)
    video.write_mp4(videos / "square_a.mp4", _frames(9, 40, 40, 2), 8.0)  # 1:1 -> 256x256
    video.write_mp4(videos / "sub" / "square_b.mp4", _frames(9, 48, 44, 3), 8.0)  # nearly square: padded
    (videos / "sub" / "square_b.txt").write_text(SIDECAR[1] + "\n")
    (videos / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    video.write_mp4(videos / "short.mp4", _frames(3, 40, 40, 4), 8.0)
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"video": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))

    vae_path = root / "wan_vae.pth"
    torchfile.save(vae_path, wan_vae.to_torch(wan_vae.init_params(VAE_CFG, jax.random.key(0)), VAE_CFG))
    words = sorted({w for c in (*CAPTIONS.values(), SIDECAR[1]) for w in c.split()})
    text_path = root / "text_encoder"
    text_cfg = reason1.write_tiny(text_path, hidden_size=48, words=words)
    # the tiny DiT's projection: 2 layers x 48 = 96 in, 64 out (distinct widths: the trainer tells them apart)
    net = cosmos_dit.get_preset("tiny", num_blocks=1)
    assert net.crossattn_proj_in_channels == text_cfg.num_layers * text_cfg.hidden_size
    teacher_path = root / "teacher.pt"
    teacher = cosmos_dit.init_params(net, jax.random.key(1))
    convert.export_torch(teacher, net, teacher_path, dtype=np.float32)
    return dict(
        root=root,
        videos=videos,
        captions=captions,
        vae=vae_path,
        text=text_path,
        teacher=teacher_path,
        net=net,
        teacher_params=teacher,
    )


def _args(s, out, *extra):
    return [
        "--videos",
        str(s["videos"]),
        "--captions",
        str(s["captions"]),
        "--vae",
        str(s["vae"]),
        "--text-encoder",
        str(s["text"]),
        "--teacher",
        str(s["teacher"]),
        "--out",
        str(out),
        "--resolution",
        "256",
        "--frames",
        str(FRAMES),
        "--clips-per-video",
        "2",
        "--shard-videos",
        "3",
        "--text-dtype",
        "float32",
        "--batch-size",
        "2",
        "--devices",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def dataset(sources):
    out = sources["root"] / "dataset"
    assert job.main(_args(sources, out)) == 0
    return out


def _records(out):
    """[(record, info)] of the dataset, read with the trainer's reader."""
    source = data.NpyDirSource(str(out))
    return source, [(source[i], source.info(i)) for i in range(len(source))]


def test_report_lists_the_bad_files(dataset):
    report = [json.loads(line) for line in (dataset / "report.jsonl").read_text().splitlines()]
    reasons = {os.path.basename(r["video"]): r["reason"] for r in report}
    assert sorted(reasons) == ["bad.mp4", "short.mp4"]
    assert "corrupt" in reasons["bad.mp4"]
    assert "too short" in reasons["short.mp4"] and "3 frames" in reasons["short.mp4"]


def test_dataset_shapes_buckets_and_metadata(dataset):
    source, rows = _records(dataset)
    assert source.meta["format"] == data.FORMAT and source.meta["text_kind"] == "projected"
    assert source.meta["text_dtype"] == "bfloat16"
    assert len(rows) == 8  # 4 good videos x 2 clips
    by_bucket = {}
    for rec, info in rows:
        w, h = map(int, info["bucket"].split("x"))
        assert rec["latents"].shape == (16, 2, h // 8, w // 8) and rec["text"].shape == (512, 64)
        assert rec["padding_mask"].shape == (1, h, w)
        by_bucket.setdefault((w, h), []).append(os.path.basename(info["source"]))
    assert sorted(by_bucket[(320, 192)]) == ["wide_a.mp4"] * 2 + ["wide_b.mp4"] * 2
    assert sorted(by_bucket[(256, 256)]) == ["square_a.mp4"] * 2 + ["square_b.mp4"] * 2
    assert sorted(b for b, _, _ in source.buckets()) == ["256x256", "320x192"]
    frames = {(os.path.basename(info["source"]), tuple(info["frames"])) for _, info in rows}
    # evenly spaced clips: first and last FRAMES frames (9 frames -> starts 0, 4; 10 frames -> 0, 5)
    assert {("wide_a.mp4", (0, 5)), ("wide_a.mp4", (4, 9)), ("wide_b.mp4", (5, 10))} <= frames
    captions = {os.path.basename(info["source"]): info["caption"] for _, info in rows}
    assert captions["square_b.mp4"] == SIDECAR[1] and captions["wide_a.mp4"] == CAPTIONS["wide_a.mp4"]


def test_records_match_an_independent_recomputation(sources, dataset):
    """Latents, padding mask and projected context of one clip recomputed from the public pieces."""
    _, rows = _records(dataset)
    rec, info = next(r for r in rows if r[1]["source"].endswith("square_b.mp4") and r[1]["frames"][0] == 4)
    frames, _ = video.read_video(info["source"])
    pixels, mask = video.resize_and_pad(frames[4 : 4 + FRAMES], (256, 256))
    cfg, params = wan_vae.load(sources["vae"])
    np.testing.assert_allclose(rec["latents"], np.asarray(wan_vae.encode(cfg, params, pixels[None]))[0], atol=1e-5)
    np.testing.assert_array_equal(rec["padding_mask"], mask)
    assert 0 < mask.mean() < 1  # 44x48 in a square bucket: padded on the left and right
    tcfg, tparams = reason1.load(sources["text"], "float32")
    raw = reason1.embed(tcfg, tparams, reason1.tokenize(sources["text"], [SIDECAR[1]]))
    want = cosmos_dit.project_text(sources["teacher_params"]["crossattn_proj"], raw)[0]
    want_bf16 = np.asarray(jnp.asarray(want).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.abs(rec["text"] - want_bf16).max() <= 2**-8 * np.abs(want_bf16).max()  # one bfloat16 rounding


def test_rerun_resumes_and_other_jobs_are_refused(sources, dataset, capsys):
    marker = dataset / "units" / "unit-00000.json"
    before = {p.name: p.stat().st_mtime_ns for p in (dataset / "unit-00001").iterdir()}
    marker.unlink()  # as if the run died in unit 0: only unit 0 is redone
    (dataset / "meta.json").unlink()
    assert job.main(_args(sources, dataset)) == 0
    assert marker.exists() and len(data.NpyDirSource(str(dataset))) == 8
    assert before == {p.name: p.stat().st_mtime_ns for p in (dataset / "unit-00001").iterdir()}
    assert job.main(_args(sources, dataset, "--clips-per-video", "1")) == 1
    assert "clips_per_video" in capsys.readouterr().err
    other = sources["root"] / "not_a_dataset"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert job.main(_args(sources, other)) == 1
    assert "not empty" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(sources, tmp_path, capsys):
    assert job.main(_args(sources, tmp_path / "a", "--frames", "6")) == 1
    assert "1 + 4k" in capsys.readouterr().err
    wrong = tmp_path / "wrong_teacher.pt"
    net = cosmos_dit.get_preset("tiny", num_blocks=1, crossattn_proj_in_channels=64)  # the encoder gives 96
    convert.export_torch(cosmos_dit.init_params(net, jax.random.key(0)), net, wrong, dtype=np.float32)
    args = _args(sources, tmp_path / "b")
    args[args.index("--teacher") + 1] = str(wrong)
    assert job.main(args) == 1
    err = capsys.readouterr().err
    assert "crossattn_proj takes 64 channels" in err and "2 layers x 48 = 96" in err


def test_captions_jsonl_sidecar_and_unused_keys(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    paths = [str(tmp_path / "a.mp4"), str(tmp_path / "sub" / "b.mp4"), str(tmp_path / "sub" / "c.mp4")]
    (tmp_path / "sub" / "c.txt").write_text("from the sidecar\n")
    items = clips.make_items(paths, str(tmp_path), {"a.mp4": "by name", "sub/b.mp4": "by path", "zz.mp4": "?"})
    assert [it.caption for it in items] == ["by name", "by path", "from the sidecar"]
    assert "1 of 3 --captions entries name no video" in capsys.readouterr().err


def test_clip_starts():
    assert clips.clip_starts(93, 93, 1) == [0]
    assert clips.clip_starts(92, 93, 1) == []
    assert clips.clip_starts(200, 93, 3) == [0, 54, 107]
    assert clips.clip_starts(94, 93, 3) == [0, 1]  # identical starts kept once


def test_batches_are_split_over_the_devices(sources):
    """8 devices: the same latents and context as one device (conftest simulates 8 CPU devices)."""
    assert len(jax.local_devices()) == 8
    one, eight = (
        encoders.Encoders(
            str(sources["vae"]),
            str(sources["text"]),
            str(sources["teacher"]),
            text_dtype="float32",
            num_devices=n,
            keep_raw_text=n == 1,
        )
        for n in (1, 8)
    )
    frames = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 24, 3), dtype=np.uint8)  # 3 clips, padded to 8
    z8 = eight.latents(frames, 8)
    assert z8.shape == (3, 16, 1, 2, 3)
    np.testing.assert_allclose(z8, one.latents(frames, 1 * 4)[:3], atol=1e-5)
    c8, no_raw = eight.context(["a cat sleeps", "a dog runs"], 8)
    c1, raw = one.context(["a cat sleeps", "a dog runs"], 2)
    np.testing.assert_array_equal(c8.view(np.uint16), c1.view(np.uint16))
    # --keep-raw-text: the raw embedding is the one the context was projected from
    assert no_raw is None and raw.shape == (2, 512, 96) and raw.dtype == np.float32
    want = cosmos_dit.project_text(sources["teacher_params"]["crossattn_proj"], raw)
    np.testing.assert_array_equal(c1.view(np.uint16), np.asarray(want.astype(jnp.bfloat16)).view(np.uint16))


@pytest.mark.slow
def test_twenty_training_steps_on_the_prepared_set(sources, dataset, tmp_path):
    """main.py trains on the prepared set (two buckets, projected bf16 context, padding masks): finite losses."""
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [
        sys.executable,
        "main.py",
        "--config=configs/predict25_4step.py:tiny",
        f"--workdir={workdir}",
        f"--config.teacher.path={sources['teacher']}",
        "--config.data.kind=dir",
        f"--config.data.path={dataset}",
        "--config.data.batch_size=2",
        "--config.total_steps=20",
        "--config.log_every=5",
        "--config.checkpoint_every=20",
        "--config.sample_every=0",
        "--config.eval.at_end=False",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20
    losses = [r[k] for r in rows for k in ("critic/loss", "student/loss") if k in r]
    assert len(losses) >= 4 and np.isfinite(losses).all()


@pytest.mark.slow
def test_two_processes_write_the_same_records(sources, dataset, tmp_path):
    """2 processes (1 CPU device each): disjoint units, one dataset with the records of the 1-process run."""
    out = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trigflow_distill.prepare",
                *_args(sources, out),
                "--shard-videos",
                "2",
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    # units of 2 sorted videos: 0 = bad, short; 1 = square_a, sub/square_b; 2 = wide_a, wide_b
    owners = {u: json.loads((out / "units" / f"unit-{u:05d}.json").read_text())["process"] for u in range(3)}
    assert owners == {0: 0, 1: 1, 2: 0}
    report = [json.loads(line)["video"] for line in (out / "report.jsonl").read_text().splitlines()]
    assert sorted(map(os.path.basename, report)) == ["bad.mp4", "short.mp4"]
    _, one = _records(dataset)
    _, two = _records(out)
    by_clip = {(info["source"], tuple(info["frames"])): rec for rec, info in one}
    assert len(two) == len(by_clip) == 8
    for rec, info in two:
        want = by_clip[(info["source"], tuple(info["frames"]))]
        np.testing.assert_allclose(rec["latents"], want["latents"], atol=1e-5)
        np.testing.assert_array_equal(rec["text"], want["text"])
        np.testing.assert_array_equal(rec["padding_mask"], want["padding_mask"])
