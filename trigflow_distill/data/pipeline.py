"""The grain pipeline: deterministic shuffled batches with exact, process-count independent resume.

Every process builds the same global index stream and then loads and validates only its own rows of each global
batch. So the global batch of step s is the same for any number of processes, and the iterator state
({"next_index": s}) is the same on every process: a checkpoint written by P processes resumes on any other count.

One bucket (every record has one shape): range(N) -> seed -> shuffle -> repeat(epochs, reshuffled) ->
batch(global batch, drop_remainder). Several buckets (a dataset written with aspect buckets, records of different
latent shapes): every batch holds records of one bucket. Epoch e shuffles each bucket with seed (seed, e), cuts it
into whole batches (each bucket's remainder is dropped that epoch) and shuffles the list of all batches, so a
batch's bucket, like its records, is a pure function of (seed, step).
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import jax
import numpy as np

from trigflow_distill.data.format import RecordSpec, record_name, source_buckets, validate_record


class _LoadRows:
    """Global batch of record indices -> this process's stacked, validated records."""

    def __init__(self, source: Any, specs: list[RecordSpec], rows: slice, bucket_of: np.ndarray | None = None):
        self.source, self.specs, self.rows, self.bucket_of = source, specs, rows, bucket_of

    def _spec(self, index: int) -> RecordSpec:
        return self.specs[0] if self.bucket_of is None else self.specs[self.bucket_of[index]]

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [
            validate_record(self.source[int(i)], self._spec(int(i)), record_name(self.source, int(i)))
            for i in np.asarray(indices)[self.rows]
        ]
        return {k: np.stack([r[k] for r in records]) for k in records[0]}


class _BucketPlan:
    """Batch j of epoch e -> its global record indices (one bucket), computed per epoch and cached."""

    def __init__(self, groups: list[np.ndarray], batch_size: int, seed: int):
        self.groups, self.batch_size, self.seed = groups, batch_size, seed
        self.per_epoch = sum(len(g) // batch_size for g in groups)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def epoch(self, e: int) -> np.ndarray:
        with self._lock:
            if e not in self._cache:
                rng = np.random.default_rng([self.seed, e])
                batches = []
                for g in self.groups:
                    perm = rng.permutation(g)
                    whole = len(g) // self.batch_size * self.batch_size
                    batches.append(perm[:whole].reshape(-1, self.batch_size))
                batches = np.concatenate(batches)
                # Keep two epochs: prefetching threads may straddle an epoch boundary.
                self._cache = {k: v for k, v in self._cache.items() if k == e - 1}
                self._cache[e] = batches[rng.permutation(len(batches))]
            return self._cache[e]

    def __call__(self, step: int, _) -> np.ndarray:
        return self.epoch(step // self.per_epoch)[step % self.per_epoch]


def default_process_slice(batch_size: int) -> slice:
    """Equal contiguous split of the global batch by `jax.process_index()` (what a process-major mesh holds;
    `sharding.local_batch_slice` computes it from the mesh)."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"global batch size {batch_size} does not divide over {count} processes.")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def make_dataset(
    source: Any,
    batch_size: int,
    seed: int,
    *,
    num_epochs: int | None = None,
    process_slice: slice | None = None,
    spec: RecordSpec | None = None,
) -> grain.MapDataset:
    """MapDataset of this process's rows of each global batch: dicts of stacked arrays, leading dim
    `process_slice` length (default `default_process_slice(batch_size)`). `num_epochs` None repeats forever;
    each epoch is shuffled anew. A source with several buckets (`buckets()`) gives single-bucket batches (module
    docstring). Bad records raise ValueError naming the record when the batch is read."""
    n = len(source)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if n < batch_size:
        raise ValueError(
            f"the source has {n} records, fewer than one batch of {batch_size}; add records or lower the batch size."
        )
    rows = default_process_slice(batch_size) if process_slice is None else process_slice
    if not 0 <= rows.start < rows.stop <= batch_size or rows.step not in (None, 1):
        raise ValueError(f"process_slice {rows} is not a contiguous non-empty range within the batch of {batch_size}.")
    buckets = source_buckets(source) if spec is None else [("all", spec, None)]
    if len(buckets) == 1:
        ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat(num_epochs)
        return ds.batch(batch_size, drop_remainder=True).map(_LoadRows(source, [buckets[0][1]], rows))
    plan = _BucketPlan([idx for _, _, idx in buckets], batch_size, seed)
    if plan.per_epoch == 0:
        sizes = {name: len(idx) for name, _, idx in buckets}
        raise ValueError(
            f"no bucket holds a whole batch of {batch_size} (bucket sizes {sizes}); lower the batch "
            "size or write more records per bucket."
        )
    bucket_of = np.zeros(n, np.int32)
    for k, (_, _, idx) in enumerate(buckets):
        bucket_of[idx] = k
    ds = grain.MapDataset.range(plan.per_epoch).repeat(num_epochs).map_with_index(plan)
    return ds.map(_LoadRows(source, [spec for _, spec, _ in buckets], rows, bucket_of))


def make_iterator(
    source: Any,
    batch_size: int,
    seed: int,
    *,
    num_epochs: int | None = None,
    process_slice: slice | None = None,
    spec: RecordSpec | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Iterator over `make_dataset(...)` with `get_state()` / `set_state()` (exact resume; JSON-serialisable
    state). `prefetch` batches are read ahead by `num_threads` threads (prefetching does not change the order
    or the state)."""
    ds = make_dataset(source, batch_size, seed, num_epochs=num_epochs, process_slice=process_slice, spec=spec)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
