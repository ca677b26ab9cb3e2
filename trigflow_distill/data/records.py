"""Records, their validation, the on-disk format (reader + writer) and a synthetic source.

A record is a dict {"latents": (16,T,H,W) float32, "text": (L,C) float32, ["num_cond_frames": int32],
["prompt": int32], ["padding_mask": (1,h,w) float32]}. A *source* is anything with `__len__` and
`__getitem__(i) -> record` (grain's random-access protocol); it may also have `spec` (a RecordSpec),
`record_name(i)` (used in error messages) and `buckets()` (groups of records that share one shape, see
`pipeline.make_dataset`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from trigflow_distill.recipe import COND_FRAME_PROBS

FORMAT = "trigflow_distill.data/2"
READABLE_FORMATS = ("trigflow_distill.data/1", FORMAT)
TEXT_KINDS = ("raw", "projected")
PROJECTED_TEXT_CHANNELS = 1024
OPTIONAL_FIELDS = ("num_cond_frames", "prompt", "padding_mask")
TEXT_DTYPES = ("float32", "float16", "bfloat16")  # bfloat16 is stored as its uint16 bit pattern (.npy has none)
VAE_SPATIAL_FACTOR = 8  # Wan2.1: one latent pixel per 8x8 video pixels (docs/algorithm.md §10)
# Wan2.1 VAE per-channel statistics (docs/algorithm.md §9): normalised latents are (mu - mean) / std.
LATENT_MEAN = np.array(
    [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    np.float32,
)
LATENT_STD = np.array(
    [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ],
    np.float32,
)
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


def _shard_file(directory: str, shard: str, field: str, ext: str = "npy") -> str:
    return os.path.join(directory, f"{shard}.{field}.{ext}")


def _bucket_name(latent_shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in latent_shape[1:])


def _is_local(path: str) -> bool:
    return "://" not in os.fspath(path)


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
                "`python -m trigflow_distill.data.write --latents L.npy --text T.npy --out DIR`."
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
            fields = [f for f in OPTIONAL_FIELDS if epath.Path(_shard_file(directory, shards[0]["name"], f)).is_file()]
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
            bucket_name(s.get("bucket", _bucket_name(spec.latent_shape))) for s, spec in zip(shards, self._specs)
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
            path = _shard_file(self.directory, name, field)
            if not epath.Path(path).is_file():
                raise FileNotFoundError(f"{path} is missing from dataset {self.directory} (listed in meta.json).")
            arr = np.load(path, mmap_mode="r") if _is_local(path) else _RemoteNpy(path)
            if len(arr) != n:
                raise ValueError(f"{path} has {len(arr)} rows, meta.json says {n}.")
            self._arrays[key] = arr
        return self._arrays[key]

    def record_name(self, index: int) -> str:
        shard, row = self._locate(index)
        return f"record {index} ({_shard_file(self.directory, self._shards[shard][0], 'latents')} etc., row {row})"

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
            path = epath.Path(_shard_file(self.directory, self._shards[shard][0], "records", "jsonl"))
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            self._info[shard] = rows
        rows = self._info[shard]
        return {**(rows[row] if rows else {}), "bucket": self._bucket_of_shard[shard]}


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
        for name, arr in (("text", text), *extras.items(), *((("info", info),) if info is not None else ())):
            if len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} records but latents has {n}; they must match.")
        if n == 0:
            raise ValueError("no records to write (latents is empty).")
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
        bucket = bucket_name(bucket) if bucket is not None else _bucket_name(spec.latent_shape)
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
        staging = None if _is_local(self.out_dir) else tempfile.TemporaryDirectory()
        local_dir = self.out_dir if staging is None else staging.name
        outs = {
            f: np.lib.format.open_memmap(_shard_file(local_dir, name, f), mode="w+", dtype=dt, shape=(n, *shape))
            for f, (shape, dt) in shapes.items()
        }
        for i in range(n):
            lat = normalize_latents(latents[i]) if normalize else latents[i]
            rec = validate_record(
                {"latents": lat, "text": np.asarray(text[i], np.float32), **{f: extras[f][i] for f in extras}},
                spec,
                f"input record {first_index + i}",
            )
            rec["text"] = rec["text"].astype(self._text_dtype).view(text_store)
            for f, out in outs.items():
                out[i] = rec[f]
        for f, out in outs.items():
            out.flush()
            if staging is not None:  # one shard at a time on the local disk
                local = epath.Path(_shard_file(local_dir, name, f))
                local.copy(epath.Path(_shard_file(self.out_dir, name, f)), overwrite=True)
                local.unlink()
        if staging is not None:
            staging.cleanup()
        if info is not None:
            epath.Path(_shard_file(self.out_dir, name, "records", "jsonl")).write_text(
                "".join(json.dumps(dict(row)) + "\n" for row in info)
            )
        self._shards.append(
            {
                "name": name,
                "num_records": n,
                "bucket": bucket,
                "latent_shape": list(spec.latent_shape),
                "padding_mask_shape": None if pad_shape is None else list(pad_shape),
            }
        )
        return name

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
    for name, arr in (
        ("text", text),
        ("num_cond_frames", num_cond_frames),
        ("prompt", prompt),
        ("padding_mask", padding_mask),
    ):
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} records but latents has {n}; they must match.")
    if n == 0:
        raise ValueError("no records to write (latents is empty).")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    writer = DatasetWriter(out_dir, text_kind)
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
    return writer.close()
