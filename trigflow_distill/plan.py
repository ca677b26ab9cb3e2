r"""Memory and FLOP plan of one DMD2 iteration, from abstract shapes on N simulated CPU devices.

  python -m trigflow_distill.plan --config=configs/predict25_4step.py --mesh=data:1,fsdp:8,seq:1 [--json] \
      [--frames 93 --height 704 --width 1280] [--net predict25_2b]
  python -m trigflow_distill.plan --config=configs/predict25_4step.py --mesh=auto --devices=8 \
      --config.mesh.device_memory_gib=80

Compiles the jitted `student_update` and `critic_update` of `dmd2.make_update_fns` for the real network
(`networks.get_preset(--net)` with the config.net options, blockwise attention so that no L x L score matrix
appears) on abstract TrainState / teacher / batch (`memplan.compile_updates`: nothing is allocated) and prints,
per device, the argument, output, temporary and total bytes of `compiled.memory_analysis()`, and the FLOPs of
one iteration. These are the XLA:CPU compiler's numbers: estimates of what the TPU/GPU compilers will do (fusion,
layouts and collective buffers differ). `--mesh=auto` makes the choice a run makes at start (`memplan.run_mesh`:
the config's global batch on --devices devices of --config.mesh.device_memory_gib GiB) and plans that mesh.

FLOPs: `compiled.cost_analysis()` (per device, rematerialisation included) counts a loop body once, so they come
from two extra compiles with 1 and 2 unrolled blocks and dense ("xla") attention:
flops = F(1) + (num_blocks - 1) (F(2) - F(1)). (`Lowered.cost_analysis()` of the unpartitioned program would be
cheaper, but it gave ~4x fewer FLOPs here, consistent with missing the attention that runs inside shard_map.)
The backward simulation's loop (n - 1 no-grad student calls, n ~ U{1..4}) is counted once, i.e. as n = 2;
blockwise attention recomputes scores in its backward pass, which dense attention does not.
Batch: `--batch_per_rank` samples per data-parallel rank (data x fsdp) for an explicit mesh, config.data.batch_size
for `auto`; latents (B, 16, 1 + (frames-1)//4, height/8, width/8); text already projected, (B, 512, 1024).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from trigflow_distill import dmd2, errors, memplan, networks, sharding

GIB = memplan.GIB
TEXT_LEN = 512
UPDATES = memplan.UPDATES


def parse_mesh(text: str) -> dict[str, int]:
    """'data:1,fsdp:8,seq:1' -> {'data': 1, 'fsdp': 8, 'seq': 1} (positive sizes, axes of sharding.MESH_AXES);
    'auto' -> every size 0 (chosen as a run would)."""
    if text.strip() == "auto":
        return {a: 0 for a in sharding.MESH_AXES}
    mesh = {}
    for part in text.split(","):
        name, _, size = part.partition(":")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"--mesh={text!r}: write axis:size pairs with positive sizes, e.g. data:1,fsdp:8,seq:1, or auto"
            )
        mesh[name.strip()] = int(size)
    sharding.mesh_request(mesh, where=f"--mesh={text}")  # axis names
    return mesh


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(16, T, H, W) latents of a video: Wan2.1 VAE, 4x time (first frame alone), 8x space."""
    if frames < 1 or (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"video {frames}x{height}x{width}: frames must be 1 + 4k and height, width multiples of 16")
    return 16, 1 + (frames - 1) // 4, height // 8, width // 8


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def plan(
    config,
    net_config,
    mesh_config: dict[str, int],
    latent_chw,
    batch_size: int,
    devices=None,
    estimates: dict | None = None,
    flops: bool = True,
) -> dict:
    """The plan dict (see --json) for `net_config` as configured by config.net, on the first prod(mesh) devices.

    estimates: {update: memplan.memory dict} already known for this mesh (from `memplan.choose_mesh`), else compiled.
    flops False: memory only (no "flops" entries; saves two compiles).
    """
    n = math.prod(mesh_config.values())
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh {mesh_config} needs {n} devices, only {len(devices)} exist")
    mesh = sharding.make_mesh(mesh_config, devices=devices[:n])
    text = (TEXT_LEN, net_config.crossattn_emb_channels)
    if estimates is None:
        compiled = memplan.compile_updates(config, net_config, mesh, latent_chw, text, batch_size)
        estimates = {name: memplan.memory(c) for name, c in compiled.items()}
    updates = {name: dict(estimates[name]) for name in UPDATES}
    if flops:  # 1- and 2-block unrolled variants with dense attention (no loop in the attention either)
        counted = [
            memplan.compile_updates(
                config,
                dataclasses.replace(net_config, num_blocks=k, scan_blocks=False, attention="xla"),
                mesh,
                latent_chw,
                text,
                batch_size,
            )
            for k in (1, 2)
        ]
        for name in UPDATES:
            f1, f2 = (_flops(c[name]) for c in counted)
            updates[name]["flops"] = f1 + (net_config.num_blocks - 1) * (f2 - f1)
    return {"devices": n, "mesh": dict(mesh.shape), "batch": batch_size, "updates": updates}


def plan_auto(
    config, net_config, latent_chw, request: dict, devices=None, log=lambda _: None, flops: bool = True
) -> dict:
    """`plan` of the mesh a run of `config` would pick on `devices` (memplan.choose_mesh; `request` a
    sharding.mesh_request with the sizes to choose at 0), with "memory_bytes" added."""
    devices = list(jax.devices() if devices is None else devices)
    memory_bytes = memplan.device_memory_bytes(devices, float(config.mesh.get("device_memory_gib", 0.0)))
    batch_size = int(config.data.batch_size)
    mesh_config, estimates = memplan.choose_mesh(
        config,
        net_config,
        devices,
        latent_chw,
        (TEXT_LEN, net_config.crossattn_emb_channels),
        batch_size,
        memory_bytes,
        request,
        log=log,
    )
    result = plan(config, net_config, mesh_config, latent_chw, batch_size, devices, estimates, flops)
    return {**result, "memory_bytes": memory_bytes}


def format_table(result: dict, latent_chw) -> str:
    """Human-readable per-device table of a plan dict."""
    n = result["devices"]
    lines = [
        f"{n} devices, mesh {memplan.format_mesh(result['mesh'])}, batch {result['batch']}, latents "
        f"{tuple(latent_chw)} (XLA:CPU estimates; bytes and TFLOP per device, TFLOP x devices)",
        f"{'update':8} {'argument GiB':>12} {'output GiB':>11} {'temp GiB':>9} {'total GiB':>10} "
        f"{'TFLOP/dev':>10} {'TFLOP':>9}",
    ]
    for name, u in result["updates"].items():
        flops = f"{u['flops'] / 1e12:10.1f} {u['flops'] * n / 1e12:9.1f}" if "flops" in u else f"{'-':>10} {'-':>9}"
        lines.append(
            f"{name:8} {u['argument_bytes'] / GIB:12.2f} {u['output_bytes'] / GIB:11.2f} "
            f"{u['temp_bytes'] / GIB:9.2f} {u['total_bytes'] / GIB:10.2f} {flops}"
        )
    if "memory_bytes" in result:
        lines.insert(
            0,
            f"mesh auto: {memplan.format_mesh(result['mesh'])} is the first mesh (by expected "
            f"throughput) that fits {result['memory_bytes'] / GIB:.2f} GiB per device",
        )
    return "\n".join(lines)


config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/predict25_4step.py[:tiny].")
flags.DEFINE_string(
    "mesh",
    "data:1,fsdp:8,seq:1",
    "Mesh axis sizes (their product is the simulated device count), "
    "or auto: the mesh a run picks on --devices devices of --config.mesh.device_memory_gib GiB.",
)
flags.DEFINE_integer("devices", 8, "Simulated devices for --mesh=auto.")
flags.DEFINE_bool("json", False, "Print the plan as JSON.")
flags.DEFINE_integer("frames", 93, "Video frames (1 + 4k).")
flags.DEFINE_integer("height", 704, "Video height in pixels.")
flags.DEFINE_integer("width", 1280, "Video width in pixels.")
flags.DEFINE_integer(
    "batch_per_rank",
    1,
    "Samples per data-parallel rank (data x fsdp) for an explicit mesh; --mesh=auto uses config.data.batch_size.",
)
flags.DEFINE_string("net", "predict25_2b", "networks preset of the architecture.")
flags.DEFINE_bool("verbose", False, "--mesh=auto: print every mesh tried.")
flags.DEFINE_bool("flops", True, "Also count FLOPs (two more compiles).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/predict25_4step.py")
    try:
        mesh_config = parse_mesh(f.mesh)
        auto = sharding.is_auto(mesh_config)
        # Before the backend starts (get_preset already asks for it): N simulated CPU devices, even beside GPUs.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", f.devices if auto else math.prod(mesh_config.values()))
        latent = latent_shape(f.frames, f.height, f.width)
        net_config = dataclasses.replace(
            networks.get_preset(f.net), **dmd2.net_options(f.config.net, attention="blockwise")
        )
        if auto:
            log = (lambda line: print(line, file=sys.stderr, flush=True)) if f.verbose else (lambda _: None)
            result = plan_auto(f.config, net_config, latent, mesh_config, log=log, flops=f.flops)
        else:
            ranks = math.prod(mesh_config.get(a, 1) for a in sharding.BATCH_AXES)
            result = plan(f.config, net_config, mesh_config, latent, f.batch_per_rank * ranks, flops=f.flops)
    except errors.CLI_ERRORS as e:
        sys.exit(errors.fail(e))
    print(json.dumps(result) if f.json else format_table(result, latent))


if __name__ == "__main__":
    app.run(main)
