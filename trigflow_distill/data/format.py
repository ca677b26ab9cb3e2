"""Records, their validation, the on-disk format's reader and a synthetic source (the writer: `data.writer`).

A record is a dict {"latents": (16,T,H,W) float32, "text": (L,C) float32, ["num_cond_frames": int32],
["prompt": int32], ["padding_mask": (1,h,w) float32]}. A *source* is anything with `__len__` and
`__getitem__(i) -> record` (grain's random-access protocol); it may also have `spec` (a RecordSpec),
`record_name(i)` (used in error messages) and `buckets()` (groups of records that share one shape, see
`pipeline.make_dataset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from trigflow_distill.common import paths
from trigflow_distill.core.recipe import COND_FRAME_PROBS
from trigflow_distill.models.wan_vae.names import LATENT_MEAN, LATENT_STD

FORMAT = "trigflow_distill.data/2"
READABLE_FORMATS = ("trigflow_distill.data/1", FORMAT)
TEXT_KINDS = ("raw", "projected")
PROJECTED_TEXT_CHANNELS = 1024
OPTIONAL_FIELDS = ("num_cond_frames", "prompt", "padding_mask")
TEXT_DTYPES = ("float32", "float16", "bfloat16")  # bfloat16 is stored as its uint16 bit pattern (.npy has none)
VAE_SPATIAL_FACTOR = 8  # Wan2.1: one latent pixel per 8x8 video pixels (docs/algorithm.md §10)
# Probabilities of 0, 1, 2 conditional latent frames (the one definition is recipe.COND_FRAME_PROBS).
NUM_COND_PROBS = COND_FRAME_PROBS


def normalize_latents(mu_cthw: np.ndarray) -> np.ndarray:
    """Raw Wan2.1 VAE latent means (..., 16, T, H, W) -> normalised latents (docs/algorithm.md §9)."""
    mu_cthw = np.asarray(mu_cthw, np.float32)
    if mu_cthw.ndim < 4 or mu_cthw.shape[-4] != 16:
        raise ValueError(f"latents of shape {mu_cthw.shape} are not (..., 16, T, H, W) Wan2.1 VAE latents.")
    return (mu_cthw - LATENT_MEAN[:, None, None, None]) / LATENT_STD[:, None, None, None]


def padding_mask_shapes(latent_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two padding-mask shapes a record with these latents may carry: latent (1,H,W) and pixel (1,8H,8W)."""
    _, _, h, w = latent_shape
    return (1, h, w), (1, VAE_SPATIAL_FACTOR * h, VAE_SPATIAL_FACTOR * w)


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """Shapes every record of a source (or of one bucket) must have, and which optional fields it carries."""

    latent_shape: tuple[int, ...]
    text_shape: tuple[int, ...]
    fields: tuple[str, ...] = ()  # subset of OPTIONAL_FIELDS
    padding_mask_shape: tuple[int, ...] | None = None  # required iff "padding_mask" in fields

    def __post_init__(self):
        if len(self.latent_shape) != 4:
            raise ValueError(f"latent_shape must be (C, T, H, W), got {self.latent_shape}.")
        if len(self.text_shape) != 2:
            raise ValueError(f"text_shape must be (L, C), got {self.text_shape}.")
        unknown = set(self.fields) - set(OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; optional fields are {OPTIONAL_FIELDS}.")
        if ("padding_mask" in self.fields) != (self.padding_mask_shape is not None):
            raise ValueError("padding_mask_shape must be given exactly when 'padding_mask' is one of the fields.")
        allowed = padding_mask_shapes(self.latent_shape)
        if self.padding_mask_shape is not None and tuple(self.padding_mask_shape) not in allowed:
            raise ValueError(
                f"padding_mask shape {tuple(self.padding_mask_shape)} is neither latent {allowed[0]} "
                f"nor pixel {allowed[1]} resolution for latents {self.latent_shape}."
            )

    @classmethod
    def of(cls, record: dict) -> RecordSpec:
        """The spec a record implies (used for sources without a `spec`)."""
        pad = record.get("padding_mask")
        return cls(
            tuple(np.shape(record["latents"])),
            tuple(np.shape(record["text"])),
            tuple(f for f in OPTIONAL_FIELDS if f in record),
            None if pad is None else tuple(np.shape(pad)),
        )


def source_spec(source: Any) -> RecordSpec:
    spec = getattr(source, "spec", None)
    return spec if spec is not None else RecordSpec.of(source[0])


def source_buckets(source: Any) -> list[tuple[str, RecordSpec, np.ndarray | None]]:
    """[(bucket name, spec, record indices)] of a source; indices None means all records (one bucket)."""
    buckets = getattr(source, "buckets", None)
    return buckets() if buckets is not None else [("all", source_spec(source), None)]


def record_name(source: Any, index: int) -> str:
    name = getattr(source, "record_name", None)
    return name(index) if name is not None else f"record {index}"


def validate_record(record: dict, spec: RecordSpec, where: str) -> dict:
    """Checked copy of `record` with canonical dtypes; ValueError naming `where` and the problem otherwise."""
    expected = {"latents", "text", *spec.fields}
    if set(record) != expected:
        raise ValueError(f"{where}: fields {sorted(record)}, expected {sorted(expected)}.")
    out = {}
    shapes = (("latents", spec.latent_shape), ("text", spec.text_shape), ("padding_mask", spec.padding_mask_shape))
    for key, shape in shapes:
        if key not in record:
            continue
        x = np.asarray(record[key])
        if x.shape != shape:
            raise ValueError(f"{where}: {key} has shape {x.shape}, expected {shape}.")
        if not (np.issubdtype(x.dtype, np.floating) or (key == "padding_mask" and x.dtype in (np.uint8, bool))):
            raise ValueError(f"{where}: {key} has dtype {x.dtype}, expected a float array.")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: {key} has {np.size(x) - np.isfinite(x).sum()} non-finite values (NaN/inf).")
        if key == "padding_mask" and not np.isin(x, (0.0, 1.0)).all():
            raise ValueError(f"{where}: padding_mask must hold only 0 (video) and 1 (padding).")
        out[key] = x
    for key in ("num_cond_frames", "prompt"):
        if key not in spec.fields:
            continue
        v = np.asarray(record[key])
        if v.shape != () or not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{where}: {key} must be an integer scalar, got {v!r}.")
        out[key] = v.astype(np.int32)
    t = spec.latent_shape[1]
    if "num_cond_frames" in out and not 0 <= out["num_cond_frames"] < t:
        raise ValueError(
            f"{where}: num_cond_frames={int(out['num_cond_frames'])} is outside [0, {t}) for {t} latent frames."
        )
    return out


class SyntheticSource:
    """Random but deterministic records: record i depends only on (seed, i). Latents and text ~ N(0, 1)
    (normalised latents have unit scale); num_cond_frames drawn from `num_cond_probs` (None: no such field,
    capped at T-1); prompt = i."""

    def __init__(
        self,
        num_records: int,
        latent_shape: Sequence[int],
        text_shape: Sequence[int],
        seed: int,
        num_cond_probs: Sequence[float] | None = NUM_COND_PROBS,
    ):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}.")
        fields = ("prompt",) if num_cond_probs is None else ("num_cond_frames", "prompt")
        self.spec = RecordSpec(tuple(latent_shape), tuple(text_shape), fields)
        self.num_records, self.seed = num_records, seed
        self.num_cond_probs = None if num_cond_probs is None else np.asarray(num_cond_probs, np.float64)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records}).")
        rng = np.random.default_rng([self.seed, index])
        rec = {
            "latents": rng.standard_normal(self.spec.latent_shape, np.float32),
            "text": rng.standard_normal(self.spec.text_shape, np.float32),
            "prompt": np.int32(index),
        }
        if self.num_cond_probs is not None:
            n = rng.choice(len(self.num_cond_probs), p=self.num_cond_probs / self.num_cond_probs.sum())
            rec["num_cond_frames"] = np.int32(min(n, self.spec.latent_shape[1] - 1))
        return rec


def make_synthetic_source(
    num_records: int,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    seed: int,
    num_cond_probs: Sequence[float] | None = NUM_COND_PROBS,
) -> SyntheticSource:
    """See SyntheticSource."""
    return SyntheticSource(num_records, latent_shape, text_shape, seed, num_cond_probs)


def shard_file(directory: str, shard: str, field: str, ext: str = "npy") -> str:
    """Path of one field of one shard of a dataset directory (format in the package docstring)."""
    return os.path.join(directory, f"{shard}.{field}.{ext}")


# ------------------------------------------------------------------------------------------------------------------
# Fingerprints: what identifies a dataset's records, so that a resumed run can refuse another dataset


FINGERPRINT_KEYS = ("format", "num_records", "text_shape", "text_kind", "text_dtype", "fields", "teacher")


def shard_files(meta: dict, shard: dict) -> list[str]:
    """The files of one shard (relative to the dataset folder): its arrays and its records.jsonl."""
    fields = ["latents", "text", *meta.get("fields", [])]
    return [f"{shard['name']}.{f}.npy" for f in fields] + [f"{shard['name']}.records.jsonl"]


def fingerprint_of(meta: dict, sizes: dict[str, int] | None = None) -> str:
    """The fingerprint of a dataset's records from its meta.json: a SHA-256 over the shards' names, record counts,
    buckets and per-file sizes and CRC-32s (`checksums`, recorded by the writer), the text layout and, for a
    projected context, the teacher whose projection made it (`teacher`). A dataset written before the checksums
    has none in meta.json: `sizes` ({file: bytes}, read from the disk) stand in for them."""
    sizes = sizes or {}
    shards = [
        {
            "name": s["name"],
            "num_records": s["num_records"],
            "bucket": s.get("bucket"),
            "checksums": s.get("checksums") or {f: {"bytes": sizes[f]} for f in shard_files(meta, s) if f in sizes},
        }
        for s in meta.get("shards", [])
    ]
    body = {**{k: meta.get(k) for k in FINGERPRINT_KEYS}, "shards": shards}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(directory: str) -> str:
    """The fingerprint of the dataset in `directory` (see `fingerprint_of`): equal for the same records, different
    when a shard, a record count, the text layout or the projecting teacher changed. ValueError when meta.json's
    recorded `fingerprint` does not match the shards it lists (meta.json edited by hand)."""
    meta_path = epath.Path(directory) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a dataset directory")
    meta = json.loads(meta_path.read_text())
    if all(s.get("checksums") for s in meta.get("shards", [])):
        fingerprint = fingerprint_of(meta)
        if meta.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(
                f"{meta_path}: its fingerprint does not match the shards it lists (edited by hand?); write the "
                "dataset again"
            )
        return fingerprint
    # Written before the checksums: the files' sizes on disk are the best record there is.
    sizes = {}
    for s in meta.get("shards", []):
        for f in shard_files(meta, s):
            p = epath.Path(directory) / f
            if p.exists():
                sizes[f] = p.stat().length
    return fingerprint_of(meta, sizes)


def projection_fingerprint(kernel: np.ndarray, bias: np.ndarray) -> str:
    """Identity of the teacher's text projection `crossattn_proj` that made a projected context: a SHA-256 of its
    float32 kernel (C_in, C_out) and bias (C_out,) with their shapes. Two teachers of the same widths but other
    weights differ; recomputed from the teacher a run trains with, it tells whether the context fits that teacher."""
    h = hashlib.sha256()
    for a in (kernel, bias):
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        h.update(json.dumps(list(a.shape)).encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


class _RemoteNpy:
    """Rows of a remote `.npy` file (gs://..., through etils.epath), each read on demand with one ranged read; the
    local equivalent is np.load(mmap_mode="r")."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            self.shape, fortran, self.dtype = read_header(f)
            self._offset = f.tell()
        if fortran:
            raise ValueError(f"{path} is a Fortran-order array; dataset shards are C-order.")
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row: int) -> np.ndarray:
        with self.path.open("rb") as f:
            f.seek(self._offset + int(row) * self._row_bytes)
            buf = f.read(self._row_bytes)
        if len(buf) != self._row_bytes:
            raise ValueError(f"{self.path}: short read at row {row} (truncated file)")
        return np.frombuffer(buf, self.dtype).reshape(self.shape[1:])


def bucket_name(bucket: Any) -> str:
    """Canonical bucket name: [704, 1280] -> "704x1280"; strings and numbers as they are."""
    if isinstance(bucket, (list, tuple)):
        return "x".join(str(b) for b in bucket)
    return str(bucket)


class NpyDirSource:
    """Reads a dataset directory written by `DatasetWriter` / `write_dataset` (format in the package docstring,
    versions 1 and 2): memory-mapped when local, one ranged read per record field when remote (gs://..., through
    etils.epath)."""

    def __init__(self, directory: str):
        directory = os.fspath(directory)
        meta_path = epath.Path(directory) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {directory} is not a dataset directory; write one with "
                "`python -m trigflow_distill.data.cli --latents L.npy --text T.npy --out DIR`."
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected one of {READABLE_FORMATS}.")
        if meta.get("text_dtype", "float32") not in TEXT_DTYPES:
            raise ValueError(f"{meta_path}: text_dtype {meta['text_dtype']!r} not in {TEXT_DTYPES}.")
        self.directory, self.meta = directory, meta
        self.text_kind = meta["text_kind"]
        self._arrays, self._info = {}, {}
        shards = meta["shards"]
        self._shards = [(s["name"], int(s["num_records"])) for s in shards]
        # "fields", "text_shape" and per-shard "padding_mask_shape" may be left out: read from the first files.
        fields = meta.get("fields")
        if fields is None:
            fields = [f for f in OPTIONAL_FIELDS if epath.Path(shard_file(directory, shards[0]["name"], f)).is_file()]
        fields = tuple(fields)
        text_shape = meta.get("text_shape") or self._array(0, "text").shape[1:]

        def pad_shape(k, s):
            if "padding_mask" not in fields:
                return None
            return tuple(s.get("padding_mask_shape") or self._array(k, "padding_mask").shape[1:])

        # Version 1 has one latent shape for the whole dataset; version 2 one per shard (its bucket).
        self._specs = [
            RecordSpec(
                tuple(s.get("latent_shape", meta.get("latent_shape"))), tuple(text_shape), fields, pad_shape(k, s)
            )
            for k, s in enumerate(shards)
        ]
        self._bucket_of_shard = [
            bucket_name(s.get("bucket", spec.latent_shape[1:])) for s, spec in zip(shards, self._specs)
        ]
        self._starts = np.cumsum([0] + [n for _, n in self._shards])
        if self._starts[-1] != meta["num_records"]:
            raise ValueError(
                f"{meta_path}: shards hold {self._starts[-1]} records, num_records says {meta['num_records']}."
            )
        self.spec = self._specs[0] if len(set(self._specs)) == 1 else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def buckets(self) -> list[tuple[str, RecordSpec, np.ndarray]]:
        """[(bucket, spec, record indices)] in order of first appearance; all shards of a bucket share a spec."""
        out: dict[str, tuple[RecordSpec, list]] = {}
        for k, (bucket, spec) in enumerate(zip(self._bucket_of_shard, self._specs)):
            if bucket in out and out[bucket][0] != spec:
                raise ValueError(
                    f"{self.directory}: bucket {bucket!r} mixes record shapes {out[bucket][0]} and "
                    f"{spec} (shard {self._shards[k][0]}); give each shape its own bucket."
                )
            out.setdefault(bucket, (spec, []))[1].append(np.arange(self._starts[k], self._starts[k + 1]))
        return [(b, spec, np.concatenate(idx)) for b, (spec, idx) in out.items()]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)}).")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _array(self, shard: int, field: str) -> np.ndarray:
        key = (shard, field)
        if key not in self._arrays:
            name, n = self._shards[shard]
            path = shard_file(self.directory, name, field)
            if not epath.Path(path).is_file():
                raise FileNotFoundError(f"{path} is missing from dataset {self.directory} (listed in meta.json).")
            arr = np.load(path, mmap_mode="r") if paths.is_local(path) else _RemoteNpy(path)
            if len(arr) != n:
                raise ValueError(f"{path} has {len(arr)} rows, meta.json says {n}.")
            self._arrays[key] = arr
        return self._arrays[key]

    def record_name(self, index: int) -> str:
        shard, row = self._locate(index)
        return f"record {index} ({shard_file(self.directory, self._shards[shard][0], 'latents')} etc., row {row})"

    def __getitem__(self, index: int) -> dict:
        shard, row = self._locate(int(index))
        rec = {f: np.array(self._array(shard, f)[row]) for f in ("latents", "text", *self._specs[shard].fields)}
        if self.meta.get("text_dtype") == "bfloat16":
            rec["text"] = rec["text"].view(ml_dtypes.bfloat16).astype(np.float32)
        return rec

    def info(self, index: int) -> dict:
        """Metadata of a record: {"bucket": name, ...what the writer stored (caption, video, frames, ...)}."""
        shard, row = self._locate(int(index))
        if shard not in self._info:
            path = epath.Path(shard_file(self.directory, self._shards[shard][0], "records", "jsonl"))
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            self._info[shard] = rows
        rows = self._info[shard]
        return {**(rows[row] if rows else {}), "bucket": self._bucket_of_shard[shard]}
