"""Conversion benchmark: a synthetic Cosmos Predict2.5 2B `.pt` (bf16, every docs/algorithm.md §8 key, ~4 GB) ->
converted folder (`convert.convert`, the teacher cache's format), then opened (`convert.load_converted`, what a
teacher cache hit does: memory maps), reporting seconds, CPU seconds and peak RSS against the file size as JSON.

    python benchmarks/convert_2b.py [--dir /tmp] [--keep] [--json out.json]

The file is written tensor by tensor (each a broadcast random row, materialised only while written) and
converted in a fresh subprocess, so its peak RSS covers the conversion alone (the cache write included). Note
that the freshly written file sits in the page cache: the read is a memory copy, not disk I/O; and that on a
shared machine wall seconds depend on the load (reported), CPU seconds much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np

from trigflow_distill.models import cosmos_dit, torchfile
from trigflow_distill.models.cosmos_dit import names as sdmap


def write_synthetic(path: str) -> int:
    """Writes a `net.`-prefixed bf16 2B checkpoint; returns the parameter count."""
    rng = np.random.default_rng(0)
    shapes = sdmap.native_shapes(cosmos_dit.get_preset("predict25_2b"))
    tensors = {
        f"net.{k}": np.broadcast_to(rng.standard_normal(s[-1]).astype(ml_dtypes.bfloat16), s) for k, s in shapes.items()
    }
    tensors["net.pos_embedder.seq"] = np.arange(128, dtype=np.float32)  # ignored buffer, as in release files
    torchfile.save(path, tensors)
    return sum(int(np.prod(s)) for s in shapes.values())


def convert_child(src: str, dst: str) -> None:
    """Runs in a fresh process: .pt -> converted folder -> params, prints a JSON line with timings and peak RSS."""
    from trigflow_distill.models.cosmos_dit import convert

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    base_rss, c0, t0 = peak(), cpu(), time.perf_counter()
    convert.convert(src, dst, progress=True)
    t1, c1, convert_rss = time.perf_counter(), cpu(), peak()
    _, params = convert.load_converted(dst)
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "convert_s": t1 - t0,
                "convert_cpu_s": c1 - c0,
                "load_converted_s": t2 - t1,
                "load_converted_cpu_s": cpu() - c1,
                "rss_after_imports": base_rss,
                "peak_rss_convert": convert_rss,
                "peak_rss": peak(),
                "params_bytes": nbytes,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="where the ~4 GB file and the converted copy go")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--json", help="also write the result JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        convert_child(*args.child)
        return
    src = os.path.join(args.dir, "synthetic_predict25_2b_bf16.pt")
    dst = os.path.join(args.dir, "synthetic_predict25_2b_converted")
    shutil.rmtree(dst, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        count = write_synthetic(src)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(src)
        load0 = os.getloadavg()
        out = subprocess.run(
            [sys.executable, __file__, "--child", src, dst], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        result = {
            "params": count,
            "file_bytes": size,
            "write_s": write_s,
            **r,
            "seconds": r["convert_s"],
            "peak_rss_ratio": r["peak_rss"] / size,
            "peak_rss_convert_ratio": r["peak_rss_convert"] / size,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        gib = 2**30
        print(f"params {count / 1e9:.3f} B; file {size / gib:.2f} GiB written in {write_s:.1f} s", file=sys.stderr)
        print(
            f"convert (read + transpose + cache write): {r['convert_s']:.1f} s ({r['convert_cpu_s']:.1f} s CPU); "
            f"cache hit (memory-mapped open): {r['load_converted_s']:.1f} s; peak RSS {r['peak_rss'] / gib:.2f} GiB "
            f"({result['peak_rss_ratio']:.2f}x file; after imports {r['rss_after_imports'] / gib:.2f} GiB); "
            f"load average {load0[0]:.1f} on {os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
            if os.path.exists(src):
                os.remove(src)


if __name__ == "__main__":
    main()
