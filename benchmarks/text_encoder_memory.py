"""Per-chip memory of the Reason1-7B text embedding, compile-only (nothing is allocated or run).

    python benchmarks/text_encoder_memory.py --json /tmp/text_encoder_memory.json

Simulates `--devices` CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count), builds the mesh
{data: 1, fsdp: devices}, shards the parameters as `reason1.load(..., mesh=mesh)` does
(`sharding.param_sharding`) and the token ids (B, L) over the batch axes, then lowers and compiles
`reason1.embed` and reads XLA's `memory_analysis()` for one device: arguments (its parameter shard and ids),
output (its share of the (B, L, 100352) float32 embedding), temporaries (gathered layer weights, activations).
A second row adds what `prepare` does next: the teacher's frozen crossattn_proj, GELU(e W + b) to 1024 wide
(docs/algorithm.md §7, §11), whose output is only (B, L, 1024). Prints JSON.

On the CPU backend a bfloat16 figure overstates an accelerator's: XLA:CPU has no bf16 matmul and keeps a float32
copy of each device's bf16 weight shards (~2x its parameter bytes, in "temp"); `--dtype float32` has no such
copies (its temp is activations only), so accelerator bf16 ~ bf16 arguments + output + the float32 run's temp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    # Before jax initialises its backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from trigflow_distill.common import sharding
    from trigflow_distill.models import reason1
    from trigflow_distill.models.reason1 import qwen2

    cfg = qwen2.REASON1_7B
    dtype = jnp.dtype(args.dtype)
    mesh = sharding.make_mesh({"data": 1, "fsdp": args.devices})
    shapes = qwen2.param_shapes(cfg, dtype)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding.param_sharding(shapes, mesh)
    )
    ids = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32, sharding=sharding.batch_sharding(mesh))
    width = cfg.num_layers * cfg.hidden_size
    proj = {
        "w": jax.ShapeDtypeStruct((width, 1024), dtype, sharding=NamedSharding(mesh, P("fsdp", None))),
        "b": jax.ShapeDtypeStruct((1024,), dtype, sharding=NamedSharding(mesh, P())),
    }
    out_sharding = sharding.batch_sharding(mesh)

    def embed(params, ids):
        return reason1.embed(cfg, params, ids)

    def embed_project(params, proj, ids):
        e = reason1.embed(cfg, params, ids).astype(dtype)
        return jax.nn.gelu(e @ proj["w"] + proj["b"], approximate=False)

    n_params = sum(s.size for s in jax.tree.leaves(shapes))
    result = {
        "model": "Reason1-7B language model (Qwen2.5-VL-7B text)",
        "params": n_params,
        "dtype": args.dtype,
        "devices": args.devices,
        "mesh": dict(mesh.shape),
        "batch": args.batch,
        "length": args.length,
        "embedding_width": width,
        "platform": jax.devices()[0].platform,
        "param_bytes_per_device_ideal": n_params * dtype.itemsize // args.devices,
    }
    rows = {"embed": (embed, (params, ids)), "embed_project": (embed_project, (params, proj, ids))}
    for name, (fn, fn_args) in rows.items():
        compiled = jax.jit(fn, out_shardings=out_sharding).lower(*fn_args).compile()
        mem = compiled.memory_analysis()
        row = {
            k: int(getattr(mem, k))
            for k in (
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "temp_size_in_bytes",
                "alias_size_in_bytes",
                "generated_code_size_in_bytes",
            )
        }
        row["total_bytes"] = (
            row["argument_size_in_bytes"]
            + row["output_size_in_bytes"]
            + row["temp_size_in_bytes"]
            - row["alias_size_in_bytes"]
        )
        row["total_GiB"] = round(row["total_bytes"] / 2**30, 3)
        result[name] = row
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
