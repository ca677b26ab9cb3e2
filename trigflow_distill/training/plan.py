r"""Memory and FLOP plan of one DMD2 iteration, from abstract shapes on N simulated CPU devices.

  python -m trigflow_distill.training.plan --config=configs/predict25_4step.py --mesh=data:1,fsdp:8,seq:1 [--json] \
      [--frames 93 --height 704 --width 1280] [--net predict25_2b]
  python -m trigflow_distill.training.plan --config=configs/predict25_4step.py --mesh=auto --devices=8 \
      --config.mesh.device_memory_gib=80

Compiles the jitted `student_update` and `critic_update` of `dmd2.make_update_fns` for the real network
(`cosmos_dit.get_preset(--net)` with the config.net options, blockwise attention so that no L x L score matrix
appears) on abstract TrainState / teacher / batch (`compile_updates`: nothing is allocated) and prints,
per device, the argument, output, temporary and total bytes of `compiled.memory_analysis()`, and the FLOPs of
one iteration. These are the XLA:CPU compiler's numbers: estimates of what the TPU/GPU compilers will do (fusion,
layouts and collective buffers differ). `--mesh=auto` makes the choice a run makes at start (`run_mesh`:
the config's global batch on --devices devices of --config.mesh.device_memory_gib GiB) and plans that mesh.

FLOPs: `compiled.cost_analysis()` (per device, rematerialisation included) counts a loop body once, so they come
from two extra compiles with 1 and 2 unrolled blocks and dense ("xla") attention:
flops = F(1) + (num_blocks - 1) (F(2) - F(1)). (`Lowered.cost_analysis()` of the unpartitioned program would be
cheaper, but it gave ~4x fewer FLOPs here, consistent with missing the attention that runs inside shard_map.)
The backward simulation's loop (n - 1 no-grad student calls, n ~ U{1..4}) is counted once, i.e. as n = 2;
blockwise attention recomputes scores in its backward pass, which dense attention does not.
Batch: `--batch_per_rank` samples per data-parallel rank (data x fsdp) for an explicit mesh, config.data.batch_size
for `auto`; latents (B, 16, 1 + (frames-1)//4, height/8, width/8); text already projected, (B, 512, 1024).

Compile-only memory plan of the DMD2 updates, and the automatic mesh (config.mesh.shape = "auto").

`compile_updates` lowers and compiles the jitted `student_update` / `critic_update` on abstract TrainState,
teacher and batch (`jax.ShapeDtypeStruct`s with shardings: nothing is allocated); `memory` reads the per-device
bytes of a compiled update. `choose_mesh` ranks the (data, fsdp, seq) meshes of the devices by expected throughput
(fewest `seq` shards first, then the most data parallelism: each costs collectives) and returns the first one
whose compile-only plan fits the per-device memory; `run_mesh` does that at the start of a run, prints the choice
and caches it in the workdir. On simulated CPU devices the numbers are the XLA:CPU compiler's: estimates of what
the TPU/GPU compilers will do (fusion, layouts and collective buffers differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from trigflow_distill.common import cli, errors, sharding
from trigflow_distill.models import cosmos_dit, wan_vae
from trigflow_distill.training import builder

GIB = 2**30
UPDATES = ("student", "critic")
CACHE_FILE = "mesh_auto.json"
_MAX_DOUBLINGS = 12  # how far (x 4096 devices) the refusal message looks for a mesh that fits


def _lowering_inputs(config, net_config, mesh, latent_chw, text_shape, batch_size):
    """(critic_fn, student_fn, abstract args) of the jitted updates on `mesh`: `builder.build` on abstract teacher
    weights, the same builder a run calls."""
    sharding.check_batch(batch_size, mesh)
    run = builder.build(config, net_config, builder.abstract_teacher(config, net_config), mesh)
    batch = {
        "latents": jax.ShapeDtypeStruct((batch_size,) + tuple(latent_chw), jnp.float32, sharding=run.batch_sharding),
        "text": jax.ShapeDtypeStruct((batch_size,) + tuple(text_shape), jnp.float32, sharding=run.batch_sharding),
    }
    return run.critic_step, run.student_step, (run.abstract_state, run.teacher, batch)


def compile_updates(config, net_config, mesh, latent_chw, text_shape, batch_size: int, updates=UPDATES) -> dict:
    """{name: compiled} for the `updates` ("student", "critic") on abstract inputs of the given shapes on `mesh`.

    latent_chw: (16, T, H, W) latents of one sample; text_shape: (L, C) projected text of one sample.
    """
    critic, student, args = _lowering_inputs(config, net_config, mesh, latent_chw, text_shape, batch_size)
    fns = {"critic": critic, "student": student}
    return {name: fns[name].lower(*args).compile() for name in updates}


def argument_bytes(config, net_config, mesh, latent_chw, text_shape, batch_size: int) -> int:
    """Per-device bytes of the updates' arguments (state, teacher, batch) under `mesh`, from shapes alone."""
    *_, args = _lowering_inputs(config, net_config, mesh, latent_chw, text_shape, batch_size)

    def shard_bytes(a):
        return math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize

    return sum(shard_bytes(a) for a in jax.tree.leaves(args))


def memory(compiled) -> dict:
    """Per-device bytes of a compiled update; outputs alias the donated state, so total = args + out - alias + temp."""
    mem = compiled.memory_analysis()
    args, out, alias, temp = (
        int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes),
        int(mem.alias_size_in_bytes),
        int(mem.temp_size_in_bytes),
    )
    return {"argument_bytes": args, "output_bytes": out, "temp_bytes": temp, "total_bytes": args + out - alias + temp}


def format_mesh(mesh_config: dict) -> str:
    """{'data': 1, 'fsdp': 8, 'seq': 1} -> 'data:1,fsdp:8,seq:1' (the syntax of config.mesh.shape and plan --mesh)."""
    return ",".join(f"{a}:{mesh_config[a]}" for a in sharding.MESH_AXES if a in mesh_config)


def candidates(num_devices: int, batch_size: int, num_heads: int, request: dict | None = None) -> list[dict]:
    """The (data, fsdp, seq) meshes of `num_devices` that can run a global batch of `batch_size`, best first.

    data x fsdp must divide the batch; seq must divide the heads (the head-parallel self-attention of
    cosmos_dit.network). Sizes fixed (> 0) in `request` (a `sharding.mesh_request`) are kept. Ranked by expected
    throughput: fewest seq shards (an all-to-all per attention layer, smaller matmuls), then the most data
    parallelism (fsdp gathers every parameter in every pass).
    """
    fixed = {a: v for a, v in (request or {}).items() if v > 0}
    out = []
    for seq in range(1, num_devices + 1):
        if num_devices % seq or (seq > 1 and num_heads % seq):
            continue
        ranks = num_devices // seq
        for fsdp in range(1, ranks + 1):
            mesh = {"data": ranks // fsdp, "fsdp": fsdp, "seq": seq}
            if ranks % fsdp == 0 and batch_size % ranks == 0 and all(mesh[k] == v for k, v in fixed.items()):
                out.append(mesh)
    return out


def device_memory_bytes(devices, configured_gib: float = 0.0) -> int:
    """Per-device memory: `configured_gib` when > 0, else the backend's memory_stats()["bytes_limit"]."""
    if configured_gib > 0:
        return int(configured_gib * GIB)
    stats = devices[0].memory_stats()
    if not stats or not stats.get("bytes_limit"):
        raise ValueError(
            f"the {devices[0].platform} backend does not report its device memory (e.g. simulated CPU "
            "devices): set --config.mesh.device_memory_gib=<GiB per device>, or give every mesh size, "
            "e.g. --config.mesh.data=1 --config.mesh.fsdp=8 --config.mesh.seq=1"
        )
    return int(stats["bytes_limit"])


def choose_mesh(
    config,
    net_config,
    devices,
    latent_chw,
    text_shape,
    batch_size: int,
    memory_bytes: int,
    request: dict | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict, dict]:
    """(mesh config, {update: `memory` dict}) of the best-ranked `candidates` mesh whose compile-only plan fits in
    `memory_bytes` per device.

    Candidates whose arguments alone exceed the memory are skipped without compiling; the student update (the
    larger one) is compiled first. When none fits, raises ValueError naming the smallest device count (and a mesh
    for it) that would fit, by scaling the smallest plan seen.
    """
    n = len(devices)
    found = _candidates_or_error(n, batch_size, net_config.num_heads, request)
    best = None  # (bytes per device, mesh) of the smallest plan seen
    for mesh_config in found:
        mesh = sharding.make_mesh(mesh_config, devices=devices)
        args = argument_bytes(config, net_config, mesh, latent_chw, text_shape, batch_size)
        if args > memory_bytes:
            log(f"mesh {format_mesh(mesh_config)}: arguments alone take {args / GIB:.2f} GiB per device")
            continue
        estimates = {}
        for name in UPDATES:
            compiled = compile_updates(config, net_config, mesh, latent_chw, text_shape, batch_size, (name,))
            estimates[name] = memory(compiled[name])
            log(
                f"mesh {format_mesh(mesh_config)}: {name} update {estimates[name]['total_bytes'] / GIB:.2f} GiB "
                "per device"
            )
            if estimates[name]["total_bytes"] > memory_bytes:
                break
        worst = max(e["total_bytes"] for e in estimates.values())
        best = min(best or (worst, mesh_config), (worst, mesh_config), key=lambda b: b[0])
        if worst <= memory_bytes:
            return mesh_config, estimates
    if best is None:  # every candidate's arguments were too large: plan the most sharded one to have a number
        mesh = sharding.make_mesh(found[-1], devices=devices)
        compiled = compile_updates(config, net_config, mesh, latent_chw, text_shape, batch_size, ("student",))
        best = (memory(compiled["student"])["total_bytes"], found[-1])
    raise ValueError(_refusal(n, batch_size, net_config.num_heads, memory_bytes, *best))


def _candidates_or_error(n: int, batch_size: int, num_heads: int, request: dict | None) -> list[dict]:
    found = candidates(n, batch_size, num_heads, request)
    if not found:
        raise ValueError(
            f"no mesh of {n} devices matches {request} and runs a global batch of {batch_size} with "
            f"{num_heads} heads: data x fsdp must divide the batch and seq the heads; set --config.data.batch_size "
            f"to a multiple of {n} or fix the mesh sizes (--config.mesh.data=...)"
        )
    return found


def _refusal(n, batch_size, num_heads, memory_bytes, best_total, best_mesh) -> str:
    """The 'nothing fits' message. Per-device memory scales about as 1 / devices (parameters, optimizer states and
    the batch's tokens are all split over them), so it names the smallest power-of-two multiple of the device
    count that brings the smallest plan under the memory, with its most sharded mesh."""
    head = (
        f"no mesh of {n} devices fits in {memory_bytes / GIB:.2f} GiB per device at global batch {batch_size} "
        f"(the smallest plan, {format_mesh(best_mesh)}, needs {best_total / GIB:.2f} GiB per device)"
    )
    for k in range(1, _MAX_DOUBLINGS + 1):
        n2 = n * 2**k
        meshes = [m for m in candidates(n2, batch_size, num_heads) if m["data"] == 1]
        if best_total * n / n2 <= memory_bytes and meshes:
            return (
                f"{head}. The smallest mesh that fits is about {n2} devices: {format_mesh(meshes[0])} "
                f"(~{best_total * n / n2 / GIB:.2f} GiB per device by scaling); or lower data.batch_size "
                "(per-device activations scale with it)."
            )
    return f"{head}, nor does any mesh up to {n * 2**_MAX_DOUBLINGS} devices at this batch: lower data.batch_size."


def _cache_key(config, net_config, devices, latent_chw, text_shape, batch_size, memory_bytes) -> str:
    fields = {
        "devices": len(devices),
        "kind": devices[0].device_kind,
        "memory": memory_bytes,
        "batch": batch_size,
        "latents": list(latent_chw),
        "text": list(text_shape),
        "net": repr(net_config),
        "config": json.loads(config.to_json_best_effort(sort_keys=True)),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def run_mesh(
    config,
    net_config,
    latent_chw,
    text_len: int,
    batch_size: int,
    workdir: str | None = None,
    devices=None,
    log: Callable[[str], None] = print,
):
    """The Mesh of a run from config.mesh: sizes all given -> `sharding.make_mesh`; some 0 -> `choose_mesh` for
    samples of `latent_chw` latents and `text_len` text tokens (cached in <workdir>/mesh_auto.json under a key of
    everything it depends on), logged with its per-device estimate. With a single possible mesh (one device, or
    sizes that leave one) there is nothing to choose: no plan, and no device memory needed."""
    devices = list(jax.devices() if devices is None else devices)
    request = sharding.mesh_request(config.mesh)
    if not sharding.is_auto(request):
        return sharding.make_mesh(request, devices=devices)
    found = _candidates_or_error(len(devices), batch_size, net_config.num_heads, request)
    if len(found) == 1:
        log(
            f"mesh auto: {format_mesh(found[0])}, the only mesh of {len(devices)} device(s) for a global batch of "
            f"{batch_size} (no compile-only plan; `trigflow-plan` estimates its memory)"
        )
        return sharding.make_mesh(found[0], devices=devices)
    memory_bytes = device_memory_bytes(devices, float(config.mesh.device_memory_gib))
    text_shape = (int(text_len), net_config.crossattn_emb_channels)
    key = _cache_key(config, net_config, devices, latent_chw, text_shape, batch_size, memory_bytes)
    cache = epath.Path(workdir) / CACHE_FILE if workdir else None
    cached = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if cached.get("key") == key:
        mesh_config, estimates = cached["mesh"], cached["estimates"]
    else:
        mesh_config, estimates = choose_mesh(
            config, net_config, devices, latent_chw, text_shape, batch_size, memory_bytes, request
        )
        if cache is not None and jax.process_index() == 0:
            cache.write_text(json.dumps({"key": key, "mesh": mesh_config, "estimates": estimates}, indent=1))
    per_update = ", ".join(f"{name} {e['total_bytes'] / GIB:.2f} GiB" for name, e in estimates.items())
    log(
        f"mesh auto: {format_mesh(mesh_config)} on {len(devices)} devices of {memory_bytes / GIB:.4g} GiB; "
        f"compile-only plan per device: {per_update}"
    )
    return sharding.make_mesh(mesh_config, devices=devices)


TEXT_LEN = 512


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
    wan_vae.check_frame_count(frames)
    if height % 16 or width % 16:
        raise ValueError(f"video {frames}x{height}x{width}: height and width must be multiples of 16")
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

    estimates: {update: memory dict} already known for this mesh (from `choose_mesh`), else compiled.
    flops False: memory only (no "flops" entries; saves two compiles).
    """
    n = math.prod(mesh_config.values())
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh {mesh_config} needs {n} devices, only {len(devices)} exist")
    mesh = sharding.make_mesh(mesh_config, devices=devices[:n])
    text = (TEXT_LEN, net_config.crossattn_emb_channels)
    if estimates is None:
        compiled = compile_updates(config, net_config, mesh, latent_chw, text, batch_size)
        estimates = {name: memory(c) for name, c in compiled.items()}
    updates = {name: dict(estimates[name]) for name in UPDATES}
    if flops:  # 1- and 2-block unrolled variants with dense attention (no loop in the attention either)
        counted = [
            compile_updates(
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
    """`plan` of the mesh a run of `config` would pick on `devices` (choose_mesh; `request` a
    sharding.mesh_request with the sizes to choose at 0), with "memory_bytes" added."""
    devices = list(jax.devices() if devices is None else devices)
    memory_bytes = device_memory_bytes(devices, float(config.mesh.device_memory_gib))
    batch_size = int(config.data.batch_size)
    mesh_config, estimates = choose_mesh(
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
        f"{n} devices, mesh {format_mesh(result['mesh'])}, batch {result['batch']}, latents "
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
            f"mesh auto: {format_mesh(result['mesh'])} is the first mesh (by expected "
            f"throughput) that fits {result['memory_bytes'] / GIB:.2f} GiB per device",
        )
    return "\n".join(lines)


def _define_flags() -> None:
    """The CLI's absl flags, defined only when the CLI runs (the trainer imports this module for `run_mesh`, and
    its own --config flag must not collide)."""
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
            cosmos_dit.get_preset(f.net), **builder.net_options(f.config.net, attention="blockwise")
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


def run() -> None:
    """The console-script entry point (`trigflow-plan`)."""
    _define_flags()
    cli.run_absl(main)


if __name__ == "__main__":
    run()
