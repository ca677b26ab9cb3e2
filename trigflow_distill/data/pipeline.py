"""The grain pipeline: deterministic shuffled batches with exact, process-count independent resume.

Every process builds the same global index stream, range(N) -> seed -> shuffle -> repeat(epochs, reshuffled) ->
batch(global batch, drop_remainder), and then loads and validates only its own rows of each global batch. So the
global batch of step s is the same for any number of processes, and the iterator state ({"next_index": s}) is the
same on every process: a checkpoint written by P processes resumes on any other count.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from trigflow_distill.data.records import RecordSpec, record_name, source_spec, validate_record


class _LoadRows:
    """Global batch of record indices -> this process's stacked, validated records."""

    def __init__(self, source: Any, spec: RecordSpec, rows: slice):
        self.source, self.spec, self.rows = source, spec, rows

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = [validate_record(self.source[int(i)], self.spec, record_name(self.source, int(i)))
                   for i in np.asarray(indices)[self.rows]]
        return {k: np.stack([r[k] for r in records]) for k in records[0]}


def default_process_slice(batch_size: int) -> slice:
    """Equal contiguous split of the global batch by `jax.process_index()` (what a process-major mesh holds;
    `sharding.local_batch_slice` computes it from the mesh)."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"global batch size {batch_size} does not divide over {count} processes.")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def make_dataset(source: Any, batch_size: int, seed: int, *, num_epochs: int | None = None,
                 process_slice: slice | None = None, spec: RecordSpec | None = None) -> grain.MapDataset:
    """MapDataset of this process's rows of each global batch: dicts of stacked arrays, leading dim
    `process_slice` length (default `default_process_slice(batch_size)`). `num_epochs` None repeats forever;
    each epoch is shuffled anew. Bad records raise ValueError naming the record when the batch is read."""
    n = len(source)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if n < batch_size:
        raise ValueError(f"the source has {n} records, fewer than one batch of {batch_size}; add records or "
                         "lower the batch size.")
    rows = default_process_slice(batch_size) if process_slice is None else process_slice
    if not 0 <= rows.start < rows.stop <= batch_size or rows.step not in (None, 1):
        raise ValueError(f"process_slice {rows} is not a contiguous non-empty range within the batch of {batch_size}.")
    spec = source_spec(source) if spec is None else spec
    ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=True).map(_LoadRows(source, spec, rows))


def make_iterator(source: Any, batch_size: int, seed: int, *, num_epochs: int | None = None,
                  process_slice: slice | None = None, spec: RecordSpec | None = None, num_threads: int = 2,
                  prefetch: int = 2) -> grain.DatasetIterator:
    """Iterator over `make_dataset(...)` with `get_state()` / `set_state()` (exact resume; JSON-serialisable
    state). `prefetch` batches are read ahead by `num_threads` threads (prefetching does not change the order
    or the state)."""
    ds = make_dataset(source, batch_size, seed, num_epochs=num_epochs, process_slice=process_slice, spec=spec)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
