"""torchfile: the torch-free checkpoint reader/writer against torch.save / torch.load."""

import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from trigflow_distill.models import torchfile


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "fp32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "bf16_transposed": torch.randn(4, 5, generator=g).to(torch.bfloat16).t(),
        "offset_view": torch.arange(10.0)[2:8],
        "strided_view": base[1::2, ::3],
        "shares_storage_with_strided": base,
        "fp16": torch.randn(7, generator=g).half(),
        "fp64": torch.randn(2, 2, generator=g).double(),
        "int64_scalar": torch.tensor(3, dtype=torch.int64),
        "int32": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "big_int": torch.tensor([2**40], dtype=torch.int64),
    }


def test_reader_equals_torch_load(tmp_path):
    path = tmp_path / "sd.pt"
    sd = sample_state_dict()
    torch.save(sd, path)
    reference = torch.load(path, weights_only=True)
    for mmap in (True, False):
        got = torchfile.load(path, mmap=mmap)
        assert set(got) == set(reference)
        for k, t in reference.items():
            want = to_numpy(t)
            assert got[k].dtype == want.dtype, k
            assert got[k].shape == want.shape, k
            np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert torchfile.load(path)["bf16"].dtype == ml_dtypes.bfloat16


def test_reader_module_state_dict_and_nested(tmp_path):
    """A module's state_dict (OrderedDict with _metadata) and a nested {"model": ...} dict."""
    lin = torch.nn.Linear(3, 2)
    path = tmp_path / "nested.pt"
    param = torch.nn.Parameter(torch.arange(3.0))
    torch.save({"model": lin.state_dict(), "step": 7, "name": "x", "param": param}, path)
    got = torchfile.load(path)
    assert set(got) == {"model.weight", "model.bias", "param"}  # non-tensor entries dropped
    np.testing.assert_array_equal(got["param"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(got["model.weight"], lin.weight.detach().numpy())


def test_save_is_read_by_torch_weights_only(tmp_path):
    sd = {k: to_numpy(v) for k, v in sample_state_dict().items()}
    sd["bf16_transposed"] = np.asarray(sd["bf16_transposed"])  # non-contiguous input gets made contiguous
    path = tmp_path / "mine.pt"
    torchfile.save(path, sd)
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert to_numpy(got[k]).dtype == v.dtype, k
            np.testing.assert_array_equal(to_numpy(got[k]), v, err_msg=k)
    back = torchfile.load(path)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        assert zf.testzip() is None  # CRCs are right
        offsets = [torchfile._member_data_offset(f, i) for i in zf.infolist() if "/data/" in i.filename]
    assert offsets and all(o % 64 == 0 for o in offsets)
    assert not os.path.exists(str(path) + ".tmp")


def test_save_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        torchfile.save(tmp_path / "c.pt", {"x": np.zeros(2, np.complex64)})


class _WritesMarker:
    """Pickles to `os.system("touch <marker>")`: a classic malicious checkpoint payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_malicious_pickle_runs_no_code(tmp_path):
    # The payload is live: plain pickle executes it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"w": _WritesMarker(probe)}, protocol=2))
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, pickle.dumps({"w": _WritesMarker(marker)}, protocol=2))
    with pytest.raises(torchfile.UnsafePickleError, match=r"evil\.pt.*(posix|os)\.system"):
        torchfile.load(path)
    assert not marker.exists()


def test_malicious_bytes_encoding_rejected(tmp_path):
    # _codecs.encode is allowed only as encode(str, "latin1").
    payload = b"\x80\x02}(X\x01\x00\x00\x00bc_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86Ru."
    path = tmp_path / "codec.pt"
    _zip_with_pickle(path, payload)
    with pytest.raises(torchfile.UnsafePickleError, match="latin1"):
        torchfile.load(path)


def test_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        torchfile.load(tmp_path / "missing.pt")


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="dcp_to_torch_save"):
        torchfile.load(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(torchfile.TorchFileError, match=r"t\.pt.*truncated or corrupt"):
        torchfile.load(path)


def test_storage_shorter_than_tensor(tmp_path):
    path = tmp_path / "short.pt"
    torch.save({"w": torch.randn(16)}, path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "cut.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:8] if "/data/" in info.filename else data)
    with pytest.raises(torchfile.TorchFileError, match=r"cut\.pt.*storage.*8 bytes, needs 64"):
        torchfile.load(tmp_path / "cut.pt")


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "garbage.pt"
    _zip_with_pickle(path, b"\x80\x02}(X\x01\x00\x00\x00a")  # ends mid-stream
    with pytest.raises(torchfile.TorchFileError, match=r"garbage\.pt.*corrupt"):
        torchfile.load(path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(torchfile.TorchFileError, match=r"notes\.txt.*not a PyTorch checkpoint"):
        torchfile.load(text)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.md", "x")
    with pytest.raises(torchfile.TorchFileError, match=r"other\.zip.*data\.pkl"):
        torchfile.load(other_zip)
    listy = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(torchfile.TorchFileError, match="holds a list"):
        torchfile.load(listy)


def test_legacy_format_is_named(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(torchfile.TorchFileError, match="legacy"):
        torchfile.load(path)


def test_out_of_bounds_view_is_rejected(tmp_path):
    # A pickle whose tensor claims more elements than its storage holds.
    path = tmp_path / "oob.pt"
    torchfile.save(path, {"w": np.zeros(4, np.float32)})
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = members["archive/data.pkl"]
    shape_4 = b"(J\x04\x00\x00\x00t"
    assert pkl.count(shape_4) == 1
    members["archive/data.pkl"] = pkl.replace(shape_4, b"(J\x09\x00\x00\x00t")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(torchfile.TorchFileError, match="past its storage"):
        torchfile.load(path)


@pytest.mark.parametrize("mmap", [True, False])
def test_lazy_state_dict_reads_on_access(tmp_path, mmap):
    path = tmp_path / "lazy.pt"
    sd = sample_state_dict()
    torch.save(sd, path)
    read = []
    lazy = torchfile.LazyStateDict(path, on_read=lambda k, n: read.append((k, n)), mmap=mmap)
    assert set(lazy) == set(sd) and len(lazy) == len(sd)
    assert not read  # opening reads no tensor data
    assert lazy.shapes["strided_view"] == (3, 3)
    got = lazy["strided_view"]
    assert got.flags.writeable == (not mmap)
    np.testing.assert_array_equal(got, to_numpy(sd["strided_view"]))
    assert read == [("strided_view", 3 * 3 * 4)]
    renamed = lazy.subset({"x": "bf16_transposed"})
    assert list(renamed) == ["x"]
    np.testing.assert_array_equal(renamed["x"], to_numpy(sd["bf16_transposed"]))
    for k in sd:
        np.testing.assert_array_equal(lazy[k], to_numpy(sd[k]), err_msg=k)


def test_reading_needs_no_torch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t()}, path)
    code = (
        "import sys; from trigflow_distill.models import torchfile; "
        f"w = torchfile.load({str(path)!r})['w']; "
        "assert w.tolist() == [[0, 3], [1, 4], [2, 5]], w; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_safetensors_header_checks_name_the_file(tmp_path):
    """`safetensors_header` is what every safetensors reader calls first (the library's errors name no file)."""
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(4, np.int64)}, str(path))
    header = torchfile.safetensors_header(path)
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {"a": ("F32", [2, 3]), "b": ("I64", [4])}
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {
        b"": "shorter than the 8-byte header length",
        data[:-8]: "outside the",
        data[:8] + b"[" * n + data[8 + n :]: "not valid JSON",
        (len(data)).to_bytes(8, "little") + data[8:]: "header length",
        data.replace(b'"F32"', b'"F99"'): "unknown dtype 'F99'",
        data.replace(b"[2,3]", b"[3,3]"): "does not fill its 24 bytes",
    }
    for content, why in cases.items():
        path.write_bytes(content)
        with pytest.raises(torchfile.TorchFileError, match=why) as e:
            torchfile.safetensors_header(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
