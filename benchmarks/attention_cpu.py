"""Attention speed on CPU: trigflow_distill's impls (and two naive JAX formulations) vs torch SDPA, fwd and fwd+bwd.

    python benchmarks/attention_cpu.py [--shapes 8,64,4,64 4,1024,8,64:77] [--rounds 15] [--threads 2] [--json]

A shape is B,L,H,D[:S] (S = key tokens, default L). Every round times each candidate once, interleaved, so load
from other processes hits them alike; reported are medians (ms) and speed ratios torch_ms / jax_ms (> 1: JAX is
faster). fwd+bwd = output and gradients w.r.t. q, k, v for a fixed random cotangent. Torch gets the same BLHD
arrays (transposed views, as a DiT would pass them) and --threads threads; XLA uses its default thread pool.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.models.cosmos_dit.attention import attention

DEFAULT_SHAPES = ["8,64,4,64", "32,64,4,64", "8,64,16,32", "8,64,4,64:16", "8,256,8,64", "4,1024,8,64", "4,1024,2,128"]


def naive_einsum(q, k, v):
    """The textbook BLHD formulation (scale on the logits); what a straightforward flax port writes."""
    s = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v)


CANDIDATES = {
    "naive_einsum": naive_einsum,
    "xla": lambda q, k, v: attention(q, k, v, impl="xla"),
    "einsum": lambda q, k, v: attention(q, k, v, impl="einsum"),
    "einsum_nochunk": lambda q, k, v: attention(q, k, v, impl="einsum", q_block_size=1 << 30),
    "blockwise": lambda q, k, v: attention(q, k, v, impl="blockwise", block_size=512),
}


def parse_shape(text):
    dims, _, keys = text.partition(":")
    b, length, h, d = (int(x) for x in dims.split(","))
    return b, length, int(keys) if keys else length, h, d


def interleaved_medians(fns, rounds):
    for fn in fns.values():  # compile + warm up
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_shape(shape, rounds, torch):
    b, length, num_keys, h, d = shape
    rng = np.random.default_rng(0)
    q, g = (rng.standard_normal((b, length, h, d), dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, num_keys, h, d), dtype=np.float32) for _ in range(2))
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv)

    def torch_fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        sdpa(tq, tk, tv).backward(tg)

    fwd, fwd_bwd = {"torch": torch_fwd}, {"torch": torch_fwd_bwd}
    args = [jnp.asarray(x) for x in (q, k, v, g)]
    for name, fn in CANDIDATES.items():
        f = jax.jit(fn)
        fb = jax.jit(lambda q, k, v, g, fn=fn: jax.vjp(fn, q, k, v)[1](g))
        fwd[name] = lambda f=f: jax.block_until_ready(f(*args[:3]))
        fwd_bwd[name] = lambda fb=fb: jax.block_until_ready(fb(*args))
    return interleaved_medians(fwd, rounds), interleaved_medians(fwd_bwd, rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    import torch  # benchmark-only dependency

    torch.set_num_threads(args.threads)
    results = []
    for text in args.shapes:
        shape = parse_shape(text)
        fwd, fwd_bwd = bench_shape(shape, args.rounds, torch)
        results.append({"shape_B_L_S_H_D": shape, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd})
        if not args.json:
            b, length, num_keys, h, d = shape
            print(
                f"B={b} L={length} S={num_keys} H={h} D={d}: torch fwd {fwd['torch']:.2f} ms, "
                f"fwd+bwd {fwd_bwd['torch']:.2f} ms;  speed vs torch (fwd, fwd+bwd):",
                flush=True,
            )
            for name in CANDIDATES:
                print(
                    f"    {name:15s} {fwd['torch'] / fwd[name]:5.2f}  {fwd_bwd['torch'] / fwd_bwd[name]:5.2f}"
                    f"    ({fwd[name]:.2f} / {fwd_bwd[name]:.2f} ms)",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"backend": jax.default_backend(), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
