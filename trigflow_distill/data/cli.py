"""CLI: write numpy arrays as a dataset directory (format: see `trigflow_distill.data`).

python -m trigflow_distill.data.cli --latents L.npy --text T.npy [--num-cond C.npy] [--prompt P.npy]
    [--padding-mask M.npy] [--text-kind raw|projected] [--normalize] [--shard-size 1024]
    [--net predict25_2b|...|any] [--overwrite] --out DIR

The shapes are checked against what the trainer of `--net` needs before anything is written: 16 latent channels,
even latent height and width (the DiT patchifies 2x2), and a text width the teacher takes (raw Cosmos-Reason1
embeddings or the output of its text projection). An existing non-empty --out is replaced only with --overwrite,
and only once the new dataset is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

from trigflow_distill.common import cli
from trigflow_distill.common.errors import CLI_ERRORS, fail
from trigflow_distill.data.format import TEXT_KINDS, NpyDirSource
from trigflow_distill.data.writer import write_dataset
from trigflow_distill.models import cosmos_dit


def _load(path: str | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{what} file {path} does not exist.")
    return np.load(path, mmap_mode="r")


def check_shapes(latents: np.ndarray, text: np.ndarray, text_kind: str | None, net: str) -> str | None:
    """ValueError unless (N,16,T,H,W) latents and (N,L,C) text fit the trainer of the networks preset `net`
    ("any": only the layout is checked). Returns the text kind (given, or told by the width; None for "any")."""
    if latents.ndim != 5 or latents.shape[1] != 16:
        raise ValueError(
            f"--latents has shape {latents.shape}; the trainer needs (N, 16, T, H, W) Wan2.1 VAE latents (16 channels)."
        )
    h, w = latents.shape[3:]
    if h % 2 or w % 2:
        raise ValueError(
            f"--latents spatial size {h}x{w} is not even; the DiT patchifies 2x2 latent pixels "
            "(videos whose sides are multiples of 16 pixels give even latents)."
        )
    if text.ndim != 3:
        raise ValueError(f"--text has shape {text.shape}; expected (N, L, C) text embeddings.")
    if net == "any":
        return text_kind
    if net not in cosmos_dit.PRESETS:
        raise ValueError(f"--net={net!r}: use one of {sorted(cosmos_dit.PRESETS)} or 'any'.")
    # The trainer's own check (latent channels and patches, text width and kind) against the preset's network.
    return cosmos_dit.check_data(cosmos_dit.PRESETS[net], latents.shape[1:], text.shape[-1], text_kind)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise FileExistsError(f"--out {out} is a file; give a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it or choose a new --out.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-data",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--latents", required=True, help=".npy (N,16,T,H,W) float latents")
    parser.add_argument("--text", required=True, help=".npy (N,L,C) text embeddings, raw or projected")
    parser.add_argument("--num-cond", help=".npy (N,) integer number of conditional latent frames")
    parser.add_argument("--prompt", help=".npy (N,) integer prompt ids")
    parser.add_argument(
        "--padding-mask", help=".npy (N,1,h,w) 0/1 padding masks (1 = padded), latent or pixel resolution"
    )
    parser.add_argument("--text-kind", choices=TEXT_KINDS, help="default: told by the width (see --net)")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="latents are raw Wan2.1 VAE means: normalise them per channel (docs/algorithm.md §9)",
    )
    parser.add_argument("--shard-size", type=int, default=1024, help="records per shard file")
    parser.add_argument(
        "--net",
        default="predict25_2b",
        help="networks preset of the teacher the data is for (its text widths are checked); 'any' "
        "skips the width check",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--out", required=True, help="new (or empty) output directory")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        _check_out(out, args.overwrite)
        latents, text = _load(args.latents, "latents"), _load(args.text, "text")
        text_kind = check_shapes(latents, text, args.text_kind, args.net)
        replace = os.path.isdir(out) and bool(os.listdir(out))
        # --overwrite: the new dataset is written beside the old one, which goes only once the new one is complete
        target = f"{out}.writing-{os.getpid()}" if replace else out
        try:
            write_dataset(
                target,
                latents,
                text,
                _load(args.num_cond, "num-cond"),
                _load(args.prompt, "prompt"),
                text_kind,
                args.shard_size,
                args.normalize,
                _load(args.padding_mask, "padding-mask"),
            )
        except BaseException:
            if replace:
                shutil.rmtree(target, ignore_errors=True)
            raise
        if replace:
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(target, out)
            shutil.rmtree(old)
        src = NpyDirSource(out)
    except CLI_ERRORS as e:
        return fail(e)
    print(
        f"wrote {len(src)} records to {out}: latents {src.spec.latent_shape}, text {src.spec.text_shape} "
        f"({src.text_kind}), fields {list(src.spec.fields)}"
    )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
