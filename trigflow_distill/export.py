"""Export the distilled student of a training run for the PyTorch ecosystem.

  python -m trigflow_distill.export --workdir=/tmp/run --out=/tmp/student.pt             # native Cosmos .pt (bf16)
  python -m trigflow_distill.export --workdir=/tmp/run --out=/tmp/student --format=diffusers

The EMA weights are exported unless --raw; the frozen text projection is taken from the teacher, so the file
is a complete Cosmos DiT that loads like the teacher it came from (and samples in 4 steps without guidance).
"""
import argparse
import sys
import time

import jax
import numpy as np

from trigflow_distill import convert, run


def export_student(workdir: str, out: str, fmt: str = "torch", use_ema: bool = True) -> None:
    _, net_config, teacher_params, student, ema = run.load_run(workdir)
    params = jax.tree.map(np.asarray, jax.device_get(ema if use_ema else student))
    if "crossattn_proj" in teacher_params:
        params["crossattn_proj"] = jax.tree.map(np.asarray, jax.device_get(teacher_params["crossattn_proj"]))
    if fmt == "torch":
        convert.export_torch(params, net_config, out)
    elif fmt == "diffusers":
        convert.export_diffusers(params, net_config, out)
    else:
        raise ValueError(f"--format={fmt!r}: use 'torch' or 'diffusers'.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m " + __spec__.name if __spec__ else None, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint is exported)")
    parser.add_argument("--out", required=True, help="output .pt file (torch) or folder (diffusers)")
    parser.add_argument("--format", default="torch", choices=("torch", "diffusers"))
    parser.add_argument("--raw", action="store_true", help="export the raw student instead of its EMA")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        export_student(args.workdir, args.out, args.format, use_ema=not args.raw)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported the {'raw' if args.raw else 'EMA'} student of {args.workdir} to {args.out} "
          f"({args.format}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
