"""Training data: precomputed latents + text embeddings, a grain pipeline, a writer and a synthetic source.

On-disk format, version "trigflow_distill.data/2" (version 1 datasets still load: they are one bucket with no
padding masks), a directory holding
  meta.json      {"format", "num_records", "text_shape": [L,C], "text_kind": "raw" | "projected",
                  "latents_dtype": "float32", "text_dtype": "float32" | "float16" | "bfloat16",
                  "fields": optional array fields present in every shard,
                  "shards": [{"name": "shard-00000" (or "unit-00003/shard-00000": shards may sit in
                              sub-folders, as `prepare` writes them), "num_records": n, "bucket": "704x1280",
                              "latent_shape": [16,T,H,W], "padding_mask_shape": [1,h,w] | null}, ...]}
  shard-XXXXX.latents.npy           (n, 16, T, H, W) float32, Wan2.1 latents normalised per channel (§9)
  shard-XXXXX.text.npy              (n, L, C): raw Cosmos-Reason1 embeddings (C = 100352) or the output of the
                                     frozen crossattn_proj (C = 1024), float32, float16 or bfloat16 (stored as
                                     its uint16 bit pattern: .npy has no bfloat16; meta text_dtype says so)
  shard-XXXXX.num_cond_frames.npy   (n,) int32, optional: conditional latent frames of each sample, in [0, T)
  shard-XXXXX.prompt.npy            (n,) int32, optional: prompt id
  shard-XXXXX.padding_mask.npy      (n, 1, h, w) uint8, optional: 1 on padded pixels (a video letterboxed into
                                     its bucket's resolution), at latent (h, w) = (H, W) or pixel (8H, 8W)
                                     resolution; every network call of the algorithm gets it (§7). Missing:
                                     zeros, nothing is padding.
  shard-XXXXX.records.jsonl         optional, one JSON object per record: {"caption": str, "source": str
                                     (the video file), "frames": [start, stop)}; read with `source.info(i)`,
                                     never batched.
Every record of a shard has one latent shape; shards may differ (aspect buckets): all shards with the same
"bucket" share the shape, and the pipeline batches within one bucket (`make_dataset`). Text shape and fields
are the same in every shard. Records are numbered across shards in order. meta.json is written last, so an
interrupted write is not a dataset.

Write one from numpy arrays with `python -m trigflow_distill.data.cli --latents L.npy --text T.npy
[--num-cond C.npy] [--prompt P.npy] [--padding-mask M.npy] [--text-kind raw|projected] [--normalize] --out DIR`,
or shard by shard with `DatasetWriter(out_dir).write_shard(latents, text, bucket=..., padding_mask=...,
info=[{"caption": ..., "source": ..., "frames": [a, b]}, ...])` and `.close()`.

Each record (and each batch, stacked) is a dict {"latents": (16,T,H,W) f32, "text": (L,C) f32,
["num_cond_frames": int32], ["prompt": int32], ["padding_mask": (1,h,w) f32]}. Section numbers (§N) refer to
docs/algorithm.md.
"""

from trigflow_distill.data.format import (
    FORMAT,
    NUM_COND_PROBS,
    NpyDirSource,
    RecordSpec,
    SyntheticSource,
    make_synthetic_source,
    normalize_latents,
    validate_record,
)
from trigflow_distill.data.pipeline import default_process_slice, make_dataset, make_iterator
from trigflow_distill.data.writer import DatasetWriter, write_dataset
from trigflow_distill.models.wan_vae.names import LATENT_MEAN, LATENT_STD

__all__ = [
    "FORMAT",
    "LATENT_MEAN",
    "LATENT_STD",
    "NUM_COND_PROBS",
    "DatasetWriter",
    "NpyDirSource",
    "RecordSpec",
    "SyntheticSource",
    "default_process_slice",
    "make_dataset",
    "make_iterator",
    "make_synthetic_source",
    "normalize_latents",
    "validate_record",
    "write_dataset",
]
