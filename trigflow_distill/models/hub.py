"""Where weights come from: a local path, a Hugging Face Hub file or folder, or a remote URL.

`resolve(src)` turns a source string into something the readers open:

- a local path (or `file://PATH`): checked to exist, returned as is;
- `hf://OWNER/NAME/PATH/IN/REPO[@REVISION]`: a file is fetched with `hf_hub_download`, a folder with
  `snapshot_download` restricted to that folder, `hf://OWNER/NAME[@REVISION]` is the whole repository; the local
  path inside the Hub cache is returned. The revision is a branch, tag or commit (default `main`).
- any other URL (`gs://`, `s3://`, ...): returned unchanged, for callers that read through `etils.epath`.

Environment:
- `TRIGFLOW_HF_CACHE`: the Hub cache folder (else huggingface_hub's own choice: `HF_HUB_CACHE`, then
  `HF_HOME/hub`, then `~/.cache/huggingface/hub`); the `cache_dir` argument wins over both.
- `HF_HUB_OFFLINE=1`: nothing is downloaded; only what is in the cache resolves, and a missing entry raises
  `FileNotFoundError` naming the repository, path and revision.
- no network (HF_HUB_OFFLINE unset): the Hub endpoint is probed first (one retry, seconds, instead of
  huggingface_hub's ~25 s of retries); when it cannot be reached, what is in the cache still resolves and anything
  else raises `ConnectionError` naming the two ways out (HF_HUB_OFFLINE=1 with a filled cache, or a local path).
- `HF_TOKEN`: read by huggingface_hub for gated repositories.
"""

from __future__ import annotations

import os

import httpx2  # huggingface_hub's HTTP client: its transport errors mean "no network"
import huggingface_hub
from etils import epath
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from trigflow_distill.common import paths

HF_SCHEME = "hf://"
_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 5.0

# Everything that means "not available here": offline and not cached, incomplete cached snapshot, no such
# file/revision/repository online. (LocalEntryNotFoundError and IncompleteSnapshotError are EntryNotFoundErrors.)
_NOT_FOUND = (
    hf_errors.EntryNotFoundError,
    hf_errors.OfflineModeIsEnabled,
    hf_errors.RevisionNotFoundError,
    hf_errors.RepositoryNotFoundError,
)


def parse_hf(src: str) -> tuple[str, str, str | None]:
    """`hf://OWNER/NAME[/PATH][@REVISION]` -> (repo_id, path in repo ('' for the repo itself), revision)."""
    if not src.startswith(HF_SCHEME):
        raise ValueError(f"{src!r} is not an hf:// source (expected hf://OWNER/NAME[/PATH][@REVISION])")
    rest, revision = src[len(HF_SCHEME) :], None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise ValueError(f"{src!r}: empty revision after '@' (expected hf://OWNER/NAME[/PATH]@REVISION)")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"{src!r}: no repository (expected hf://OWNER/NAME[/PATH][@REVISION])")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


def hub_cache_dir(cache_dir: str | None = None) -> str | None:
    """The Hub cache folder: `cache_dir`, else TRIGFLOW_HF_CACHE, else HF_HUB_CACHE / HF_HOME/hub (read now, not at
    import), else None (huggingface_hub's default)."""
    if cache_dir:
        return os.fspath(cache_dir)
    for var in ("TRIGFLOW_HF_CACHE", "HF_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint (HF_ENDPOINT) answers at all (any HTTP status, so 404s and auth errors keep their
    own messages); else why not (connection refused, DNS, timeout), after one retry."""
    endpoint = hf_constants.ENDPOINT
    reason = None
    for _ in range(2):
        try:
            huggingface_hub.get_session().head(endpoint, timeout=timeout)
            return None
        except httpx2.TransportError as e:
            reason = f"{type(e).__name__}: {' '.join(str(e).split()) or 'no answer'}"
    return reason


def resolve_local(src: str | os.PathLike, what: str) -> epath.Path:
    """`resolve` for weights that are memory-mapped (safetensors, .pth): a local path or an `hf://` source (fetched
    into the Hub cache); a remote URL is refused with a one-line error naming `what` and the fix."""
    src = os.fspath(src)
    if paths.is_remote(src):
        raise ValueError(
            f"{src}: {what} must be a local path or hf://OWNER/NAME[/PATH][@REV] (its weights are memory-mapped); "
            "copy it to a local disk first"
        )
    return epath.Path(resolve(src))


def resolve(src: str | os.PathLike, *, cache_dir: str | None = None, revision: str | None = None) -> str:
    """Local path (or unchanged remote URL) of a weights source; see the module docstring for the forms.

    `revision` applies to `hf://` sources without `@REVISION`. Raises FileNotFoundError (one line naming the
    source, and for the Hub the repository, path, revision and cache) when it is not there, ConnectionError when
    the Hub cannot be reached and it is not in the cache.
    """
    src = os.fspath(src)
    src = src.removeprefix("file://")
    if paths.is_remote(src):
        return src
    if not src.startswith(HF_SCHEME):
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src}: no such file or folder")
        return src
    repo_id, path, rev = parse_hf(src)
    rev = rev or revision
    cache = hub_cache_dir(cache_dir)
    local_only = offline()
    where = (
        f"hf://{repo_id}{'/' + path if path else ''}: repository {repo_id}, "
        f"{'path ' + repr(path) if path else 'whole repository'}, revision {rev or 'main'}"
    )
    hint = (
        (
            f"not in the Hub cache {cache or 'default (~/.cache/huggingface/hub)'} and HF_HUB_OFFLINE=1; download "
            "it once with network access (or unset HF_HUB_OFFLINE)"
        )
        if local_only
        else "not found on the Hub"
    )
    unreachable = None if local_only else hub_unreachable()
    try:
        return _fetch(repo_id, path, rev, cache, local_only or unreachable is not None, where, hint)
    except FileNotFoundError:
        if unreachable is None:
            raise
    raise ConnectionError(
        f"{where}: the Hugging Face Hub ({hf_constants.ENDPOINT}) cannot be reached ({unreachable}) and "
        f"this is not in the Hub cache {cache or 'default (~/.cache/huggingface/hub)'}; either set HF_HUB_OFFLINE=1 "
        "with a filled cache (download it once where there is network), or pass a local path instead of hf://"
    )


def _fetch(repo_id: str, path: str, rev: str | None, cache: str | None, local_only: bool, where: str, hint: str):
    """The file or folder from huggingface_hub (only its cache when `local_only`); FileNotFoundError if absent."""
    kw = {"repo_id": repo_id, "revision": rev, "cache_dir": cache, "local_files_only": local_only}
    if path:
        try:
            return huggingface_hub.hf_hub_download(filename=path, **kw)
        except _NOT_FOUND:
            pass  # perhaps a folder
    try:
        root = huggingface_hub.snapshot_download(allow_patterns=[f"{path}/*"] if path else None, **kw)
    except _NOT_FOUND as e:
        raise FileNotFoundError(f"{where}: {hint} ({type(e).__name__})") from None
    local = os.path.join(root, path) if path else root
    if not os.path.isdir(local):
        raise FileNotFoundError(f"{where}: {hint}")
    return local
