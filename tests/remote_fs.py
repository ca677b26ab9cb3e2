"""A fake `gs://` for tests, served from a local folder (no network, no credentials).

etils.epath reaches gs:// through fsspec's "gs"/"gcs" protocols; they are replaced by a LocalFileSystem rooted at
the given folder. Orbax reads (step listing, metadata, partial restores) are pointed there too by two patches of its
GCS hooks: the bucket-namespace probe (it would import google.cloud.storage) and the path normaliser that builds
TensorStore specs (gs:// would go to TensorStore's own GCS driver, which fsspec cannot serve). Orbax *saves* to the
fake still fail (its per-process OCDBT merge needs CopyRange, which the rewritten specs do not support), so tests that
train redirect `checkpoint.make_manager` to the fake's folder (see `redirect_checkpoints`).
"""

import functools
import os
import re
import sys

from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils


def local_path(root, url) -> str:
    """The fake's local file for gs://BUCKET/PATH (also for gs:/BUCKET/PATH, as os.path.normpath leaves it)."""
    return os.path.join(root, re.sub(r"^gc?s:/+", "", str(url)))


def serve_gs(root, monkeypatch) -> None:
    """Serve gs://BUCKET/PATH from ROOT/BUCKET/PATH for epath (fsspec) and for Orbax reads."""
    root = os.fspath(root)

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = re.sub(r"^gc?s:/+", "", str(path)).lstrip("/")
            path = path.removeprefix(root.lstrip("/")).lstrip("/")  # already-translated paths stay put
            return os.path.join(root, path).rstrip("/")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

    registry = sys.modules["fsspec.registry"]._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    # etils caches one file system per protocol for the whole process: give this test a fresh cache.
    get_filesystem = epath_backend._FileSystemSpecBackend._get_filesystem
    monkeypatch.setattr(
        epath_backend._FileSystemSpecBackend, "_get_filesystem", functools.lru_cache()(get_filesystem.__wrapped__)
    )
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(tensorstore_utils, "_normalize_path", lambda path: os.path.normpath(local_path(root, path)))


def redirect_checkpoints(root, monkeypatch) -> None:
    """checkpoint.make_manager(gs://B/P, ...) writes into ROOT/B/P/checkpoints (Orbax saves cannot use the fake)."""
    from trigflow_distill.training import checkpoint

    real = checkpoint.make_manager

    def make_manager(workdir, *args, **kwargs):
        if str(workdir).startswith("gs://"):
            workdir = local_path(root, workdir)
        return real(workdir, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "make_manager", make_manager)
