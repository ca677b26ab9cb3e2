"""Records, their validation, the on-disk format (reader + writer) and a synthetic source.

A record is a dict {"latents": (16,T,H,W) float32, "text": (L,C) float32, ["num_cond_frames": int32],
["prompt": int32]}. A *source* is anything with `__len__` and `__getitem__(i) -> record` (grain's random-access
protocol); it may also have `spec` (a RecordSpec) and `record_name(i)` (used in error messages).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from trigflow_distill.recipe import COND_FRAME_PROBS

FORMAT = "trigflow_distill.data/1"
TEXT_KINDS = ("raw", "projected")
PROJECTED_TEXT_CHANNELS = 1024
OPTIONAL_FIELDS = ("num_cond_frames", "prompt")
# Wan2.1 VAE per-channel statistics (SPEC §9): normalised latents are (mu - mean) / std.
LATENT_MEAN = np.array([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921], np.float32)
LATENT_STD = np.array([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                       1.5579, 1.6382, 1.1253, 2.8251, 1.9160], np.float32)
# Probabilities of 0, 1, 2 conditional latent frames (the one definition is recipe.COND_FRAME_PROBS).
NUM_COND_PROBS = COND_FRAME_PROBS


def normalize_latents(mu_cthw: np.ndarray) -> np.ndarray:
    """Raw Wan2.1 VAE latent means (..., 16, T, H, W) -> normalised latents (SPEC §9)."""
    mu_cthw = np.asarray(mu_cthw, np.float32)
    if mu_cthw.ndim < 4 or mu_cthw.shape[-4] != 16:
        raise ValueError(f"latents of shape {mu_cthw.shape} are not (..., 16, T, H, W) Wan2.1 VAE latents.")
    return (mu_cthw - LATENT_MEAN[:, None, None, None]) / LATENT_STD[:, None, None, None]


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """Shapes every record of a source must have, and which optional fields it carries."""
    latent_shape: tuple[int, ...]
    text_shape: tuple[int, ...]
    fields: tuple[str, ...] = ()  # subset of OPTIONAL_FIELDS

    def __post_init__(self):
        if len(self.latent_shape) != 4:
            raise ValueError(f"latent_shape must be (C, T, H, W), got {self.latent_shape}.")
        if len(self.text_shape) != 2:
            raise ValueError(f"text_shape must be (L, C), got {self.text_shape}.")
        unknown = set(self.fields) - set(OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; optional fields are {OPTIONAL_FIELDS}.")

    @classmethod
    def of(cls, record: dict) -> "RecordSpec":
        """The spec a record implies (used for sources without a `spec`)."""
        return cls(tuple(np.shape(record["latents"])), tuple(np.shape(record["text"])),
                   tuple(f for f in OPTIONAL_FIELDS if f in record))


def source_spec(source: Any) -> RecordSpec:
    spec = getattr(source, "spec", None)
    return spec if spec is not None else RecordSpec.of(source[0])


def record_name(source: Any, index: int) -> str:
    name = getattr(source, "record_name", None)
    return name(index) if name is not None else f"record {index}"


def validate_record(record: dict, spec: RecordSpec, where: str) -> dict:
    """Checked copy of `record` with canonical dtypes; ValueError naming `where` and the problem otherwise."""
    expected = {"latents", "text", *spec.fields}
    if set(record) != expected:
        raise ValueError(f"{where}: fields {sorted(record)}, expected {sorted(expected)}.")
    out = {}
    for key, shape in (("latents", spec.latent_shape), ("text", spec.text_shape)):
        x = np.asarray(record[key])
        if x.shape != shape:
            raise ValueError(f"{where}: {key} has shape {x.shape}, expected {shape}.")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{where}: {key} has dtype {x.dtype}, expected a float array.")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: {key} has {np.size(x) - np.isfinite(x).sum()} non-finite values (NaN/inf).")
        out[key] = x
    for key in spec.fields:
        v = np.asarray(record[key])
        if v.shape != () or not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{where}: {key} must be an integer scalar, got {v!r}.")
        out[key] = v.astype(np.int32)
    t = spec.latent_shape[1]
    if "num_cond_frames" in out and not 0 <= out["num_cond_frames"] < t:
        raise ValueError(f"{where}: num_cond_frames={int(out['num_cond_frames'])} is outside [0, {t}) "
                         f"for {t} latent frames.")
    return out


class SyntheticSource:
    """Random but deterministic records: record i depends only on (seed, i). Latents and text ~ N(0, 1)
    (normalised latents have unit scale); num_cond_frames drawn from `num_cond_probs` (None: no such field,
    capped at T-1); prompt = i."""

    def __init__(self, num_records: int, latent_shape: Sequence[int], text_shape: Sequence[int], seed: int,
                 num_cond_probs: Sequence[float] | None = NUM_COND_PROBS):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}.")
        fields = ("prompt",) if num_cond_probs is None else OPTIONAL_FIELDS
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
        rec = {"latents": rng.standard_normal(self.spec.latent_shape, np.float32),
               "text": rng.standard_normal(self.spec.text_shape, np.float32),
               "prompt": np.int32(index)}
        if self.num_cond_probs is not None:
            n = rng.choice(len(self.num_cond_probs), p=self.num_cond_probs / self.num_cond_probs.sum())
            rec["num_cond_frames"] = np.int32(min(n, self.spec.latent_shape[1] - 1))
        return rec


def make_synthetic_source(num_records: int, latent_shape: Sequence[int], text_shape: Sequence[int], seed: int,
                          num_cond_probs: Sequence[float] | None = NUM_COND_PROBS) -> SyntheticSource:
    """See SyntheticSource."""
    return SyntheticSource(num_records, latent_shape, text_shape, seed, num_cond_probs)


def _shard_file(directory: str, shard: str, field: str) -> str:
    return os.path.join(directory, f"{shard}.{field}.npy")


def _is_local(path: str) -> bool:
    return "://" not in os.fspath(path)


class _RemoteNpy:
    """Rows of a remote `.npy` file (gs://..., through etils.epath), each read on demand with one ranged read; the
    local equivalent is np.load(mmap_mode="r")."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
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


class NpyDirSource:
    """Reads a dataset directory written by `write_dataset` (format in the package docstring): memory-mapped when
    local, one ranged read per record field when remote (gs://..., through etils.epath)."""

    def __init__(self, directory: str):
        directory = os.fspath(directory)
        meta_path = epath.Path(directory) / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {directory} is not a dataset directory; write one with "
                "`python -m trigflow_distill.data.write --latents L.npy --text T.npy --out DIR`.")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}.")
        self.directory, self.meta = directory, meta
        self.text_kind = meta["text_kind"]
        self.spec = RecordSpec(tuple(meta["latent_shape"]), tuple(meta["text_shape"]), tuple(meta["fields"]))
        self._shards = [(s["name"], int(s["num_records"])) for s in meta["shards"]]
        self._starts = np.cumsum([0] + [n for _, n in self._shards])
        if self._starts[-1] != meta["num_records"]:
            raise ValueError(f"{meta_path}: shards hold {self._starts[-1]} records, num_records says "
                             f"{meta['num_records']}.")
        self._arrays = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

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
        return {f: np.array(self._array(shard, f)[row]) for f in ("latents", "text", *self.spec.fields)}


def write_dataset(out_dir: str, latents: np.ndarray, text: np.ndarray, num_cond_frames: np.ndarray | None = None,
                  prompt: np.ndarray | None = None, text_kind: str | None = None, shard_size: int = 1024,
                  normalize: bool = False) -> str:
    """Write arrays (N,16,T,H,W), (N,L,C), optional (N,) ints as a dataset directory; returns `out_dir`.

    Inputs may be memory-mapped (`np.load(..., mmap_mode="r")`): shards are written one at a time.
    `text_kind` None: "projected" if C == 1024 else "raw". `normalize`: latents are raw VAE means, apply SPEC §9.
    Every record is validated (shape, finite values, num_cond_frames range) before it is written. `out_dir` may be
    remote (gs://..., through etils.epath): each shard is written to a local temporary file, then copied there.
    """
    out_dir = os.fspath(out_dir)
    out_path = epath.Path(out_dir)
    if out_path.exists() and any(out_path.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out directory.")
    n = len(latents)
    extras = {k: v for k, v in (("num_cond_frames", num_cond_frames), ("prompt", prompt)) if v is not None}
    for name, arr in (("text", text), *extras.items()):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} records but latents has {n}; they must match.")
    if n == 0:
        raise ValueError("no records to write (latents is empty).")
    text_kind = text_kind or ("projected" if text.shape[-1] == PROJECTED_TEXT_CHANNELS else "raw")
    if text_kind not in TEXT_KINDS:
        raise ValueError(f"text_kind {text_kind!r} not in {TEXT_KINDS}.")
    text_dtype = np.dtype(np.float16 if text.dtype == np.float16 else np.float32)
    spec = RecordSpec(tuple(latents.shape[1:]), tuple(text.shape[1:]), tuple(extras))
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    out_path.mkdir(parents=True, exist_ok=True)
    staging = None if _is_local(out_dir) else tempfile.TemporaryDirectory()
    local_dir = out_dir if staging is None else staging.name
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        name = f"shard-{k:05d}"
        shapes = {"latents": (spec.latent_shape, np.float32), "text": (spec.text_shape, text_dtype),
                  **{f: ((), np.int32) for f in extras}}
        outs = {f: np.lib.format.open_memmap(_shard_file(local_dir, name, f), mode="w+", dtype=dt,
                                             shape=(stop - start, *shape)) for f, (shape, dt) in shapes.items()}
        for i in range(start, stop):
            lat = normalize_latents(latents[i]) if normalize else latents[i]
            rec = {"latents": lat, "text": text[i], **{f: extras[f][i] for f in extras}}
            rec = validate_record(rec, spec, f"input record {i}")
            for f, out in outs.items():
                out[i - start] = rec[f]
        for f, out in outs.items():
            out.flush()
            if staging is not None:  # one shard at a time on the local disk
                local = epath.Path(_shard_file(local_dir, name, f))
                local.copy(epath.Path(_shard_file(out_dir, name, f)), overwrite=True)
                local.unlink()
        shards.append({"name": name, "num_records": stop - start})
    meta = {"format": FORMAT, "num_records": n, "latent_shape": list(spec.latent_shape),
            "text_shape": list(spec.text_shape), "text_kind": text_kind, "latents_dtype": "float32",
            "text_dtype": text_dtype.name, "fields": list(spec.fields), "shards": shards}
    # meta.json last: a directory without it is an unfinished write and is not readable as a dataset.
    if staging is not None:
        staging.cleanup()
    (out_path / "meta.json").write_text(json.dumps(meta, indent=1))
    return out_dir
