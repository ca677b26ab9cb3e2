"""Paths that may be local or remote (gs://, s3://, ... read and written through etils.epath): the one `is_local`
test and the one atomic text write of the project."""

from __future__ import annotations

import os
import uuid

from etils import epath

HF_SCHEME = "hf://"


def is_local(path: str | os.PathLike) -> bool:
    """True for a plain filesystem path (no URL scheme)."""
    return "://" not in os.fspath(path)


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs read through etils.epath (gs://, s3://, ...), not `hf://` (resolved by `models.hub`) and not
    `file://`."""
    path = os.fspath(path)
    return "://" in path and not path.startswith((HF_SCHEME, "file://"))


def write_text_atomic(path: str | os.PathLike | epath.Path, text: str) -> None:
    """Write `text` so that a reader sees the old or the new file, never half of one: locally a uniquely named
    temporary file beside it, then a rename; an object store's single PUT is atomic already."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
