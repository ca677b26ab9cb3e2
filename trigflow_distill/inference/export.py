"""Export the distilled student of a training run for the PyTorch ecosystem.

  trigflow-export --workdir=/tmp/run --out=/tmp/student.pt             # native Cosmos .pt (bf16)
  trigflow-export --workdir=gs://bucket/run --out=gs://bucket/student --format=diffusers

The EMA weights are exported unless --raw; the frozen text projection is taken from the teacher, so the file
is a complete Cosmos DiT that loads like the teacher it came from (and samples in 4 steps without guidance). A
guidance-conditioned student (docs/algorithm.md §15) keeps its CFG-scale projection as `guidance_embedder.linear.weight`
(native format only: diffusers' CosmosTransformer3DModel has no guidance input); this project's convert and generate
read it back.
A student with a NaN or inf in any weight (in the exported bfloat16) is refused, naming the step: no format is written.
Only the exported student is read from the checkpoint (`restore.load_student`: a partial restore into host memory, no
optimizer state), so exporting a 2B run reads 8.2 GB of fp32 weights, not the whole ~56 GB TrainState. Workdir and
output may be local or remote (gs://, through etils.epath); an existing output is replaced only with --overwrite.
"""

import argparse
import sys
import time

import jax
import ml_dtypes
import numpy as np

from trigflow_distill.common import errors
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import restore

EXPORT_DTYPE = ml_dtypes.bfloat16  # what convert.export_torch / export_diffusers write by default


def non_finite(params, dtype=EXPORT_DTYPE) -> list[str]:
    """Names of the leaves of `params` holding a NaN or inf once cast to `dtype` (a finite fp32 value near the
    limit rounds to inf in bfloat16), one leaf at a time so that the peak is one leaf's copy."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(x)
        if (x.dtype.kind == "f" or x.dtype == EXPORT_DTYPE) and not np.isfinite(x.astype(dtype, copy=False)).all():
            bad.append("/".join(str(getattr(k, "key", k)) for k in path))
    return bad


def export_student(workdir: str, out: str, fmt: str = "torch", use_ema: bool = True, overwrite: bool = False) -> None:
    if fmt not in ("torch", "diffusers"):
        raise ValueError(f"--format={fmt!r}: use 'torch' or 'diffusers'.")
    step, _, net_config, student = restore.load_student_at(workdir, "ema" if use_ema else "raw")
    # The file holds a complete Cosmos DiT: the student's weights and the teacher's frozen text projection.
    params = {**student["net"], **({"crossattn_proj": student["text_proj"]} if student["text_proj"] else {})}
    bad = non_finite(params, EXPORT_DTYPE)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(
            f"the {'EMA' if use_ema else 'raw'} student of step {step} in {workdir} has non-finite values ({shown}) "
            "in the export's bfloat16; nothing was written. Retrain from an earlier checkpoint with lower learning "
            "rates, then export again."
        )
    if fmt == "torch":
        convert.export_torch(params, net_config, out, overwrite=overwrite)
    else:
        convert.export_diffusers(params, net_config, out, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint is exported)")
    parser.add_argument("--out", required=True, help="output .pt file (torch) or folder (diffusers)")
    parser.add_argument("--format", default="torch", choices=("torch", "diffusers"))
    parser.add_argument("--raw", action="store_true", help="export the raw student instead of its EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        export_student(args.workdir, args.out, args.format, use_ema=not args.raw, overwrite=args.overwrite)
    except errors.CLI_ERRORS as e:
        return errors.fail(e)
    print(
        f"exported the {'raw' if args.raw else 'EMA'} student of {args.workdir} to {args.out} "
        f"({args.format}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
