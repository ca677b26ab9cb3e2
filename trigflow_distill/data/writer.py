"""The dataset writer: records written shard by shard as a dataset directory (format in the package docstring)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence

import ml_dtypes
import numpy as np
from etils import epath

from trigflow_distill.common import paths
from trigflow_distill.data.format import (
    FORMAT,
    OPTIONAL_FIELDS,
    PROJECTED_TEXT_CHANNELS,
    TEXT_KINDS,
    RecordSpec,
    bucket_name,
    fingerprint_of,
    normalize_latents,
    shard_file,
    validate_record,
)


def _check_lengths(n: int, arrays: dict) -> None:
    """ValueError unless every given (not None) per-record array has the `n` records of the latents, and n > 0."""
    for name, arr in arrays.items():
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} records but latents has {n}; they must match.")
    if n == 0:
        raise ValueError("no records to write (latents is empty).")


def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def no_space_error(where: str, need: int, directory: str) -> OSError:
    """The one-line error of a full disk: what was being written and the bytes it needs (`errno` ENOSPC)."""
    try:
        free = f", {shutil.disk_usage(directory).free} free"
    except OSError:
        free = ""
    e = OSError(
        f"no space left on the disk of {directory} for {where} ({need} bytes needed{free}); free space and rerun"
    )
    e.errno = errno.ENOSPC
    return e


class DatasetWriter:
    """Writes a dataset directory shard by shard (format version 2, see the package docstring).

    Each `write_shard` call is one shard, and every record of a shard has the same latent shape: a tool that
    groups videos by aspect ratio writes one or more shards per bucket. All shards share the text shape and the
    set of optional fields. `close()` writes meta.json; until then the directory is not a dataset. `out_dir` may be
    remote (gs://..., through etils.epath): each shard is written to a local temporary file, then copied there.
    """

    def __init__(self, out_dir: str, text_kind: str | None = None):
        out_dir = os.fspath(out_dir)
        out_path = epath.Path(out_dir)
        if out_path.exists() and any(out_path.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out directory.")
        if text_kind is not None and text_kind not in TEXT_KINDS:
            raise ValueError(f"text_kind {text_kind!r} not in {TEXT_KINDS}.")
        self._created = not out_path.exists()
        out_path.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.text_kind = out_dir, text_kind
        self._shards, self._text_shape, self._text_dtype, self._fields, self._buckets = [], None, None, None, {}

    def write_shard(
        self,
        latents: np.ndarray,
        text: np.ndarray,
        *,
        bucket: str | None = None,
        num_cond_frames: np.ndarray | None = None,
        prompt: np.ndarray | None = None,
        padding_mask: np.ndarray | None = None,
        info: Sequence[dict] | None = None,
        normalize: bool = False,
        first_index: int = 0,
    ) -> str:
        """One shard from (n,16,T,H,W) latents, (n,L,C) text and optional (n,) ints, (n,1,h,w) padding masks
        (1 = padding; latent or pixel resolution) and per-record info dicts (JSON objects, e.g. {"caption": str,
        "video": source file, "frames": [start, stop), "fps": float}). `bucket` names the shard's aspect bucket
        (a string, or e.g. [704, 1280] -> "704x1280"; default "TxHxW" of the latents).
        `normalize`: latents are raw VAE means (docs/algorithm.md §9). `first_index` numbers the records in
        error messages. Returns the shard name."""
        n = len(latents)
        extras = {
            k: v
            for k, v in (("num_cond_frames", num_cond_frames), ("prompt", prompt), ("padding_mask", padding_mask))
            if v is not None
        }
        _check_lengths(n, {"text": text, **extras, "info": info})
        fields = tuple(f for f in OPTIONAL_FIELDS if f in extras)
        pad_shape = None if padding_mask is None else tuple(padding_mask.shape[1:])
        spec = RecordSpec(tuple(latents.shape[1:]), tuple(text.shape[1:]), fields, pad_shape)
        if self._text_shape is None:
            self._text_shape, self._fields = spec.text_shape, fields
            self._text_dtype = next(
                (np.dtype(d) for d in (np.float16, ml_dtypes.bfloat16) if text.dtype == d), np.dtype(np.float32)
            )
            self.text_kind = self.text_kind or (
                "projected" if spec.text_shape[-1] == PROJECTED_TEXT_CHANNELS else "raw"
            )
        elif spec.text_shape != self._text_shape or fields != self._fields:
            raise ValueError(
                f"shard {len(self._shards)}: text {spec.text_shape} and fields {fields} differ from "
                f"the first shard's {self._text_shape}, {self._fields}; every shard must match."
            )
        bucket = bucket_name(bucket if bucket is not None else spec.latent_shape[1:])
        if self._buckets.setdefault(bucket, spec) != spec:
            raise ValueError(f"bucket {bucket!r} already holds records shaped {self._buckets[bucket]}, not {spec}.")
        name = f"shard-{len(self._shards):05d}"
        # .npy has no bfloat16: such text is stored as its uint16 bit pattern (meta text_dtype says so).
        text_store = np.dtype(np.uint16) if self._text_dtype == ml_dtypes.bfloat16 else self._text_dtype
        shapes = {
            "latents": (spec.latent_shape, np.float32),
            "text": (spec.text_shape, text_store),
            **{f: ((), np.int32) for f in ("num_cond_frames", "prompt") if f in extras},
        }
        if pad_shape is not None:
            shapes["padding_mask"] = (pad_shape, np.uint8)
        staging = None if paths.is_local(self.out_dir) else tempfile.TemporaryDirectory()
        local_dir = self.out_dir if staging is None else staging.name
        headers = {f: _npy_header((n, *shape), dt) for f, (shape, dt) in shapes.items()}
        need = sum(
            len(headers[f]) + n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            for f, (shape, dt) in shapes.items()
        )
        where = f"{name} ({n} records)"
        try:
            if shutil.disk_usage(local_dir).free < need:
                raise no_space_error(where, need, local_dir)
        except FileNotFoundError:  # no local disk to ask (e.g. a mounted bucket): the writes below tell
            pass
        # Plain writes, record by record, not a memory map: a full disk is then an OSError (ENOSPC) here instead of
        # a SIGBUS that kills the process; the CRC-32 of each file is the shard's checksum (meta.json, fingerprint).
        checksums, written = {}, []
        try:
            handles = {}
            try:
                for f in shapes:
                    written.append(shard_file(local_dir, name, f))
                    handles[f] = open(written[-1], "wb")
                    handles[f].write(headers[f])
                crc = {f: zlib.crc32(headers[f]) for f in shapes}
                for i in range(n):
                    lat = normalize_latents(latents[i]) if normalize else latents[i]
                    rec = validate_record(
                        {"latents": lat, "text": np.asarray(text[i], np.float32), **{f: extras[f][i] for f in extras}},
                        spec,
                        f"input record {first_index + i}",
                    )
                    rec["text"] = rec["text"].astype(self._text_dtype).view(text_store)
                    for f, (_, dt) in shapes.items():
                        data = np.ascontiguousarray(rec[f], dtype=dt).tobytes()
                        handles[f].write(data)
                        crc[f] = zlib.crc32(data, crc[f])
            finally:
                for fh in handles.values():
                    fh.close()  # flushes: a full disk may show only here
            for f, (_, dt) in shapes.items():
                checksums[f"{name}.{f}.npy"] = {
                    "bytes": os.path.getsize(shard_file(local_dir, name, f)),
                    "crc32": crc[f],
                }
                if staging is not None:  # one shard at a time on the local disk
                    local = epath.Path(shard_file(local_dir, name, f))
                    local.copy(epath.Path(shard_file(self.out_dir, name, f)), overwrite=True)
                    local.unlink()
            if info is not None:
                rows = "".join(json.dumps(dict(row)) + "\n" for row in info).encode()
                path = epath.Path(shard_file(self.out_dir, name, "records", "jsonl"))
                written.append(os.fspath(path))
                path.write_bytes(rows)
                checksums[f"{name}.records.jsonl"] = {"bytes": len(rows), "crc32": zlib.crc32(rows)}
        except OSError as e:
            for w in written:  # a partial shard is never left behind
                try:
                    epath.Path(w).unlink(missing_ok=True)
                except OSError:
                    pass
            if e.errno == errno.ENOSPC and "bytes needed" not in str(e):
                raise no_space_error(where, need, local_dir) from None
            raise
        finally:
            if staging is not None:
                staging.cleanup()
        self._shards.append(
            {
                "name": name,
                "num_records": n,
                "bucket": bucket,
                "latent_shape": list(spec.latent_shape),
                "padding_mask_shape": None if pad_shape is None else list(pad_shape),
                "checksums": checksums,
            }
        )
        return name

    def abort(self) -> None:
        """Removes what this writer wrote (after a failure), so that the same command can simply be run again."""
        out_path = epath.Path(self.out_dir)
        try:
            if self._created:
                out_path.rmtree(missing_ok=True)
            elif out_path.exists():  # it was empty when the writer started: everything in it is ours
                for p in out_path.iterdir():
                    p.rmtree() if p.is_dir() else p.unlink()
        except OSError:  # the original error matters more; a leftover is refused (non-empty) at the rerun
            pass

    def close(self) -> str:
        """Writes meta.json (last: a directory without it is an unfinished write); returns the directory."""
        if not self._shards:
            raise ValueError("no records to write (no shard was written).")
        meta = {
            "format": FORMAT,
            "num_records": sum(s["num_records"] for s in self._shards),
            "text_shape": list(self._text_shape),
            "text_kind": self.text_kind,
            "latents_dtype": "float32",
            "text_dtype": self._text_dtype.name,
            "fields": list(self._fields),
            "shards": self._shards,
        }
        meta["fingerprint"] = fingerprint_of(meta)
        (epath.Path(self.out_dir) / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.out_dir


def write_dataset(
    out_dir: str,
    latents: np.ndarray,
    text: np.ndarray,
    num_cond_frames: np.ndarray | None = None,
    prompt: np.ndarray | None = None,
    text_kind: str | None = None,
    shard_size: int = 1024,
    normalize: bool = False,
    padding_mask: np.ndarray | None = None,
) -> str:
    """Write arrays (N,16,T,H,W), (N,L,C), optional (N,) ints and (N,1,h,w) padding masks as a dataset directory
    of shards of `shard_size` records (one bucket); returns `out_dir`.

    Inputs may be memory-mapped (`np.load(..., mmap_mode="r")`): shards are written one at a time.
    `text_kind` None: "projected" if C == 1024 else "raw". `normalize`: latents are raw VAE means (§9).
    Every record is validated (shape, finite values, num_cond_frames range) before it is written. `out_dir` may be
    remote (gs://..., through etils.epath), see `DatasetWriter`.
    """
    n = len(latents)
    _check_lengths(
        n, {"text": text, "num_cond_frames": num_cond_frames, "prompt": prompt, "padding_mask": padding_mask}
    )
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    writer = DatasetWriter(out_dir, text_kind)
    try:
        _write_all(writer, latents, text, num_cond_frames, prompt, padding_mask, shard_size, normalize)
        return writer.close()
    except BaseException:
        writer.abort()  # a full disk or a bad record: the rerun finds an empty --out, not an unfinished dataset
        raise


def _write_all(writer, latents, text, num_cond_frames, prompt, padding_mask, shard_size, normalize) -> None:
    n = len(latents)
    for start in range(0, n, shard_size):
        part = slice(start, min(start + shard_size, n))
        writer.write_shard(
            latents[part],
            text[part],
            bucket="all",
            **{
                k: None if v is None else v[part]
                for k, v in (("num_cond_frames", num_cond_frames), ("prompt", prompt), ("padding_mask", padding_mask))
            },
            normalize=normalize,
            first_index=start,
        )
