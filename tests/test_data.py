"""Data: deterministic order, exact resume, per-process rows, the on-disk format + writer, bad-record errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trigflow_distill import data
from trigflow_distill.data.cli import main as write_main
from trigflow_distill.data.format import dataset_fingerprint

LAT, TXT = (16, 3, 4, 4), (5, 8)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_synthetic_records_deterministic():
    src = data.make_synthetic_source(10, LAT, TXT, seed=1)
    again = data.make_synthetic_source(10, LAT, TXT, seed=1)
    other = data.make_synthetic_source(10, LAT, TXT, seed=2)
    np.testing.assert_array_equal(src[3]["latents"], again[3]["latents"])
    assert not np.array_equal(src[3]["latents"], other[3]["latents"])
    assert not np.array_equal(src[3]["latents"], src[4]["latents"])
    assert src[3]["latents"].dtype == np.float32 and src[3]["text"].shape == TXT
    n_cond = np.array([data.make_synthetic_source(400, LAT, TXT, seed=0)[i]["num_cond_frames"] for i in range(400)])
    assert set(n_cond) <= {0, 1, 2} and 0.5 < np.mean(n_cond == 0) < 0.7  # docs/algorithm.md §7: P(0) = 0.6


def test_order_deterministic_per_seed_and_epochs_are_permutations():
    src = data.make_synthetic_source(12, LAT, TXT, seed=0)
    a = _take(data.make_iterator(src, 4, seed=7), 6)
    b = _take(data.make_iterator(src, 4, seed=7), 6)
    c = _take(data.make_iterator(src, 4, seed=8), 6)
    _assert_batches_equal(a, b)
    prompts = np.concatenate([x["prompt"] for x in a])
    assert not np.array_equal(prompts, np.concatenate([x["prompt"] for x in c]))
    epoch1, epoch2 = prompts[:12], prompts[12:]
    assert sorted(epoch1) == list(range(12)) and sorted(epoch2) == list(range(12))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    for x in a:  # batches carry the records themselves
        for row, p in enumerate(x["prompt"]):
            np.testing.assert_array_equal(x["latents"][row], src[int(p)]["latents"])
    finite = list(data.make_iterator(src, 5, seed=0, num_epochs=2))
    assert len(finite) == 4  # 12 // 5 per epoch, remainder dropped


def test_exact_resume_from_state():
    src = data.make_synthetic_source(10, LAT, TXT, seed=0)
    it = data.make_iterator(src, 3, seed=5)
    _take(it, 4)
    state = it.get_state()
    json.dumps(state)  # the checkpoint stores it as JSON
    expected = _take(it, 5)
    resumed = data.make_iterator(src, 3, seed=5)
    resumed.set_state(json.loads(json.dumps(state)))
    _assert_batches_equal(_take(resumed, 5), expected)


def test_process_slices_make_the_global_batch():
    src = data.make_synthetic_source(16, LAT, TXT, seed=0)
    full = _take(data.make_iterator(src, 8, seed=3), 3)
    lo = _take(data.make_iterator(src, 8, seed=3, process_slice=slice(0, 4)), 3)
    hi = _take(data.make_iterator(src, 8, seed=3, process_slice=slice(4, 8)), 3)
    for f, a, b in zip(full, lo, hi):
        for k in f:
            np.testing.assert_array_equal(f[k], np.concatenate([a[k], b[k]]))
    with pytest.raises(ValueError, match="process_slice"):
        data.make_dataset(src, 8, 0, process_slice=slice(4, 12))
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.make_dataset(src, 32, 0)


def _arrays(n, rng, c=8):
    return (
        rng.normal(size=(n,) + LAT).astype(np.float32),
        rng.normal(size=(n, 5, c)).astype(np.float32),
        np.array([0, 1, 2, 0, 1, 2, 0][:n], np.int64),
    )


def test_writer_cli_roundtrip_and_normalize(tmp_path):
    rng = np.random.default_rng(0)
    lat, txt, nc = _arrays(7, rng)
    for name, arr in (("lat", lat), ("txt", txt), ("nc", nc)):
        np.save(tmp_path / f"{name}.npy", arr)
    out = str(tmp_path / "ds")
    assert (
        write_main(
            [
                "--latents",
                str(tmp_path / "lat.npy"),
                "--text",
                str(tmp_path / "txt.npy"),
                "--num-cond",
                str(tmp_path / "nc.npy"),
                "--shard-size",
                "3",
                "--net",
                "any",
                "--out",
                out,
            ]
        )
        == 0
    )
    src = data.NpyDirSource(out)
    assert len(src) == 7 and src.text_kind == "raw" and src.spec.fields == ("num_cond_frames",)
    assert sorted(f for f in os.listdir(out) if f.endswith("latents.npy")) == [
        "shard-00000.latents.npy",
        "shard-00001.latents.npy",
        "shard-00002.latents.npy",
    ]
    for i in range(7):
        np.testing.assert_array_equal(src[i]["latents"], lat[i])
        np.testing.assert_array_equal(src[i]["text"], txt[i])
        assert src[i]["num_cond_frames"] == nc[i]
    batch = next(data.make_iterator(src, 7, seed=0))
    np.testing.assert_array_equal(np.sort(batch["num_cond_frames"]), np.sort(nc))

    # --normalize applies docs/algorithm.md §9: z = (mu - mean_c) / std_c; 1024 channels is detected as projected text
    _, proj, _ = _arrays(7, rng, c=1024)
    np.save(tmp_path / "proj.npy", proj)
    out2 = str(tmp_path / "ds2")
    cmd = [
        sys.executable,
        "-m",
        "trigflow_distill.data.cli",
        "--latents",
        str(tmp_path / "lat.npy"),
        "--text",
        str(tmp_path / "proj.npy"),
        "--normalize",
        "--out",
        out2,
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    src2 = data.NpyDirSource(out2)
    mean = np.array(data.LATENT_MEAN, np.float64)[:, None, None, None]
    std = np.array(data.LATENT_STD, np.float64)[:, None, None, None]
    np.testing.assert_allclose(src2[4]["latents"], (lat[4] - mean) / std, rtol=1e-6, atol=1e-6)
    assert src2.text_kind == "projected" and src2.spec.fields == ()
    assert (
        write_main(["--latents", str(tmp_path / "lat.npy"), "--text", str(tmp_path / "txt.npy"), "--out", out2]) == 1
    )  # refuses to overwrite


def test_writer_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    lat, txt, nc = _arrays(7, rng)
    lat[5, 2, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"input record 5: latents has 1 non-finite"):
        data.write_dataset(str(tmp_path / "a"), lat, txt)
    with pytest.raises(ValueError, match="text has 6 records but latents has 7"):
        data.write_dataset(str(tmp_path / "b"), lat, txt[:6])
    nc[2] = 3
    with pytest.raises(ValueError, match=r"input record 2: num_cond_frames=3 is outside \[0, 3\)"):
        data.write_dataset(str(tmp_path / "c"), lat[:5], txt[:5], nc[:5])
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        data.NpyDirSource(str(tmp_path))


def test_bad_records_on_read_name_the_record(tmp_path):
    rng = np.random.default_rng(2)
    lat, txt, _ = _arrays(6, rng)
    out = str(tmp_path / "ds")
    data.write_dataset(out, lat, txt, shard_size=4)
    text_file = os.path.join(out, "shard-00001.text.npy")
    corrupted = np.load(text_file)
    corrupted[1, 0, 0] = np.inf  # record 5 = shard 1, row 1
    np.save(text_file, corrupted)
    with pytest.raises(ValueError, match=r"record 5 \(.*shard-00001.latents.npy etc., row 1\): text has 1 non-finite"):
        list(data.make_iterator(data.NpyDirSource(out), 2, seed=0, num_epochs=1))

    class WrongShape:
        spec = data.RecordSpec(LAT, TXT, ())

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {
                "latents": np.zeros(LAT if i != 2 else (16, 3, 4, 5), np.float32),
                "text": np.zeros(TXT, np.float32),
            }

    with pytest.raises(ValueError, match=r"record 2: latents has shape \(16, 3, 4, 5\), expected \(16, 3, 4, 4\)"):
        list(data.make_iterator(WrongShape(), 4, seed=0, num_epochs=1))


def test_version_1_datasets_still_load(tmp_path):
    """A dataset written by the version-1 writer (one latent_shape in meta.json, no buckets) reads unchanged."""
    rng = np.random.default_rng(3)
    lat, txt, nc = _arrays(5, rng)
    out = tmp_path / "v1"
    out.mkdir()
    for shard, rows in (("shard-00000", slice(0, 3)), ("shard-00001", slice(3, 5))):
        np.save(out / f"{shard}.latents.npy", lat[rows])
        np.save(out / f"{shard}.text.npy", txt[rows])
        np.save(out / f"{shard}.num_cond_frames.npy", nc[rows].astype(np.int32))
    meta = {
        "format": "trigflow_distill.data/1",
        "num_records": 5,
        "latent_shape": list(LAT),
        "text_shape": [5, 8],
        "text_kind": "raw",
        "latents_dtype": "float32",
        "text_dtype": "float32",
        "fields": ["num_cond_frames"],
        "shards": [{"name": "shard-00000", "num_records": 3}, {"name": "shard-00001", "num_records": 2}],
    }
    (out / "meta.json").write_text(json.dumps(meta))
    src = data.NpyDirSource(str(out))
    assert src.spec == data.RecordSpec(LAT, TXT, ("num_cond_frames",)) and len(src.buckets()) == 1
    np.testing.assert_array_equal(src[4]["latents"], lat[4])
    assert src.info(4) == {"bucket": "3x4x4"}
    batch = next(data.make_iterator(src, 5, seed=0))
    np.testing.assert_array_equal(np.sort(batch["num_cond_frames"]), np.sort(nc))
    meta["format"] = "trigflow_distill.data/0"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        data.NpyDirSource(str(out))


def _bucketed_dataset(tmp_path):
    """Two aspect buckets (latent W 4 and 6), three shards; pixel masks in one bucket, latent masks in the other."""
    rng = np.random.default_rng(4)
    w = data.DatasetWriter(str(tmp_path / "ds"))
    shapes = (
        ("wide", (16, 2, 4, 6), 5, (1, 32, 48)),
        ("square", (16, 2, 4, 4), 4, (1, 4, 4)),
        ("wide", (16, 2, 4, 6), 3, (1, 32, 48)),
    )
    count = 0
    for bucket, lat, n, pad in shapes:
        mask = np.zeros((n, *pad), np.uint8)
        mask[:, :, :, -pad[2] // 4 :] = 1
        info = [{"caption": f"clip {count + i}", "source": "a.mp4", "frames": [i, i + 9]} for i in range(n)]
        w.write_shard(
            rng.normal(size=(n, *lat)).astype(np.float32),
            rng.normal(size=(n, 5, 8)).astype(np.float32),
            bucket=bucket,
            prompt=np.arange(count, count + n),
            padding_mask=mask,
            info=info,
        )
        count += n
    return data.NpyDirSource(w.close())


def test_v2_padding_masks_info_and_bucketed_batches(tmp_path):
    src = _bucketed_dataset(tmp_path)
    assert len(src) == 12 and src.spec is None  # shapes differ across buckets
    assert [(b, len(i)) for b, _, i in src.buckets()] == [("wide", 8), ("square", 4)]
    rec = src[10]  # third shard, row 1
    assert rec["padding_mask"].shape == (1, 32, 48) and rec["padding_mask"].dtype == np.uint8
    assert src.info(10) == {"bucket": "wide", "caption": "clip 10", "source": "a.mp4", "frames": [1, 10]}
    assert src[5]["padding_mask"].shape == (1, 4, 4)

    batches = _take(data.make_iterator(src, 2, seed=1), 12)  # 6 batches per epoch: 4 wide + 2 square
    for b in batches:
        prompts = b["prompt"].tolist()
        assert all(p in range(5) or p in range(9, 12) for p in prompts) or all(p in range(5, 9) for p in prompts)
        assert b["latents"].shape[-1] == b["padding_mask"].shape[-1] // (8 if b["latents"].shape[-1] == 6 else 1)
        assert b["padding_mask"].dtype == np.float32
    for epoch in (batches[:6], batches[6:]):
        assert sorted(np.concatenate([b["prompt"] for b in epoch]).tolist()) == list(range(12))
    assert [b["prompt"].tolist() for b in batches[:6]] != [b["prompt"].tolist() for b in batches[6:]]
    _assert_batches_equal(batches, _take(data.make_iterator(src, 2, seed=1), 12))

    it = data.make_iterator(src, 2, seed=1)
    _take(it, 5)
    resumed = data.make_iterator(src, 2, seed=1)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    _assert_batches_equal(_take(resumed, 4), batches[5:9])
    halves = [_take(data.make_iterator(src, 2, seed=1, process_slice=slice(k, k + 1)), 6) for k in (0, 1)]
    for full, lo, hi in zip(batches, *halves):
        np.testing.assert_array_equal(full["latents"], np.concatenate([lo["latents"], hi["latents"]]))
    with pytest.raises(ValueError, match="no bucket holds a whole batch"):
        data.make_dataset(src, 9, 0)


def test_padding_mask_validation(tmp_path):
    rng = np.random.default_rng(5)
    lat, txt, _ = _arrays(3, rng)
    with pytest.raises(ValueError, match=r"neither latent \(1, 4, 4\) nor pixel \(1, 32, 32\)"):
        data.write_dataset(str(tmp_path / "a"), lat, txt, padding_mask=np.zeros((3, 1, 16, 16), np.uint8))
    bad = np.zeros((3, 1, 4, 4), np.float32)
    bad[1, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="input record 1: padding_mask must hold only 0"):
        data.write_dataset(str(tmp_path / "b"), lat, txt, padding_mask=bad)


def test_bfloat16_text_and_minimal_meta(tmp_path):
    """bfloat16 text (stored as uint16 bits) reads back as float32; meta.json may leave out fields, text_shape
    and padding_mask_shape (read from the first shard's files), as a shard-writing tool may."""
    import ml_dtypes

    rng = np.random.default_rng(6)
    lat, txt, _ = _arrays(4, rng)
    w = data.DatasetWriter(str(tmp_path / "ds"), text_kind="projected")
    w.write_shard(
        lat,
        txt.astype(ml_dtypes.bfloat16),
        bucket=[32, 32],
        padding_mask=np.ones((4, 1, 32, 32), np.uint8),
        info=[{"caption": "c", "video": "v.mp4", "frames": [0, 9], "fps": 24.0}] * 4,
    )
    out = w.close()
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["text_dtype"] == "bfloat16" and meta["shards"][0]["bucket"] == "32x32"
    for key in ("fields", "text_shape"):
        del meta[key]
    del meta["shards"][0]["padding_mask_shape"]
    (tmp_path / "ds" / "meta.json").write_text(json.dumps(meta))
    src = data.NpyDirSource(out)
    assert src.spec == data.RecordSpec(LAT, TXT, ("padding_mask",), (1, 32, 32)) and src.text_kind == "projected"
    np.testing.assert_array_equal(src[2]["text"], txt[2].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert src.info(3) == {"caption": "c", "video": "v.mp4", "frames": [0, 9], "fps": 24.0, "bucket": "32x32"}
    batch = next(data.make_iterator(src, 4, seed=0))
    assert batch["text"].dtype == np.float32 and batch["padding_mask"].shape == (4, 1, 32, 32)


def test_full_disk_is_a_one_line_error_naming_the_shard_and_the_rerun_writes(tmp_path, monkeypatch):
    """Shards are written through plain file writes (a memory map SIGBUSes on a full disk): ENOSPC in the middle of
    the second shard is an OSError naming the shard and the bytes it needs, nothing partial is left, and the same
    call run again writes the dataset."""
    import builtins
    import errno

    from trigflow_distill.data import writer as writer_module

    rng = np.random.default_rng(5)
    lat, txt, nc = _arrays(7, rng)
    out = str(tmp_path / "ds")
    budget = [4 * 16 * 3 * 4 * 4 * 4 + 4000]  # the first shard's files fit, the second's latents do not

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            budget[0] -= len(b)
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def close(self):
            self.f.close()

    monkeypatch.setattr(writer_module, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)
    with pytest.raises(OSError) as e:
        data.write_dataset(out, lat, txt, nc, shard_size=4)
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in message
    assert "shard-00001" in message and "bytes needed" in message, message
    need = 3 * (16 * 3 * 4 * 4 * 4 + 5 * 8 * 4 + 4) + 3 * 128  # its three files: records and npy headers
    assert int(message.split(" bytes needed")[0].rsplit("(", 1)[1]) == need
    assert not os.path.exists(out) or not os.listdir(out)  # the rerun is not refused as a non-empty --out

    # A disk known to be too small is refused before anything is written.
    monkeypatch.setattr(writer_module, "open", builtins.open)
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: shutil_usage(free=100))
    with pytest.raises(OSError, match=r"no space left .* for shard-00000 \(4 records\) \(\d+ bytes needed, 100 free"):
        data.write_dataset(out, lat, txt, nc, shard_size=4)
    monkeypatch.undo()
    src = data.NpyDirSource(data.write_dataset(out, lat, txt, nc, shard_size=4))
    np.testing.assert_array_equal(np.stack([src[i]["latents"] for i in range(7)]), lat)


def shutil_usage(free):
    import collections

    return collections.namedtuple("usage", "total used free")(10**9, 10**9 - free, free)


def test_meta_records_a_fingerprint_of_the_records(tmp_path):
    """meta.json records the CRC-32 and size of each shard file and a fingerprint over them; the same records give
    the same fingerprint, one changed value another; a meta.json edited by hand is an error."""
    import zlib

    rng = np.random.default_rng(6)
    lat, txt, nc = _arrays(7, rng)
    a = data.write_dataset(str(tmp_path / "a"), lat, txt, nc, shard_size=4)
    b = data.write_dataset(str(tmp_path / "b"), lat, txt, nc, shard_size=4)
    lat2 = lat.copy()
    lat2[6, 0, 0, 0, 0] += 1.0
    c = data.write_dataset(str(tmp_path / "c"), lat2, txt, nc, shard_size=4)
    meta = json.loads(open(os.path.join(a, "meta.json")).read())
    for shard in meta["shards"]:
        for name, rec in shard["checksums"].items():
            raw = open(os.path.join(a, name), "rb").read()
            assert rec == {"bytes": len(raw), "crc32": zlib.crc32(raw)}
    fp = dataset_fingerprint(a)
    assert fp.startswith("sha256:") and fp == meta["fingerprint"]
    assert dataset_fingerprint(b) == fp
    assert dataset_fingerprint(c) != fp
    meta["shards"][0]["num_records"] = 3
    open(os.path.join(a, "meta.json"), "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint does not match"):
        dataset_fingerprint(a)
    # A dataset written before the checksums: the file sizes stand in for them.
    for shard in meta["shards"]:
        del shard["checksums"]
    del meta["fingerprint"]
    open(os.path.join(b, "meta.json"), "w").write(json.dumps(meta))
    old = dataset_fingerprint(b)
    with open(os.path.join(b, "shard-00001.latents.npy"), "ab") as f:
        f.write(b"\0" * 4)
    assert dataset_fingerprint(b) != old


def test_dataset_record_is_the_directory_and_its_fingerprint(tmp_path):
    """What a run records of its dataset (dataset.json): a dataset directory's path and meta.json fingerprint; an
    in-memory source has none."""
    from trigflow_distill.training import run_config

    lat, txt, nc = _arrays(5, np.random.default_rng(7))
    out = data.write_dataset(str(tmp_path / "d"), lat, txt, nc)
    record = run_config.dataset_record(data.NpyDirSource(out))
    assert record == {
        "path": out,
        "fingerprint": json.loads(open(os.path.join(out, "meta.json")).read())["fingerprint"],
    }
    assert run_config.dataset_record(data.make_synthetic_source(4, LAT, TXT, seed=0)) is None
