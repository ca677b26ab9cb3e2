"""hub.resolve: local paths, hf:// files/folders/revisions from a Hub cache built here (offline), remote URLs, an
unreachable Hub."""

import hashlib
import os
import time

import httpx2
import pytest
from etils import epath

from trigflow_distill.models import hub, reason1, wan_vae

MAIN = "a" * 40
V1 = "b" * 40


def _put(cache, repo, commit, rel, data: bytes):
    """Adds a file to the Hub cache layout huggingface_hub reads: blobs/<sha256>, snapshots/<commit>/<rel> -> blob."""
    root = cache / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "snapshots" / commit / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = "owner/model"
    _put(cache, repo, MAIN, "weights/model.pt", b"main weights")
    _put(cache, repo, MAIN, "vae/config.json", b"{}")
    _put(cache, repo, MAIN, "vae/diffusion_pytorch_model.safetensors", b"vae")
    _put(cache, repo, V1, "weights/model.pt", b"v1 weights")
    refs = cache / "models--owner--model" / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN)
    (refs / "v1").write_text(V1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRIGFLOW_HF_CACHE", str(cache))
    return cache


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_hf_file_folder_revision_offline(hub_cache):
    assert _read(hub.resolve("hf://owner/model/weights/model.pt")) == b"main weights"
    assert _read(hub.resolve("hf://owner/model/weights/model.pt@v1")) == b"v1 weights"
    assert _read(hub.resolve("hf://owner/model/weights/model.pt", revision="v1")) == b"v1 weights"
    assert _read(hub.resolve(f"hf://owner/model/weights/model.pt@{V1}")) == b"v1 weights"
    vae = hub.resolve("hf://owner/model/vae")
    assert sorted(os.listdir(vae)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert vae == str(hub_cache / "models--owner--model" / "snapshots" / MAIN / "vae")
    repo = hub.resolve("hf://owner/model")
    assert sorted(os.listdir(repo)) == ["vae", "weights"]
    # the argument wins over TRIGFLOW_HF_CACHE
    with pytest.raises(FileNotFoundError):
        hub.resolve("hf://owner/model/weights/model.pt", cache_dir=str(hub_cache.parent / "elsewhere"))


@pytest.mark.parametrize(
    "src, what",
    [
        ("hf://owner/model/weights/missing.pt", "path 'weights/missing.pt', revision main"),
        ("hf://owner/model/vae/config.json@v1", "path 'vae/config.json', revision v1"),
        ("hf://owner/other/model.pt", "repository owner/other"),
        ("hf://owner/model/weights/model.pt@v2", "revision v2"),
    ],
)
def test_offline_missing_names_repo_file_revision(hub_cache, src, what):
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve(src)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "HF_HUB_OFFLINE=1" in msg and str(hub_cache) in msg


def test_local_and_remote(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    assert hub.resolve(str(f)) == str(f)
    assert hub.resolve(f"file://{f}") == str(f)
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        hub.resolve(str(tmp_path / "nope.pt"))
    assert hub.resolve("gs://bucket/teacher.pt") == "gs://bucket/teacher.pt"


@pytest.mark.parametrize("bad", ["hf://owner", "hf://owner/model@", "hf://"])
def test_bad_hf_urls(bad):
    with pytest.raises(ValueError, match="hf://OWNER/NAME"):
        hub.parse_hf(bad)


def test_resolve_local_refuses_remote_weights_and_names_the_fix(tmp_path):
    """Memory-mapped weights (VAE, text encoder) must be local or hf://: gs:// is a one-line error, not a crash."""
    (tmp_path / "w.pth").write_bytes(b"x")
    assert hub.resolve_local(str(tmp_path / "w.pth"), "the VAE") == epath.Path(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="gs://b/wan_vae.pth: the VAE must be a local path or hf://.*copy it"):
        hub.resolve_local("gs://b/wan_vae.pth", "the VAE")
    with pytest.raises(ValueError, match="the text encoder must be a local path"):
        reason1.load("gs://b/reason1")
    with pytest.raises(ValueError, match="the VAE must be a local path"):
        wan_vae.load("gs://b/tokenizer.pth")


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a port nothing listens on, online mode, an empty cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # read at import by huggingface_hub
    monkeypatch.setenv("TRIGFLOW_HF_CACHE", str(tmp_path / "empty_cache"))


def test_unreachable_hub_is_one_line_in_seconds(unreachable_hub):
    start = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        hub.resolve("hf://owner/model/weights/model.pt")
    assert time.monotonic() - start < 5  # huggingface_hub alone retries for ~25 s
    msg = str(e.value)
    assert "\n" not in msg and "not found" not in msg
    assert "cannot be reached" in msg and "http://127.0.0.1:9" in msg and "Connection refused" in msg
    assert "HF_HUB_OFFLINE=1 with a filled cache" in msg and "local path" in msg


def test_unreachable_hub_still_serves_the_cache(hub_cache, unreachable_hub, monkeypatch):
    monkeypatch.setenv("TRIGFLOW_HF_CACHE", str(hub_cache))
    assert _read(hub.resolve("hf://owner/model/weights/model.pt")) == b"main weights"
    with pytest.raises(ConnectionError, match="cannot be reached"):
        hub.resolve("hf://owner/model/weights/missing.pt")


def test_unreachable_probe_retries_once(monkeypatch):
    calls = []

    class Session:
        def head(self, url, timeout):
            calls.append((url, timeout))
            raise httpx2.ConnectTimeout("timed out")

    monkeypatch.setattr(hub.huggingface_hub, "get_session", Session)
    assert hub.hub_unreachable() == "ConnectTimeout: timed out" and len(calls) == 2


def test_not_found_on_a_reachable_hub_keeps_its_message(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRIGFLOW_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/missing"))

    def not_found(**kw):
        raise hub.hf_errors.RepositoryNotFoundError("Repository Not Found", response=response)

    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", not_found)
    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve("hf://owner/missing/model.pt")
    msg = str(e.value)
    assert "repository owner/missing" in msg and "not found on the Hub (RepositoryNotFoundError)" in msg
    assert "cannot be reached" not in msg
