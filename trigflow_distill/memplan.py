"""Compile-only memory plan of the DMD2 updates, and the automatic mesh (config.mesh.shape = "auto").

`compile_updates` lowers and compiles the jitted `student_update` / `critic_update` on abstract TrainState,
teacher and batch (`jax.ShapeDtypeStruct`s with shardings: nothing is allocated); `memory` reads the per-device
bytes of a compiled update. `choose_mesh` ranks the (data, fsdp, seq) meshes of the devices by expected throughput
(fewest `seq` shards first, then the most data parallelism: each costs collectives) and returns the first one
whose compile-only plan fits the per-device memory; `run_mesh` does that at the start of a run, prints the choice
and caches it in the workdir. On simulated CPU devices the numbers are the XLA:CPU compiler's: estimates of what
the TPU/GPU compilers will do (fusion, layouts and collective buffers differ).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from etils import epath

from trigflow_distill import dmd2, networks, optim, rcm, sharding

GIB = 2**30
UPDATES = ("student", "critic")
CACHE_FILE = "mesh_auto.json"
_MAX_DOUBLINGS = 12  # how far (x 4096 devices) the refusal message looks for a mesh that fits


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _lowering_inputs(config, net_config, mesh, latent_chw, text_shape, batch_size):
    """(critic_fn, student_fn, abstract args) of the jitted updates on `mesh`."""
    sharding.check_batch(batch_size, mesh)
    net = jax.eval_shape(functools.partial(networks.init_params, net_config), jax.random.PRNGKey(0))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    net = {k: v for k, v in net.items() if k != "crossattn_proj"}  # text arrives projected
    teacher = {"net": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, store), net), "text_proj": None}
    student_tx, critic_tx = dmd2.make_optimizers(config)
    algo = rcm.algo_from_config(config, net_config, mesh)  # distill.method: dmd2 or rcm, as run.setup
    init = functools.partial(
        dmd2.init_state,
        student_tx=student_tx,
        critic_tx=critic_tx,
        seed=0,
        guidance_conditioned=algo.guidance_range is not None,
    )
    abstract_state = jax.eval_shape(init, teacher)
    state_sh = dmd2.state_shardings(abstract_state, student_tx, critic_tx, mesh)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {
        "latents": jax.ShapeDtypeStruct((batch_size,) + tuple(latent_chw), jnp.float32, sharding=batch_sh),
        "text": jax.ShapeDtypeStruct((batch_size,) + tuple(text_shape), jnp.float32, sharding=batch_sh),
    }
    critic, student = dmd2.make_update_fns(
        algo,
        student_tx,
        critic_tx,
        optim.ema_gamma(config.distill.ema_rate),
        (state_sh, teacher_sh, batch_sh, sharding.replicated(mesh)),
    )
    return critic, student, (_abstract(abstract_state, state_sh), _abstract(teacher, teacher_sh), batch)


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
    networks.cosmos_dit). Sizes fixed (> 0) in `request` (a `sharding.mesh_request`) are kept. Ranked by expected
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
    found = candidates(n, batch_size, net_config.num_heads, request)
    if not found:
        raise ValueError(
            f"no mesh of {n} devices matches {request} and runs a global batch of {batch_size} with "
            f"{net_config.num_heads} heads: data x fsdp must divide the batch and seq the heads"
        )
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
    everything it depends on), logged with its per-device estimate."""
    devices = list(jax.devices() if devices is None else devices)
    request = sharding.mesh_request(config.mesh)
    if not sharding.is_auto(request):
        return sharding.make_mesh(request, devices=devices)
    memory_bytes = device_memory_bytes(devices, float(config.mesh.get("device_memory_gib", 0.0)))
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
