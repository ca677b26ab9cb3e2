"""prepare: synthetic videos (two aspect ratios, caption windows, a corrupt one, a too-short one, two outside the
reference's fps range) + tiny random VAE, text encoder and teacher -> a dataset whose records match an independent
recomputation; resume, refusal, report; then training. The clip sampling itself: tests/test_prepare_clips.py."""

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
FPS = 12.0  # in the reference's [10, 60]; a window needs 4 s = 48 frames
CAPTIONS = [  # caption windows, JSONL lines in file order
    {"video": "wide_a.mp4", "caption": "a red car drives"},
    {"video": "wide_b.mp4", "caption": "a blue boat sails", "start": 0, "end": 4.5},  # frames [0, 54)
    {"video": "wide_b.mp4", "caption": "a boat docks", "start": 4.5},  # the last window: dropped
    {"video": "square_a.mp4", "caption": "a cat wakes", "start_frame": 0, "end_frame": 24},  # 2 s: too short
    {"video": "square_a.mp4", "caption": "a cat sleeps", "start_frame": 2, "end_frame": 55},
    {"video": "square_a.mp4", "caption": "a cat leaves"},  # the last window: dropped
    {"video": "bad.mp4", "caption": "noise"},
    {"video": "short.mp4", "caption": "too short"},
    {"video": "slow.mp4", "caption": "too slow"},
    {"video": "fast.mp4", "caption": "too fast"},
]
SIDECAR = ("square_b", "a dog runs")  # caption from square_b.txt, not the JSONL
# (video, frames [start, stop), stride, window [start, end), window index) of every clip with 2 clips per window:
# stride = window frames // 5, the 5-stride spans evenly spaced over the window (one when it has no room)
CLIPS = {
    ("wide_a.mp4", (0, 50), 10, (0, 50), 0),  # 50 frames: span 50, no room for a second clip
    ("wide_b.mp4", (0, 50), 10, (0, 54), 0),
    ("wide_b.mp4", (4, 54), 10, (0, 54), 0),
    ("square_a.mp4", (2, 52), 10, (2, 55), 1),
    ("square_a.mp4", (5, 55), 10, (2, 55), 1),
    ("square_b.mp4", (0, 45), 9, (0, 49), 0),
    ("square_b.mp4", (4, 49), 9, (0, 49), 0),
}


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
    video.write_mp4(videos / "wide_a.mp4", _frames(50, 54, 96, 0), FPS)  # 16:9 -> bucket 320x192 at "256"
    video.write_mp4(videos / "wide_b.mp4", _frames(61, 72, 128, 1), FPS)
    video.write_mp4(videos / "square_a.mp4", _frames(56, 40, 40, 2), FPS)  # 1:1 -> 256x256
    video.write_mp4(videos / "sub" / "square_b.mp4", _frames(49, 48, 44, 3), FPS)  # nearly square: padded
    (videos / "sub" / "square_b.txt").write_text(SIDECAR[1] + "\n")
    (videos / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    video.write_mp4(videos / "short.mp4", _frames(3, 40, 40, 4), FPS)
    video.write_mp4(videos / "slow.mp4", _frames(30, 40, 40, 5), 5.0)  # 6 s, but under 10 fps
    video.write_mp4(videos / "fast.mp4", _frames(9, 40, 40, 6), 120.0)
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(line) + "\n" for line in CAPTIONS))

    vae_path = root / "wan_vae.pth"
    torchfile.save(vae_path, wan_vae.to_torch(wan_vae.init_params(VAE_CFG, jax.random.key(0)), VAE_CFG))
    words = sorted({w for c in (*(line["caption"] for line in CAPTIONS), SIDECAR[1]) for w in c.split()})
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


def test_report_lists_the_bad_files_and_windows(dataset):
    report = [json.loads(line) for line in (dataset / "report.jsonl").read_text().splitlines()]
    reasons = {(os.path.basename(r["video"]), r.get("window")): r["reason"] for r in report}
    assert sorted(reasons, key=str) == sorted(
        [
            ("bad.mp4", None),
            ("fast.mp4", None),
            ("short.mp4", None),
            ("slow.mp4", None),
            ("square_a.mp4", 0),
            ("square_a.mp4", 2),
            ("wide_b.mp4", 1),
        ],
        key=str,
    )
    assert "corrupt" in reasons["bad.mp4", None]
    assert "too short" in reasons["short.mp4", None] and "3 frames" in reasons["short.mp4", None]
    assert "fps 5 outside [10, 60]" in reasons["slow.mp4", None]
    assert "fps 120 outside [10, 60]" in reasons["fast.mp4", None]
    assert "2.00 s" in reasons["square_a.mp4", 0]  # 24 frames: enough frames, under 4 s
    assert "dropped" in reasons["square_a.mp4", 2] and "dropped" in reasons["wide_b.mp4", 1]
    square_a = next(r for r in report if r.get("window") == 0)
    assert square_a["frames"] == [0, 24]


def test_dataset_shapes_buckets_and_metadata(dataset):
    source, rows = _records(dataset)
    assert source.meta["format"] == data.FORMAT and source.meta["text_kind"] == "projected"
    assert source.meta["text_dtype"] == "bfloat16"
    assert len(rows) == len(CLIPS) == 7
    by_bucket = {}
    for rec, info in rows:
        w, h = map(int, info["bucket"].split("x"))
        assert rec["latents"].shape == (16, 2, h // 8, w // 8) and rec["text"].shape == (512, 64)
        assert rec["padding_mask"].shape == (1, h, w)
        by_bucket.setdefault((w, h), []).append(os.path.basename(info["source"]))
    assert sorted(by_bucket[(320, 192)]) == ["wide_a.mp4"] + ["wide_b.mp4"] * 2
    assert sorted(by_bucket[(256, 256)]) == ["square_a.mp4"] * 2 + ["square_b.mp4"] * 2
    assert sorted(b for b, _, _ in source.buckets()) == ["256x256", "320x192"]
    got = {
        (
            os.path.basename(info["source"]),
            tuple(info["frames"]),
            info["frame_stride"],
            tuple(info["window"]),
            info["window_index"],
        )
        for _, info in rows
    }
    assert got == CLIPS
    assert {info["fps"] for _, info in rows} == {FPS}
    captions = {(os.path.basename(info["source"]), info["window_index"]): info["caption"] for _, info in rows}
    assert captions == {
        ("wide_a.mp4", 0): "a red car drives",
        ("wide_b.mp4", 0): "a blue boat sails",
        ("square_a.mp4", 1): "a cat sleeps",  # the caption of its window
        ("square_b.mp4", 0): SIDECAR[1],
    }


def test_records_match_an_independent_recomputation(sources, dataset):
    """Latents, padding mask and projected context of one clip recomputed from the public pieces."""
    _, rows = _records(dataset)
    rec, info = next(r for r in rows if r[1]["source"].endswith("square_b.mp4") and r[1]["frames"][0] == 4)
    frames, _ = video.read_video(info["source"])
    pixels, mask = video.resize_and_pad(frames[4:49:9], (256, 256))  # 5 frames at stride 49 // 5 = 9
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
    assert marker.exists() and len(data.NpyDirSource(str(dataset))) == len(CLIPS)
    assert before == {p.name: p.stat().st_mtime_ns for p in (dataset / "unit-00001").iterdir()}
    assert job.main(_args(sources, dataset, "--clips-per-video", "1")) == 1
    assert "clips_per_video" in capsys.readouterr().err
    assert job.main(_args(sources, dataset, "--frame-stride", "1")) == 1  # another sampling: another job
    assert "frame_stride" in capsys.readouterr().err
    assert json.loads((dataset / "job.json").read_text())["frame_stride"] == "auto"
    other = sources["root"] / "not_a_dataset"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert job.main(_args(sources, other)) == 1
    assert "not empty" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(sources, tmp_path, capsys):
    assert job.main(_args(sources, tmp_path / "a", "--frames", "90")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --frames 90: the Wan2.1 VAE needs 1 + 4k frames (nearest: 89 or 93)")
    assert err.count("\n") == 1
    assert job.main(_args(sources, tmp_path / "a", "--frames", "0")) == 1
    assert "(nearest: 1 or 5)" in capsys.readouterr().err
    assert job.main(_args(sources, tmp_path / "a", "--frame-stride", "x")) == 1
    assert "--frame-stride x: give auto" in capsys.readouterr().err
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
    w = clips.Window
    captions = {"a.mp4": [w("by name")], "sub/b.mp4": [w("one", 0, 5), w("two", 5)], "zz.mp4": [w("?")]}
    items = clips.make_items(paths, str(tmp_path), captions)
    assert [[x.caption for x in it.windows] for it in items] == [["by name"], ["one", "two"], ["from the sidecar"]]
    assert "1 of 3 --captions entries name no video" in capsys.readouterr().err


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
    # units of 2 sorted videos: 0 = bad, fast; 1 = short, slow; 2 = square_a, sub/square_b; 3 = wide_a, wide_b
    owners = {u: json.loads((out / "units" / f"unit-{u:05d}.json").read_text())["process"] for u in range(4)}
    assert owners == {0: 0, 1: 1, 2: 0, 3: 1}
    report = [json.loads(line)["video"] for line in (out / "report.jsonl").read_text().splitlines()]
    assert sorted(set(map(os.path.basename, report))) == [
        "bad.mp4",
        "fast.mp4",
        "short.mp4",
        "slow.mp4",
        "square_a.mp4",
        "wide_b.mp4",
    ]
    _, one = _records(dataset)
    _, two = _records(out)
    by_clip = {(info["source"], tuple(info["frames"])): rec for rec, info in one}
    assert len(two) == len(by_clip) == len(CLIPS)
    for rec, info in two:
        want = by_clip[(info["source"], tuple(info["frames"]))]
        np.testing.assert_allclose(rec["latents"], want["latents"], atol=1e-5)
        np.testing.assert_array_equal(rec["text"], want["text"])
        np.testing.assert_array_equal(rec["padding_mask"], want["padding_mask"])


def test_one_job_per_out_a_stale_lock_is_taken_over(sources, dataset, capsys):
    """prepare takes the training workdir's lock on --out: a second job refuses at once naming the holder; the lock
    of a job that was killed is taken over, and a finished job leaves none."""
    from trigflow_distill.common import lock

    held = lock.WorkdirLock(dataset, flag="--out")
    held.acquire()
    try:
        assert job.main(_args(sources, dataset)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use by another run" in err, err
        assert f"pid {os.getpid()}" in err and "another --out" in err
    finally:
        held.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "pid_start": None, "token": "x", "heartbeat": 0}
    (dataset / lock.LOCK_NAME).write_text(json.dumps({**stale, "started": 0}))
    assert job.main(_args(sources, dataset)) == 0  # resumes (nothing left to do) after taking the lock over
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (dataset / lock.LOCK_NAME).exists()


def test_meta_records_the_fingerprint_and_the_projecting_teacher(sources, dataset):
    from trigflow_distill.data.format import dataset_fingerprint, projection_fingerprint

    meta = json.loads((dataset / "meta.json").read_text())
    kernel, bias = encoders.load_projection(str(sources["teacher"]))
    assert meta["teacher"] == {"path": str(sources["teacher"]), "crossattn_proj": projection_fingerprint(kernel, bias)}
    assert dataset_fingerprint(str(dataset)) == meta["fingerprint"]
    for shard in meta["shards"]:  # per file of every shard, named from the dataset folder
        for name, rec in shard["checksums"].items():
            assert name.startswith(shard["name"] + ".") and (dataset / name).stat().st_size == rec["bytes"]
    other = encoders.load_projection(str(sources["teacher"]))[0].copy()
    other[0, 0] += 1  # another teacher of the same widths
    assert projection_fingerprint(other, bias) != meta["teacher"]["crossattn_proj"]


def test_full_disk_names_the_unit_and_the_rerun_resumes(sources, dataset, capsys, monkeypatch):
    import errno

    marker = dataset / "units" / "unit-00001.json"
    marker.unlink()  # unit 1 is to be redone
    (dataset / "meta.json").unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(data.DatasetWriter, "write_shard", full)
        assert job.main(_args(sources, dataset)) == 1
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "no space left" in err and "writing unit 1 (unit-00001" in err, err
    assert int(err.split("need about ")[1].split(" bytes")[0]) > 0 and "rerun the same command" in err
    assert not (dataset / "unit-00001").exists() and not marker.exists()
    assert job.main(_args(sources, dataset)) == 0
    assert marker.exists() and len(data.NpyDirSource(str(dataset))) == len(CLIPS)


def _one_video_list(sources, tmp_path, *names):
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{sources['videos'] / name}\n" for name in names))
    return listing


def test_a_first_run_that_failed_does_not_bind_the_corrected_rerun(sources, tmp_path, capsys):
    """A job that failed before finishing a unit (here: a wrong --vae, found after job.json is written) leaves a
    job.json that the corrected rerun, with other arguments, replaces; once a unit is finished, another job is
    refused again."""
    out = tmp_path / "out"
    listing = _one_video_list(sources, tmp_path, "wide_a.mp4")
    one = ("--videos", str(listing), "--shard-videos", "1")
    args = _args(sources, out, *one)
    args[args.index("--vae") + 1] = str(tmp_path / "missing_vae.pth")
    assert job.main(args) == 1
    assert "missing_vae.pth" in capsys.readouterr().err
    assert (out / "job.json").exists() and not list((out / "units").iterdir())
    assert job.main(_args(sources, out, *one, "--clips-per-video", "1")) == 0  # another vae and clips_per_video
    assert "finished no unit" in capsys.readouterr().err
    assert json.loads((out / "job.json").read_text())["vae"] == str(sources["vae"])
    assert len(data.NpyDirSource(str(out))) == 1  # wide_a: one clip
    assert job.main(_args(sources, out, *one, "--clips-per-video", "2")) == 1  # unit 0 is finished: refused
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "another prepare job (different clips_per_video)" in err, err
    assert json.loads((out / "job.json").read_text())["clips_per_video"] == 1


def test_prepare_videos_is_the_cli_job_from_python(sources, tmp_path):
    """prepare_videos([(path, caption)], ...) writes the records the CLI writes for the same videos and captions
    (a list file + JSONL / sidecar), through the same job: same job.json but for the input file names."""
    from trigflow_distill.prepare import prepare_videos

    names = ("wide_a.mp4", "sub/square_b.mp4")
    cli = tmp_path / "cli"
    assert job.main(_args(sources, cli, "--videos", str(_one_video_list(sources, tmp_path, *names)))) == 0
    api = tmp_path / "api"
    pairs = [(sources["videos"] / "wide_a.mp4", "a red car drives"), (str(sources["videos"] / names[1]), SIDECAR[1])]
    options = dict(resolution="256", frames=FRAMES, clips_per_video=2, shard_videos=3, text_dtype="float32")
    kw = dict(vae=sources["vae"], text_encoder=sources["text"], teacher=sources["teacher"])
    summary = prepare_videos(pairs, api, **kw, **options, batch_size=2, devices=1, no_progress=True)
    assert summary["records"] == summary["clips_this_run"] == 3 and summary["skipped"] == []
    want, got = (json.loads((d / "job.json").read_text()) for d in (cli, api))
    assert got["videos"] is None and got["captions"] is None
    assert {k: v for k, v in got.items() if k not in ("videos", "captions")} == {
        k: v for k, v in want.items() if k not in ("videos", "captions")
    }
    (_, cli_rows), (_, api_rows) = _records(cli), _records(api)
    by_clip = {(info["source"], tuple(info["frames"])): (rec, info) for rec, info in cli_rows}
    assert len(api_rows) == len(by_clip) == 3
    for rec, info in api_rows:
        want_rec, want_info = by_clip[(info["source"], tuple(info["frames"]))]
        assert info == want_info
        np.testing.assert_allclose(rec["latents"], want_rec["latents"], atol=1e-5)
        np.testing.assert_array_equal(rec["text"], want_rec["text"])
        np.testing.assert_array_equal(rec["padding_mask"], want_rec["padding_mask"])
    assert prepare_videos(pairs, api, **kw, **options, batch_size=2, devices=1, no_progress=True)["clips_this_run"] == 0
    with pytest.raises(TypeError, match="unknown option 'clip_per_video'"):
        prepare_videos(pairs, tmp_path / "x", **kw, clip_per_video=1)
    with pytest.raises(ValueError, match=r"videos\[0\]: expected a \(video path, caption\) pair"):
        prepare_videos([str(sources["videos"] / "wide_a.mp4")], tmp_path / "x", **kw)
