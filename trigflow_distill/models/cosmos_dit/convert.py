"""Cosmos Predict2.5 DiT weights: PyTorch `.pt` / diffusers folder <-> Flax params (numpy trees) <-> converted folder.

A converted checkpoint (the CLI's output and `teacher_cache.load_teacher`'s entries) is a folder:

    source.json      format, native tensor shapes and config fields stated by the source, and per param leaf its
                     shape, dtype and CRC-32 of its bytes (the architecture is re-inferred exactly as on the direct
                     path, and compute options can be overridden at load time)
    params/<a.b.c>   one raw C-order array per param leaf (`a/b/c` in the tree)
    COMPLETE         written last; a folder without it is incomplete

`convert` streams: one source tensor at a time is read (memory-mapped) and transposed straight into the
memory-mapped output leaf (on object stores: into a one-tensor buffer written out before the next), so a conversion
never holds the weights in memory. Local folders are written under a temporary name and renamed; on object stores
(`gs://`, through etils.epath) the COMPLETE marker written last is the commit. Local converted leaves are read back
as read-only memory maps (`load_converted`): a cache hit copies nothing until the caller casts or places them.
Sources may be local paths or `hf://OWNER/NAME/PATH[@REV]` (see `hub.resolve`).

Every load checks each leaf's bytes against the CRC-32 recorded while it was written (a flipped byte is a ValueError
naming the leaf: convert again; the teacher cache does so itself). CRC-32 rather than SHA-256: it finds corruption, not
tampering, at ~3x the speed, so checking a 2B teacher at every start costs seconds. Folders converted before the CRCs
were recorded load with a line saying they are not verified.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import tqdm
from etils import epath

from trigflow_distill.common import cli, paths
from trigflow_distill.models import hub, torchfile
from trigflow_distill.models.cosmos_dit import DiTConfig, param_shapes
from trigflow_distill.models.cosmos_dit import names as sdmap

_PREFIXES = ("net_ema.", "net.")  # auto: the EMA weights (the distillation teacher) when both are present
_DIFFUSERS_CLASS = "CosmosTransformer3DModel"
_FORMAT = "trigflow-converted-2"
_SOURCE_JSON = "source.json"
_PARAMS = "params"
COMPLETE = "COMPLETE"  # the marker file written last: its text changes with every (re-)conversion
_PROGRESS_MIN_BYTES = 64 << 20  # smaller sources convert in a blink: no bar
_TRANSPOSE_ROWS = 64  # a blocked transpose is ~3x faster than numpy's strided copy of a whole bf16 matrix
_READ_CHUNK = 64 << 20
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}
_SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def _select_prefix(path: str, keys, prefix: str) -> str:
    present = [p for p in _PREFIXES if any(k.startswith(p) for k in keys)]
    if prefix == "auto":
        return present[0] if present else ""
    if prefix and prefix not in present:
        raise ValueError(f"{path}: no keys with prefix {prefix!r}; prefixes present: {present or 'none'}")
    return prefix


class _SafetensorsDict(Mapping):
    """`{native name: array}` over diffusers safetensors files, reading a tensor only when it is accessed."""

    def __init__(self, where: dict[str, tuple[str, str]], shapes: dict, dtypes: dict, nbytes: int):
        self.where, self.shapes, self.dtypes, self.nbytes = where, shapes, dtypes, nbytes  # where: name -> (file, key)

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        file, name = self.where[key]
        with safe_open(file, framework="np") as st:
            return st.get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _torch_source(path: str, prefix: str) -> tuple[Mapping, dict]:
    """Lazy native state dict (prefix stripped, ignored keys dropped) of a `.pt` file, and no config fields."""
    lazy = torchfile.LazyStateDict(path)
    chosen = _select_prefix(path, lazy.refs, prefix)
    names = {k[len(chosen) :]: k for k in lazy.refs if k.startswith(chosen) and not sdmap.is_ignored(k[len(chosen) :])}
    if not names:
        raise ValueError(f"{path}: no tensors under prefix {chosen!r}")
    return lazy.subset(names), {}


def _diffusers_dir(path: str) -> str:
    """The model folder itself or a pipeline's `transformer/` subfolder."""
    for d in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"{path}: no config.json (expected a diffusers {_DIFFUSERS_CLASS} folder)")


def _diffusers_source(path: str) -> tuple[Mapping, dict]:
    """Lazy native state dict and config fields of a diffusers CosmosTransformer3DModel folder."""
    from safetensors import safe_open

    folder = _diffusers_dir(path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("_class_name") != _DIFFUSERS_CLASS:
        raise ValueError(
            f"{folder}: wrong model family: config.json _class_name is {cfg.get('_class_name')!r}, "
            f"expected {_DIFFUSERS_CLASS!r}"
        )
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (bin weights are not supported)")
    where, shapes, dtypes = {}, {}, {}
    nbytes = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    for name in files:
        file = os.path.join(folder, name)
        torchfile.safetensors_header(file)  # a damaged file: an error naming it, before safetensors maps it
        with safe_open(file, framework="np") as st:
            for k in st.keys():
                info = st.get_slice(k)
                where[k], shapes[k], dtypes[k] = (file, k), tuple(info.get_shape()), info.get_dtype()
    pt, ps, ps_w = cfg.get("patch_size", (1, 2, 2))
    rope = cfg.get("rope_scale", (1.0, 3.0, 3.0))
    if ps != ps_w:
        raise ValueError(f"{folder}: non-square patch_size {cfg['patch_size']} is not supported")
    if cfg.get("extra_pos_embed_type") not in (None, "none"):
        raise ValueError(
            f"{folder}: extra_pos_embed_type={cfg['extra_pos_embed_type']!r} (Cosmos 1.0 style) is not a Predict2.5 DiT"
        )
    fields = dict(
        patch_temporal=pt,
        patch_spatial=ps,
        rope_t_extrapolation_ratio=rope[0],
        rope_h_extrapolation_ratio=rope[1],
        rope_w_extrapolation_ratio=rope[2],
        concat_padding_mask=cfg.get("concat_padding_mask", True),
    )
    try:  # the renaming only touches keys: map names, keep the lazy readers
        native = sdmap.native_from_diffusers(where)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    unknown = sorted({d for d in dtypes.values() if d not in _SAFETENSORS_DTYPES})
    if unknown:
        raise ValueError(f"{folder}: unsupported tensor dtypes {unknown}")
    by_native = {n: w[1] for n, w in native.items()}
    return _SafetensorsDict(
        native,
        {n: shapes[k] for n, k in by_native.items()},
        {n: _SAFETENSORS_DTYPES[dtypes[k]] for n, k in by_native.items()},
        nbytes,
    ), fields


def local_source(src: str | os.PathLike) -> str:
    """Local path of a `.pt` file or diffusers folder given as a path or `hf://` source."""
    path = hub.resolve(os.fspath(src))
    if not paths.is_local(path):
        raise ValueError(
            f"{path}: weights are read from a local file or the Hugging Face cache; copy the file locally or "
            "use hf://OWNER/NAME/PATH"
        )
    return path


def _source(path: str, prefix: str = "auto") -> tuple[Mapping, dict]:
    if os.path.isdir(path):
        return _diffusers_source(path)
    return _torch_source(path, prefix)


def _config(path: str, sd: Mapping, fields: dict, overrides: dict) -> DiTConfig:
    try:
        config = sdmap.infer_config(sd.shapes, **{**fields, **overrides})
        sdmap.leaf_sources(config, sd.keys())  # family, missing and unexpected keys
        return config
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _leaves(path: str, sd: Mapping, config: DiTConfig) -> Iterator[tuple[tuple[str, ...], tuple, np.dtype, list]]:
    """(param path, leaf shape, dtype, fills) per leaf; each fill(dst) reads one source tensor into `dst` (the leaf
    itself, or one block of a stacked leaf) and returns it, so the caller decides where the bytes go. The source
    dtype is kept."""
    expected = sdmap.native_shapes(config)
    shapes = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))[0]
    leaf_shape = {tuple(k.key for k in p): tuple(s) for p, s in shapes}

    def fill(name: str, transpose: bool):
        def run(dst: np.ndarray) -> np.ndarray:
            a = sd[name]
            if tuple(a.shape) != expected[name]:
                raise ValueError(
                    f"{path}: shape mismatch: {name}: {tuple(a.shape)} != expected {expected[name]} (config: {config})"
                )
            if transpose and a.ndim == 2:
                for i in range(0, a.shape[0], _TRANSPOSE_ROWS):
                    dst[:, i : i + _TRANSPOSE_ROWS] = a[i : i + _TRANSPOSE_ROWS].T
            else:
                dst[...] = a.T if transpose else a
            return dst

        return run

    for leaf, (names, transpose) in sdmap.leaf_sources(config).items():
        dtype = sd.refs[names[0]].dtype if isinstance(sd, torchfile.LazyStateDict) else sd.dtypes[names[0]]
        yield leaf, leaf_shape[leaf], dtype, [fill(n, transpose) for n in names]


def _stacked(leaf: tuple[str, ...]) -> bool:
    """Block params are stacked along a leading block axis (one source tensor per block), even for one block."""
    return leaf[0] == "blocks"


def _build_tree(path: str, sd: Mapping, config: DiTConfig, progress: bool) -> dict:
    """The param tree in memory; each stacked leaf is allocated once and filled block by block (no stack copy)."""
    params: dict = {}
    bar = _bar(sd, progress, os.path.basename(os.path.normpath(path)))
    for leaf, shape, dtype, fills in _leaves(path, sd, config):
        out = np.empty(shape, dtype)
        for i, f in enumerate(fills):
            f(out[i] if _stacked(leaf) else out)
        bar.update(out.nbytes)
        _set_leaf(params, leaf, out)
    bar.close()
    return params


def _set_leaf(tree: dict, leaf: Sequence[str], value: np.ndarray) -> None:
    """tree[a][b][c] = value for leaf (a, b, c), creating the inner dicts."""
    for k in leaf[:-1]:
        tree = tree.setdefault(k, {})
    tree[leaf[-1]] = value


def _bar(sd: Mapping, progress: bool, label: str) -> tqdm.tqdm:
    total = sum(r.nbytes for r in sd.refs.values()) if isinstance(sd, torchfile.LazyStateDict) else sd.nbytes
    return tqdm.tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress or total < _PROGRESS_MIN_BYTES,
        file=sys.stderr,
    )


def load_torch_checkpoint(
    path: str | os.PathLike, prefix: str = "auto", progress: bool = False, **config_overrides
) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a native Cosmos `.pt` (no torch needed); params are numpy in the file's dtype.

    `prefix`: "auto" takes `net_ema.` when present (the teacher in training checkpoints), else `net.`, else
    unprefixed keys; or name one ("net.", "net_ema.", ""). `config_overrides`: DiTConfig fields that cannot be
    inferred (patch sizes, RoPE ratios) or compute options (dtype, remat, attention).
    """
    path = local_source(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; use load_diffusers_folder for diffusers weights")
    sd, fields = _torch_source(path, prefix)
    config = _config(path, sd, fields, config_overrides)
    return config, _build_tree(path, sd, config, progress)


def load_diffusers_folder(
    path: str | os.PathLike, progress: bool = False, **config_overrides
) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a diffusers CosmosTransformer3DModel folder (config.json + safetensors)."""
    path = local_source(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder (expected a diffusers {_DIFFUSERS_CLASS} folder)")
    sd, fields = _diffusers_source(path)
    config = _config(path, sd, fields, config_overrides)
    return config, _build_tree(path, sd, config, progress)


def _refuse_overwrite(path: epath.Path, what: str) -> None:
    raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace the {what}")


def _cast_tree(params, dtype) -> dict:
    return jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), params)


def _write_via_local(dst: epath.Path, write) -> None:
    """Runs write(local_path) on `dst` itself when local, else on a local temporary copied to `dst` afterwards."""
    if paths.is_local(dst):
        write(os.fspath(dst))
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, dst.name)
        write(local)
        if os.path.isdir(local):
            dst.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(local):
                epath.Path(local, name).copy(dst / name, overwrite=True)
        else:
            epath.Path(local).copy(dst, overwrite=True)


def export_torch(
    params, config: DiTConfig, path: str | os.PathLike, dtype=ml_dtypes.bfloat16, *, overwrite: bool = False
) -> None:
    """Writes a native Cosmos `.pt` (`net.`-prefixed, bf16 by default, text projection included) that
    `torch.load(path, weights_only=True)` reads and the Cosmos network loads with `load_state_dict`.
    An existing file is replaced only with `overwrite=True`."""
    path = epath.Path(path)
    if path.exists() and not overwrite:
        _refuse_overwrite(path, "file")
    sd = sdmap.state_dict_from_params(_cast_tree(params, dtype), config)
    _write_via_local(path, lambda p: torchfile.save(p, {f"net.{k}": v for k, v in sd.items()}))


def export_diffusers(
    params, config: DiTConfig, out_dir: str | os.PathLike, dtype=ml_dtypes.bfloat16, *, overwrite: bool = False
) -> None:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` for
    `diffusers.CosmosTransformer3DModel.from_pretrained(out_dir)` (see `state_dict.diffusers_config` about the
    q/k RMSNorm epsilon diffusers hard-codes). Existing files are replaced only with `overwrite=True`."""
    from safetensors.numpy import save_file

    out_dir = epath.Path(out_dir)
    weights, config_json = "diffusion_pytorch_model.safetensors", "config.json"
    for name in (weights, config_json):
        if (out_dir / name).exists() and not overwrite:
            _refuse_overwrite(out_dir / name, "diffusers model")
    sd = sdmap.diffusers_from_native(sdmap.state_dict_from_params(_cast_tree(params, dtype), config))
    cfg = {**sdmap.diffusers_config(config), "_diffusers_version": "0.42.1"}

    def write(local: str) -> None:
        os.makedirs(local, exist_ok=True)
        save_file(sd, os.path.join(local, weights), metadata={"format": "pt"})
        with open(os.path.join(local, config_json), "w") as f:
            json.dump(cfg, f, indent=2)

    _write_via_local(out_dir, write)


def _write_entry(folder: epath.Path, path: str, sd: Mapping, config: DiTConfig, fields: Mapping, progress: bool):
    """Streams the converted checkpoint into `folder` (created here), COMPLETE last."""
    (folder / _PARAMS).mkdir(parents=True)
    leaves = {}
    bar = _bar(sd, progress, os.path.basename(os.path.normpath(path)))
    for leaf, shape, dtype, fills in _leaves(path, sd, config):
        key, file = ".".join(leaf), folder / _PARAMS / ".".join(leaf)
        crc = 0  # of the leaf's bytes in file order (the parts are consecutive)
        if paths.is_local(file):  # transpose straight into the file's pages, one source tensor mapped at a time
            part = shape[1:] if _stacked(leaf) else shape
            part_bytes = int(np.prod(part, dtype=np.int64)) * np.dtype(dtype).itemsize
            with open(file, "wb") as f:
                f.truncate(part_bytes * len(fills))
            for i, fill in enumerate(fills):
                out = np.memmap(file, dtype, "r+", offset=i * part_bytes, shape=part)
                bar.update(fill(out).nbytes)
                crc = zlib.crc32(_bytes(out), crc)
                del out  # unmapped: its pages stay in the page cache, not in this process
        else:
            buf = np.empty(shape[1:] if _stacked(leaf) else shape, dtype)  # one source tensor in flight
            with file.open("wb") as f:
                for fill in fills:
                    f.write(_bytes(fill(buf)))
                    crc = zlib.crc32(_bytes(buf), crc)
                    bar.update(buf.nbytes)
        leaves[key] = {"shape": list(shape), "dtype": str(np.dtype(dtype)), "crc32": crc}
    bar.close()
    meta = {"format": _FORMAT, "shapes": {k: list(v) for k, v in sd.shapes.items()}, "fields": dict(fields)}
    (folder / _SOURCE_JSON).write_text(json.dumps({**meta, "params": leaves}))
    (folder / COMPLETE).write_text(uuid.uuid4().hex)


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _remove(folder: epath.Path) -> None:
    if folder.is_dir():
        (folder / COMPLETE).unlink(missing_ok=True)  # first: no reader trusts it from now on
        folder.rmtree()
    elif folder.exists():
        folder.unlink()


def _remove_stale_temporaries(dst: epath.Path) -> None:
    """Temporary folders of `dst` left by killed conversions on this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in dst.parent.glob(f".{dst.name}.tmp-{host}-*"):
        pid = tmp.name[len(f".{dst.name}.tmp-{host}-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prefix: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> DiTConfig:
    """Converts a `.pt` file or diffusers folder (local or `hf://`) into the converted folder `dst` (local or
    `gs://`), one tensor at a time; returns the inferred net config. `prefix` as in `load_torch_checkpoint`;
    an existing `dst` is replaced only with `overwrite=True`."""
    path = local_source(src)
    dst = epath.Path(dst)
    if dst.exists() and not overwrite:
        _refuse_overwrite(dst, "converted checkpoint")
    sd, fields = _source(path, prefix)
    config = _config(path, sd, fields, {})
    if not paths.is_local(dst):  # object stores have no atomic folder rename: COMPLETE written last is the commit
        _remove(dst)
        _write_entry(dst, path, sd, config, fields, progress)
        return config
    dst = epath.Path(os.path.abspath(dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_entry(tmp, path, sd, config, fields, progress)
        if overwrite:
            _remove(dst)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config


def check_converted(folder: epath.Path, require_hashes: bool = False) -> str | None:
    """Why `folder` is not a complete converted checkpoint, or None when it is (sizes only: `load_converted` checks
    the bytes). `require_hashes`: a folder converted before CRCs were recorded is not complete either."""
    if not (folder / COMPLETE).exists():
        return f"no {COMPLETE} marker (an interrupted conversion, or written by an older version)"
    try:
        meta = json.loads((folder / _SOURCE_JSON).read_text())
        leaves = meta["params"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {_SOURCE_JSON} ({type(e).__name__}: {e})"
    if meta.get("format") != _FORMAT:
        return f"format {meta.get('format')!r}, expected {_FORMAT!r}"
    for key, leaf in leaves.items():
        file = folder / _PARAMS / key
        want = int(np.prod(leaf["shape"], dtype=np.int64)) * _dtype(leaf["dtype"]).itemsize
        size = file.stat().length if file.exists() else None
        if size != want:
            return f"{_PARAMS}/{key} has {'no file' if size is None else f'{size} bytes'}, expected {want} bytes"
        if require_hashes and "crc32" not in leaf:
            return "no content hashes, converted by an older version"
    return None


def _dtype(name: str) -> np.dtype:
    return _DTYPES.get(name) or np.dtype(name)


def _read_leaf(file: epath.Path, shape, dtype: np.dtype) -> np.ndarray:
    """A local leaf is memory-mapped read-only (no copy; the page cache is shared by the processes of a host), a
    remote one read into memory."""
    if paths.is_local(file):
        return np.memmap(file, dtype, "r", shape=tuple(shape))
    out = np.empty(shape, dtype)
    raw = out.reshape(-1).view(np.uint8)
    with file.open("rb") as f:
        done = 0
        while done < raw.size:
            n = f.readinto(raw[done : done + _READ_CHUNK]) if hasattr(f, "readinto") else None
            if n is None:  # file objects without readinto (some remote file systems)
                chunk = f.read(min(_READ_CHUNK, raw.size - done))
                n = len(chunk)
                raw[done : done + n] = np.frombuffer(chunk, np.uint8)
            if not n:
                raise ValueError(f"{file}: short read (truncated file)")
            done += n
    return out


def complete_marker(folder: epath.Path) -> str | None:
    """The COMPLETE marker's text (unique per conversion) of a converted folder, or None while it has none."""
    try:
        return (folder / COMPLETE).read_text()
    except (FileNotFoundError, OSError):
        return None


def load_converted(ckpt_dir: str | os.PathLike, **config_overrides) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a converted folder (`convert`'s output, `teacher_cache.load_teacher`'s entries);
    local leaves are read-only memory maps, remote ones are read into memory. Each leaf's bytes are checked against
    the CRC-32 recorded at conversion: a ValueError names a leaf that changed."""
    folder = epath.Path(ckpt_dir)
    if not (folder / _SOURCE_JSON).exists() and not (folder / COMPLETE).exists():
        raise FileNotFoundError(
            f"{folder}: no {_SOURCE_JSON}; not a converted checkpoint (run `trigflow-convert SRC DST` first)"
        )
    problem = check_converted(folder)
    if problem:
        raise ValueError(f"{folder}: incomplete or corrupted converted checkpoint: {problem}; convert again")
    meta = json.loads((folder / _SOURCE_JSON).read_text())
    config = sdmap.infer_config(
        {k: tuple(v) for k, v in meta["shapes"].items()}, **{**meta["fields"], **config_overrides}
    )
    params: dict = {}
    unverified = 0
    for key, leaf in meta["params"].items():
        value = _read_leaf(folder / _PARAMS / key, tuple(leaf["shape"]), _dtype(leaf["dtype"]))
        if "crc32" not in leaf:
            unverified += 1
        elif zlib.crc32(_bytes(value)) != leaf["crc32"]:
            raise ValueError(
                f"{folder}: {_PARAMS}/{key} does not match the CRC-32 recorded at conversion (the file changed on "
                "disk); convert again"
            )
        _set_leaf(params, key.split("."), value)
    if unverified:
        print(f"{folder}: converted before content hashes were recorded: not verified", file=sys.stderr)
    return config, params


def _summary(what: str, params_or_folder, seconds: float) -> str:
    if isinstance(params_or_folder, epath.Path):
        leaves = json.loads((params_or_folder / _SOURCE_JSON).read_text())["params"].values()
        count = sum(int(np.prod(v["shape"])) for v in leaves)
        dtypes = "/".join(sorted({v["dtype"] for v in leaves}))
    else:
        leaves = jax.tree.leaves(params_or_folder)
        count = sum(int(np.prod(np.shape(a))) for a in leaves)
        dtypes = "/".join(sorted({str(np.asarray(a).dtype) for a in leaves}))
    return f"{what}: {count:,} params ({count / 1e9:.3f} B), dtype {dtypes}, {seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-convert",
        formatter_class=cli.HelpFormatter,
        description="Convert a Cosmos Predict2.5 DiT between PyTorch (.pt or diffusers folder) and a converted "
        "folder of Flax params. Without flags: SRC (.pt / diffusers folder, local or hf://OWNER/NAME/PATH[@REV]) -> "
        "DST converted folder (local or gs://).",
    )
    parser.add_argument(
        "src", help="source: .pt file or diffusers folder (or hf://...); with --export-*: a converted folder"
    )
    parser.add_argument("dst", help="destination: converted folder, .pt file or diffusers folder")
    way = parser.add_mutually_exclusive_group()
    way.add_argument("--export-torch", action="store_true", help="SRC converted folder -> DST native .pt (bf16)")
    way.add_argument("--export-diffusers", action="store_true", help="SRC converted folder -> DST diffusers folder")
    parser.add_argument(
        "--prefix", default="auto", help="key prefix of a .pt: auto (net_ema. > net. > none), 'net.', 'net_ema.' or ''"
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="tensor dtype written by --export-* (default bfloat16)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.export_torch or args.export_diffusers:
            config, params = load_converted(args.src)
            dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
            export = export_torch if args.export_torch else export_diffusers
            export(params, config, args.dst, dtype=dtype, overwrite=args.overwrite)
            done = _cast_tree(params, dtype)
        else:
            convert(args.src, args.dst, prefix=args.prefix, overwrite=args.overwrite, progress=True)
            done = epath.Path(args.dst)
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, TorchFileError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(f"{args.src} -> {args.dst}", done, time.perf_counter() - start), file=sys.stderr)
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
