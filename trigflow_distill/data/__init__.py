"""Training data: precomputed latents + text embeddings, a grain pipeline, a writer and a synthetic source.

On-disk format (version "trigflow_distill.data/1"), a directory holding
  meta.json                         {"format", "num_records", "latent_shape": [16,T,H,W], "text_shape": [L,C],
                                     "text_kind": "raw" | "projected", "latents_dtype": "float32",
                                     "text_dtype": "float32" | "float16", "fields": optional fields present,
                                     "shards": [{"name": "shard-00000", "num_records": n}, ...]}
  shard-XXXXX.latents.npy           (n, 16, T, H, W) float32, Wan2.1 latents normalised per channel (SPEC §9)
  shard-XXXXX.text.npy              (n, L, C): raw Cosmos-Reason1 embeddings (C = 100352) or the output of the
                                     frozen crossattn_proj (C = 1024), float32 or float16
  shard-XXXXX.num_cond_frames.npy   (n,) int32, optional: conditional latent frames of each sample, in [0, T)
  shard-XXXXX.prompt.npy            (n,) int32, optional: prompt id
Records are numbered across shards in order. meta.json is written last, so an interrupted write is not a dataset.
Write one with `python -m trigflow_distill.data.write --latents L.npy --text T.npy [--num-cond C.npy]
[--prompt P.npy] [--text-kind raw|projected] [--normalize] --out DIR`.

Each record (and each batch, stacked) is a dict {"latents": (16,T,H,W) f32, "text": (L,C) f32,
["num_cond_frames": int32], ["prompt": int32]}.
"""
from trigflow_distill.data.pipeline import default_process_slice, make_dataset, make_iterator
from trigflow_distill.data.records import (LATENT_MEAN, LATENT_STD, NUM_COND_PROBS, NpyDirSource, RecordSpec,
                                           SyntheticSource, make_synthetic_source, normalize_latents,
                                           validate_record, write_dataset)

__all__ = ["LATENT_MEAN", "LATENT_STD", "NUM_COND_PROBS", "NpyDirSource", "RecordSpec", "SyntheticSource",
           "default_process_slice", "make_dataset", "make_iterator", "make_synthetic_source", "normalize_latents",
           "validate_record", "write_dataset"]
