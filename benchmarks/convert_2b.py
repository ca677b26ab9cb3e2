"""Conversion benchmark: a synthetic Cosmos Predict2.5 2B `.pt` (bf16, every SPEC §8 key, ~4 GB) -> Flax params
-> Orbax, reporting seconds and peak RSS against the file size.

    python benchmarks/convert_2b.py [--dir /tmp] [--keep]

The file is written tensor by tensor (each a broadcast random row, materialised only while written) and
converted in a fresh subprocess, so its peak RSS covers the conversion alone. Note that the freshly written
file sits in the page cache: the read is a memory copy, not disk I/O.
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

import ml_dtypes
import numpy as np

from trigflow_distill import networks, torchfile
from trigflow_distill.networks import state_dict as sdmap


def write_synthetic(path: str) -> int:
    """Writes a `net.`-prefixed bf16 2B checkpoint; returns the parameter count."""
    rng = np.random.default_rng(0)
    shapes = sdmap.native_shapes(networks.get_preset("predict25_2b"))
    tensors = {f"net.{k}": np.broadcast_to(rng.standard_normal(s[-1]).astype(ml_dtypes.bfloat16), s)
               for k, s in shapes.items()}
    tensors["net.pos_embedder.seq"] = np.arange(128, dtype=np.float32)  # ignored buffer, as in release files
    torchfile.save(path, tensors)
    return sum(int(np.prod(s)) for s in shapes.values())


def convert_child(src: str, dst: str) -> None:
    """Runs in a fresh process: .pt -> params -> Orbax, prints a JSON line with timings and peak RSS."""
    import jax

    from trigflow_distill import convert

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    sd, fields = convert._source(src, "auto", progress=True)
    config, params = convert._build(src, sd, fields, {})
    t1 = time.perf_counter()
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    convert.save_converted(dst, params, convert._shapes(sd), fields)
    t2 = time.perf_counter()
    print(json.dumps({
        "load_s": t1 - t0, "orbax_save_s": t2 - t1,
        "rss_after_imports": base_rss, "peak_rss_load": load_rss,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "params_bytes": sum(a.nbytes for a in jax.tree.leaves(params)),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="where the ~4 GB file and the Orbax copy go")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        convert_child(*args.child)
        return
    src = os.path.join(args.dir, "synthetic_predict25_2b_bf16.pt")
    dst = os.path.join(args.dir, "synthetic_predict25_2b_orbax")
    shutil.rmtree(dst, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        count = write_synthetic(src)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(src)
        out = subprocess.run([sys.executable, __file__, "--child", src, dst], check=True, stdout=subprocess.PIPE,
                             text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        gib = 2**30
        print(f"params {count / 1e9:.3f} B; file {size / gib:.2f} GiB written in {write_s:.1f} s")
        print(f"load .pt -> params: {r['load_s']:.1f} s; Orbax save: {r['orbax_save_s']:.1f} s")
        print(f"RSS after imports {r['rss_after_imports'] / gib:.2f} GiB; peak RSS during load "
              f"{r['peak_rss_load'] / gib:.2f} GiB ({r['peak_rss_load'] / size:.2f}x file); peak overall "
              f"{r['peak_rss'] / gib:.2f} GiB ({r['peak_rss'] / size:.2f}x file); params "
              f"{r['params_bytes'] / gib:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
            if os.path.exists(src):
                os.remove(src)


if __name__ == "__main__":
    main()
