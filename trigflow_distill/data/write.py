"""CLI: write numpy arrays as a dataset directory (format: see `trigflow_distill.data`).

python -m trigflow_distill.data.write --latents L.npy --text T.npy [--num-cond C.npy] [--prompt P.npy]
    [--text-kind raw|projected] [--normalize] [--shard-size 1024] --out DIR
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from trigflow_distill.data.records import TEXT_KINDS, NpyDirSource, write_dataset


def _load(path: str | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{what} file {path} does not exist.")
    return np.load(path, mmap_mode="r")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trigflow_distill.data.write", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help=".npy (N,16,T,H,W) float latents")
    parser.add_argument("--text", required=True, help=".npy (N,L,C) text embeddings, raw or projected")
    parser.add_argument("--num-cond", help=".npy (N,) integer number of conditional latent frames")
    parser.add_argument("--prompt", help=".npy (N,) integer prompt ids")
    parser.add_argument("--text-kind", choices=TEXT_KINDS, help="default: projected if C == 1024 else raw")
    parser.add_argument("--normalize", action="store_true",
                        help="latents are raw Wan2.1 VAE means: normalise them per channel (SPEC §9)")
    parser.add_argument("--shard-size", type=int, default=1024, help="records per shard file")
    parser.add_argument("--out", required=True, help="new (or empty) output directory")
    args = parser.parse_args(argv)
    try:
        write_dataset(args.out, _load(args.latents, "latents"), _load(args.text, "text"),
                      _load(args.num_cond, "num-cond"), _load(args.prompt, "prompt"), args.text_kind,
                      args.shard_size, args.normalize)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    src = NpyDirSource(args.out)
    print(f"wrote {len(src)} records to {args.out}: latents {src.spec.latent_shape}, text {src.spec.text_shape} "
          f"({src.text_kind}), fields {list(src.spec.fields)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
