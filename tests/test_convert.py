"""convert: native .pt / diffusers folders <-> Flax params, exports, the teacher cache and the CLI."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from trigflow_distill.models import cosmos_dit, torchfile
from trigflow_distill.models.cosmos_dit import convert, teacher_cache
from trigflow_distill.models.cosmos_dit import names as sdmap

import torch_dmd2  # (benchmarks/ is on the pytest pythonpath: diffusers stand-ins shared with the benchmarks)

CONFIG = cosmos_dit.get_preset("tiny")


def random_params(seed=0, dtype=np.float32):
    """Tiny-preset params with every leaf random (also the zero-initialised adaLN layers and the bias)."""
    rng = np.random.default_rng(seed)
    shapes = cosmos_dit.param_shapes(CONFIG)
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(dtype), shapes, is_leaf=lambda s: isinstance(s, tuple))


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_release_pt(path, native: dict, prefix="net.", extra=True):
    """A release-style file written by torch itself (independent of torchfile.save), with the buffers and
    extra-state entries the converter must ignore."""
    sd = {f"{prefix}{k}": to_torch(v) for k, v in native.items()}
    if extra:
        sd[f"{prefix}pos_embedder.seq"] = torch.arange(8.0)
        sd[f"{prefix}accum_video_sample_counter"] = torch.tensor(5)
        sd[f"{prefix}blocks.0.self_attn.q_proj._extra_state"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(sd, path)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.fixture
def release(tmp_path):
    """(path, native bf16 state dict) of a tiny release-style `.pt`."""
    native = sdmap.state_dict_from_params(random_params(dtype=ml_dtypes.bfloat16), CONFIG)
    path = tmp_path / "tiny_ema_bf16.pt"
    write_release_pt(path, native)
    return path, native


def test_pt_round_trip_native_flax_native(release, tmp_path):
    path, native = release
    config, params = convert.load_torch_checkpoint(path)
    assert config == CONFIG  # whole architecture inferred from the shapes
    assert_trees_equal(params, jax.tree.map(np.asarray, sdmap.params_from_state_dict(native, CONFIG)))
    out = tmp_path / "student.pt"
    convert.export_torch(params, config, out)
    reloaded = torch.load(out, weights_only=True)
    assert set(reloaded) == {f"net.{k}" for k in native}  # ignored entries are not written back
    original = torch.load(path, weights_only=True)
    for k in native:
        assert reloaded[f"net.{k}"].dtype == torch.bfloat16
        assert torch.equal(reloaded[f"net.{k}"], original[f"net.{k}"]), k
    assert "net.crossattn_proj.0.weight" in reloaded  # the frozen text projection is exported


def test_export_torch_float32_is_exact(tmp_path):
    params = random_params()
    out = tmp_path / "fp32.pt"
    convert.export_torch(params, CONFIG, out, dtype=np.float32)
    reloaded = torch.load(out, weights_only=True)
    native = sdmap.state_dict_from_params(params, CONFIG)
    for k, v in native.items():
        np.testing.assert_array_equal(reloaded[f"net.{k}"].numpy(), v, err_msg=k)
    _, back = convert.load_torch_checkpoint(out)
    assert_trees_equal(back, params)


def test_prefix_selection(tmp_path):
    net = sdmap.state_dict_from_params(random_params(1), CONFIG)
    ema = sdmap.state_dict_from_params(random_params(2), CONFIG)
    sd = {
        **{f"net.{k}": to_torch(v) for k, v in net.items()},
        **{f"net_ema.{k}": to_torch(v) for k, v in ema.items()},
        "optimizer.step": torch.tensor(3),
    }
    path = tmp_path / "train.pt"
    torch.save(sd, path)
    _, auto = convert.load_torch_checkpoint(path)
    assert_trees_equal(auto, sdmap.params_from_state_dict(ema, CONFIG))  # the teacher is the EMA
    _, plain = convert.load_torch_checkpoint(path, prefix="net.")
    assert_trees_equal(plain, sdmap.params_from_state_dict(net, CONFIG))
    with pytest.raises(ValueError, match=r"train\.pt.*'model\.'.*net_ema\."):
        convert.load_torch_checkpoint(path, prefix="model.")
    bare = tmp_path / "bare.pt"
    write_release_pt(bare, net, prefix="")
    _, got = convert.load_torch_checkpoint(bare)
    assert_trees_equal(got, sdmap.params_from_state_dict(net, CONFIG))


def _edited(tmp_path, name, edit):
    native = sdmap.state_dict_from_params(random_params(), CONFIG)
    edit(native)
    path = tmp_path / name
    write_release_pt(path, native)
    return path


def test_missing_key(tmp_path):
    path = _edited(tmp_path, "missing.pt", lambda sd: sd.pop("blocks.1.mlp.layer2.weight"))
    with pytest.raises(ValueError, match=r"missing\.pt.*missing keys \[blocks\.1\.mlp\.layer2\.weight\]"):
        convert.load_torch_checkpoint(path)


def test_unexpected_key(tmp_path):
    path = _edited(tmp_path, "unexpected.pt", lambda sd: sd.update({"blocks.0.lora_A.weight": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match=r"unexpected\.pt.*unexpected keys \[blocks\.0\.lora_A\.weight\]"):
        convert.load_torch_checkpoint(path)


def test_shape_mismatch(tmp_path):
    def edit(sd):
        sd["blocks.1.cross_attn.q_proj.weight"] = np.zeros((128, 64), np.float32)

    path = _edited(tmp_path, "shape.pt", edit)
    with pytest.raises(
        ValueError,
        match=r"shape\.pt.*blocks\.1\.cross_attn\.q_proj\.weight: \(128, 64\) != expected "
        r"\(128, 128\)",
    ):
        convert.load_torch_checkpoint(path)


def test_truncated_and_missing_files(release, tmp_path):
    path, _ = release
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(torchfile.TorchFileError, match=r"cut\.pt.*truncated or corrupt"):
        convert.load_torch_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match=r"nothere\.pt"):
        convert.load_torch_checkpoint(tmp_path / "nothere.pt")
    with pytest.raises(FileNotFoundError, match=r"nothere"):
        teacher_cache.load_teacher(tmp_path / "nothere", tmp_path / "cache")


def test_wrong_model_family(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({f"net.{k}": v for k, v in torch.nn.Conv2d(3, 4, 3).state_dict().items()}, path)
    with pytest.raises(ValueError, match=r"resnet\.pt.*wrong model family"):
        convert.load_torch_checkpoint(path)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match=r"wrong model family.*UNet2DConditionModel"):
        convert.load_diffusers_folder(folder)


def test_export_diffusers_loads_and_matches(tmp_path):
    from diffusers import CosmosTransformer3DModel

    params = random_params(3)
    for leaf in ("q_norm", "k_norm"):  # near-1 norm scales keep the random net well conditioned
        for attn in ("self_attn", "cross_attn"):
            params["blocks"][attn][leaf]["scale"] = 1 + 0.1 * params["blocks"][attn][leaf]["scale"]
    params = jax.tree.map(lambda a: a * np.float32(0.5), params)
    out = tmp_path / "diffusers"
    convert.export_diffusers(params, CONFIG, out, dtype=np.float32)
    model = CosmosTransformer3DModel.from_pretrained(out).eval()
    torch_dmd2.set_cosmos_qk_eps(model)  # diffusers hard-codes 1e-5; Cosmos (docs/algorithm.md §8) uses 1e-6
    torch_dmd2.install_nearest_resize()

    rng = np.random.default_rng(0)
    b, t, h, w = 2, 2, 8, 8
    x = rng.standard_normal((b, 16, t, h, w)).astype(np.float32)
    tau = rng.uniform(0.05, 0.95, (b, t)).astype(np.float32)
    text = rng.standard_normal((b, 5, CONFIG.crossattn_proj_in_channels)).astype(np.float32)
    cond = np.zeros((b, 1, t, h, w), np.float32)
    cond[:, :, 0] = 1
    pad = (rng.uniform(size=(1, 1, 4 * h, 4 * w)) > 0.7).astype(np.float32)
    want = cosmos_dit.velocity(CONFIG, params, x, tau, text, cond, pad)
    with torch.no_grad():
        got = model(
            torch.from_numpy(x),
            torch.from_numpy(tau).reshape(b, 1, t, 1, 1),
            torch.from_numpy(text),
            condition_mask=torch.from_numpy(cond),
            padding_mask=torch.from_numpy(pad),
            return_dict=False,
        )[0].numpy()
    scale = np.abs(np.asarray(want)).max()
    assert np.abs(got - np.asarray(want)).max() <= 1e-4 * scale

    config, back = convert.load_diffusers_folder(out)
    assert config == CONFIG
    assert_trees_equal(back, params)
    assert convert.convert(out, tmp_path / "converted") == CONFIG  # the streaming path from safetensors
    assert_trees_equal(convert.load_converted(tmp_path / "converted")[1], params)


def test_load_teacher_caches(release, tmp_path, monkeypatch):
    path, _ = release
    cache = tmp_path / "cache"
    config, params = teacher_cache.load_teacher(path, cache)
    direct_config, direct = convert.load_torch_checkpoint(path)
    assert config == direct_config
    assert_trees_equal(params, direct)
    assert len(os.listdir(cache)) == 1

    calls = []
    real_source = convert._source

    def counting_source(*args, **kwargs):
        calls.append(args)
        return real_source(*args, **kwargs)

    monkeypatch.setattr(convert, "_source", counting_source)
    monkeypatch.setattr(torchfile, "LazyStateDict", None)  # any re-read of the source would fail
    cached_config, cached = teacher_cache.load_teacher(path, cache, dtype="bfloat16")
    assert not calls
    assert cached_config == cosmos_dit.get_preset("tiny", dtype="bfloat16")  # overrides apply to cached entries
    assert_trees_equal(cached, direct)

    monkeypatch.undo()
    monkeypatch.setattr(convert, "_source", counting_source)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # the source changed
    teacher_cache.load_teacher(path, cache)
    assert len(calls) == 1 and len(os.listdir(cache)) == 2


def test_cli_round_trip(release, tmp_path, capsys):
    path, native = release
    dst = tmp_path / "converted"
    assert convert.main([str(path), str(dst)]) == 0
    config, params = convert.load_converted(dst)
    assert config == CONFIG
    assert_trees_equal(params, convert.load_torch_checkpoint(path)[1])
    capsys.readouterr()
    assert convert.main([str(path), str(dst)]) == 1
    assert f"error: {dst} already exists; pass --overwrite" in capsys.readouterr().err
    assert convert.main([str(path), str(dst), "--overwrite"]) == 0
    assert_trees_equal(convert.load_converted(dst)[1], params)
    out = tmp_path / "back.pt"
    assert convert.main(["--export-torch", str(dst), str(out)]) == 0
    reloaded = torch.load(out, weights_only=True)
    for k, v in native.items():
        np.testing.assert_array_equal(to_numpy(reloaded[f"net.{k}"]), v, err_msg=k)


def test_exports_refuse_to_overwrite(release, tmp_path, capsys):
    path, _ = release
    config, params = convert.load_torch_checkpoint(path)
    teacher_copy = tmp_path / "teacher_copy.pt"
    teacher_copy.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"teacher_copy\.pt already exists; pass --overwrite"):
        convert.export_torch(params, config, teacher_copy)
    assert teacher_copy.read_bytes() == b"precious"
    convert.export_torch(params, config, teacher_copy, overwrite=True)
    assert_trees_equal(convert.load_torch_checkpoint(teacher_copy)[1], params)

    folder = tmp_path / "diffusers"
    convert.export_diffusers(params, config, folder)
    stamp = (folder / "config.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"diffusion_pytorch_model\.safetensors already exists.*--overwrite"):
        convert.export_diffusers(params, config, folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    convert.export_diffusers(params, config, folder, overwrite=True)

    dst = tmp_path / "converted"
    convert.convert(path, dst)
    assert convert.main(["--export-torch", str(dst), str(teacher_copy)]) == 1
    assert f"error: {teacher_copy} already exists; pass --overwrite" in capsys.readouterr().err
    assert convert.main(["--export-diffusers", str(dst), str(folder)]) == 1
    assert convert.main(["--export-diffusers", str(dst), str(folder), "--overwrite"]) == 0


def test_convert_streams_and_matches_direct_load(release, tmp_path):
    path, _ = release
    dst = tmp_path / "c"
    config = convert.convert(path, dst, prefix="net.")
    assert config == CONFIG
    assert sorted(os.listdir(dst)) == ["COMPLETE", "params", "source.json"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the temporary folder was renamed
    assert_trees_equal(convert.load_converted(dst)[1], convert.load_torch_checkpoint(path)[1])
    with pytest.raises(ValueError, match=r"no keys with prefix 'net_ema\.'"):
        convert.convert(path, tmp_path / "d", prefix="net_ema.")
    assert not (tmp_path / "d").exists()


def _truncate_leaf(entry):
    leaf = entry / "params" / "blocks.mlp.layer1.kernel"
    leaf.write_bytes(leaf.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate_leaf, r"params/blocks\.mlp\.layer1\.kernel has 100 bytes"),
        (lambda e: (e / "COMPLETE").unlink(), "no COMPLETE marker"),
        (lambda e: (e / "source.json").write_text("{not json"), "unreadable source.json"),
    ],
)
def test_corrupted_cache_is_converted_again(release, tmp_path, capsys, damage, why):
    path, _ = release
    cache = tmp_path / "cache"
    _, params = teacher_cache.load_teacher(path, cache)
    params = jax.tree.map(np.array, params)  # copies: the cache's leaves are memory maps of the files damaged next
    assert "converting teacher" in capsys.readouterr().err
    (entry,) = cache.iterdir()
    damage(entry)
    with pytest.raises(ValueError, match=f"incomplete or corrupted converted checkpoint: .*{why}"):
        convert.load_converted(entry)
    _, again = teacher_cache.load_teacher(path, cache)
    assert re.search(
        f"teacher cache {entry} is incomplete or corrupted \\(.*{why}.*\\); converting again", capsys.readouterr().err
    )
    assert_trees_equal(again, params)
    _, cached = teacher_cache.load_teacher(path, cache)
    assert capsys.readouterr().err == ""  # repaired: a plain cache hit
    assert [p.name for p in cache.iterdir()] == [entry.name]


def test_stale_temporaries_of_killed_conversions_are_removed(release, tmp_path):
    path, _ = release
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".c.tmp-{host}-{dead.pid}-0000"
    live = tmp_path / f".c.tmp-{host}-{os.getpid()}-1111"  # a conversion still running in this process
    other = tmp_path / ".c.tmp-otherhost-1-2222"  # another host's: its process cannot be checked from here
    for folder in (stale, live, other):
        folder.mkdir()
    convert.convert(path, tmp_path / "c")
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")} == {other.name, live.name}


def test_waiting_process_times_out_with_clear_message(release, tmp_path):
    path, _ = release
    with pytest.raises(
        TimeoutError,
        match=r"process 1: waited 0 s for process 0 to convert the teacher into .*"
        r"COMPLETE.*shared by all hosts",
    ):
        teacher_cache.load_teacher(
            path, tmp_path / "cache", process_index=1, num_processes=2, wait_timeout_s=0.2, poll_s=0.05
        )


def test_teacher_from_hub_cache_offline(release, tmp_path, monkeypatch):
    path, _ = release
    snapshot = tmp_path / "hub" / "models--owner--cosmos" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "teacher.pt").symlink_to(path)
    refs = tmp_path / "hub" / "models--owner--cosmos" / "refs"
    refs.mkdir()
    (refs / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRIGFLOW_HF_CACHE", str(tmp_path / "hub"))
    config, params = teacher_cache.load_teacher("hf://owner/cosmos/teacher.pt", tmp_path / "cache")
    assert config == CONFIG
    assert_trees_equal(params, convert.load_torch_checkpoint(path)[1])
    with pytest.raises(FileNotFoundError, match=r"repository owner/cosmos, path 'student\.pt', revision main"):
        teacher_cache.load_teacher("hf://owner/cosmos/student.pt", tmp_path / "cache")


def test_cli_help_and_summary(release, tmp_path):
    path, _ = release
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    helped = subprocess.run(
        [sys.executable, "-m", "trigflow_distill.models.cosmos_dit.convert", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "--export-torch" in helped.stdout and "--export-diffusers" in helped.stdout
    run = subprocess.run(
        [sys.executable, "-m", "trigflow_distill.models.cosmos_dit.convert", str(path), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    n = sum(
        int(np.prod(s))
        for s in jax.tree.leaves(cosmos_dit.param_shapes(CONFIG), is_leaf=lambda s: isinstance(s, tuple))
    )
    assert f"{n:,} params" in run.stderr and "dtype bfloat16" in run.stderr


def test_progress_bar(release, monkeypatch, capsys):
    path, _ = release
    monkeypatch.setattr(convert, "_PROGRESS_MIN_BYTES", 0)
    convert.load_torch_checkpoint(path, progress=True)
    err = capsys.readouterr().err
    assert "tiny_ema_bf16.pt: 100%" in err
    assert err.endswith("\n")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// served from a local folder: etils.epath reaches gs:// through fsspec's "gcs" protocol."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path).removeprefix("gs://").removeprefix("gcs://").removeprefix(f"{root}/")
            return os.path.join(root, path).rstrip("/")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

    registry = sys.modules["fsspec.registry"]._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
    return root


def test_remote_destinations(release, tmp_path, fake_gcs):
    path, native = release
    assert convert.convert(path, "gs://bucket/converted") == CONFIG
    assert sorted(os.listdir(fake_gcs / "bucket" / "converted")) == ["COMPLETE", "params", "source.json"]
    config, params = convert.load_converted("gs://bucket/converted")
    assert config == CONFIG and not isinstance(jax.tree.leaves(params)[0], np.memmap)
    assert_trees_equal(params, convert.load_torch_checkpoint(path)[1])
    with pytest.raises(FileExistsError, match="gs://bucket/converted already exists; pass --overwrite"):
        convert.convert(path, "gs://bucket/converted")

    _, cached = teacher_cache.load_teacher(path, "gs://bucket/cache")
    assert_trees_equal(cached, params)
    assert len(os.listdir(fake_gcs / "bucket" / "cache")) == 1
    convert.export_torch(params, config, "gs://bucket/student.pt")
    reloaded = torch.load(fake_gcs / "bucket" / "student.pt", weights_only=True)
    for k, v in native.items():
        np.testing.assert_array_equal(to_numpy(reloaded[f"net.{k}"]), v, err_msg=k)
    with pytest.raises(FileExistsError, match="gs://bucket/student.pt already exists"):
        convert.export_torch(params, config, "gs://bucket/student.pt")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gs")]  # nothing landed in a local "gs:" folder


def test_single_block_teacher_converts_exactly(tmp_path):
    """A one-block net still has stacked block leaves (1, ...): direct load and streamed conversion both keep it."""
    config = cosmos_dit.get_preset("tiny", num_blocks=1)
    params = jax.tree.map(np.asarray, cosmos_dit.init_params(config, jax.random.PRNGKey(3)))
    src = tmp_path / "one_block.pt"
    convert.export_torch(params, config, src, dtype=np.float32)
    assert_trees_equal(convert.load_torch_checkpoint(src)[1], params)
    convert.convert(src, tmp_path / "converted")
    assert_trees_equal(convert.load_converted(tmp_path / "converted")[1], params)


def test_damaged_diffusers_safetensors_is_named(tmp_path):
    """A truncated diffusers weights file: a one-line ValueError naming it (the library's error names no file)."""
    folder = tmp_path / "diffusers"
    convert.export_diffusers(random_params(), CONFIG, folder, dtype=np.float32)
    weights = sorted(folder.rglob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        convert.load_diffusers_folder(folder)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
