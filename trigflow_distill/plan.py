r"""Memory and FLOP plan of one DMD2 iteration, from abstract shapes on N simulated CPU devices.

  python -m trigflow_distill.plan --config=configs/predict25_4step.py --mesh=data:1,fsdp:8,seq:1 [--json] \
      [--frames 93 --height 704 --width 1280] [--net predict25_2b]

Compiles the jitted `student_update` and `critic_update` of `dmd2.make_update_fns` for the real network
(`networks.get_preset(--net)` with config.net dtype/remat, blockwise attention so that no L x L score matrix
appears) on abstract TrainState / teacher / batch (`jax.ShapeDtypeStruct`s with shardings: nothing is allocated)
and prints, per device, the argument, output, temporary and total bytes of `compiled.memory_analysis()`, and
the FLOPs of one iteration. These are the XLA:CPU compiler's numbers: estimates of what the TPU/GPU compilers
will do (fusion, layouts and collective buffers differ).

FLOPs: `compiled.cost_analysis()` (per device, rematerialisation included) counts a loop body once, so they come
from two extra compiles with 1 and 2 unrolled blocks and dense ("xla") attention:
flops = F(1) + (num_blocks - 1) (F(2) - F(1)). (`Lowered.cost_analysis()` of the unpartitioned program would be
cheaper, but it gave ~4x fewer FLOPs here, consistent with missing the attention that runs inside shard_map.)
The backward simulation's loop (n - 1 no-grad student calls, n ~ U{1..4}) is counted once, i.e. as n = 2;
blockwise attention recomputes scores in its backward pass, which dense attention does not.
Batch: `--batch_per_rank` samples per data-parallel rank (data x fsdp); latents (B, 16, 1 + (frames-1)//4,
height/8, width/8); text already projected, (B, 512, 1024).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from trigflow_distill import dmd2, networks, optim, sharding

GIB = 2**30
TEXT_LEN = 512
UPDATES = ("student", "critic")


def parse_mesh(text: str) -> dict[str, int]:
    """'data:1,fsdp:8,seq:1' -> {'data': 1, 'fsdp': 8, 'seq': 1} (positive sizes; no -1 fill)."""
    mesh = {}
    for part in text.split(","):
        name, _, size = part.partition(":")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh={text!r}: write axis:size pairs with positive sizes, e.g. data:1,fsdp:8,seq:1")
        mesh[name.strip()] = int(size)
    return mesh


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(16, T, H, W) latents of a video: Wan2.1 VAE, 4x time (first frame alone), 8x space."""
    if frames < 1 or (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"video {frames}x{height}x{width}: frames must be 1 + 4k and height, width multiples of 16")
    return 16, 1 + (frames - 1) // 4, height // 8, width // 8


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_updates(config, net_config, mesh, latent_chw, batch_size: int) -> dict:
    """{"student": compiled, "critic": compiled} for abstract inputs of the given shapes on `mesh`."""
    sharding.check_batch(batch_size, mesh)
    net = jax.eval_shape(functools.partial(networks.init_params, net_config), jax.random.PRNGKey(0))
    store = jnp.bfloat16 if config.teacher.dtype == "bfloat16" else jnp.float32
    net = {k: v for k, v in net.items() if k != "crossattn_proj"}  # text arrives projected
    teacher = {"net": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, store), net), "text_proj": None}
    student_tx, critic_tx = dmd2.make_optimizers(config)
    init = functools.partial(dmd2.init_state, student_tx=student_tx, critic_tx=critic_tx, seed=0)
    abstract_state = jax.eval_shape(init, teacher)
    state_sh = dmd2.state_shardings(abstract_state, student_tx, critic_tx, mesh)
    teacher_sh = sharding.param_sharding(teacher, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {"latents": jax.ShapeDtypeStruct((batch_size,) + tuple(latent_chw), jnp.float32, sharding=batch_sh),
             "text": jax.ShapeDtypeStruct((batch_size, TEXT_LEN, net_config.crossattn_emb_channels), jnp.float32,
                                          sharding=batch_sh)}
    algo = dmd2.algo_from_config(config, net_config, mesh)
    fns = dmd2.make_update_fns(algo, student_tx, critic_tx, optim.ema_gamma(config.distill.ema_rate),
                                (state_sh, teacher_sh, batch_sh, sharding.replicated(mesh)))
    args = (_abstract(abstract_state, state_sh), _abstract(teacher, teacher_sh), batch)
    return {"critic": fns[0].lower(*args).compile(), "student": fns[1].lower(*args).compile()}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def plan(config, net_config, mesh_config: dict[str, int], latent_chw, batch_per_rank: int = 1,
         devices=None) -> dict:
    """The plan dict (see --json) for `net_config` as configured by config.net, on the first prod(mesh) devices."""
    n = math.prod(mesh_config.values())
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh {mesh_config} needs {n} devices, only {len(devices)} exist")
    mesh = sharding.make_mesh(mesh_config, devices=devices[:n])
    batch_size = batch_per_rank * math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    net_config = dataclasses.replace(net_config, **dmd2.net_options(config.net, attention="blockwise"))
    compiled = compile_updates(config, net_config, mesh, latent_chw, batch_size)
    # FLOPs: 1- and 2-block unrolled variants with dense attention (no loop in the attention either).
    counted = [compile_updates(config, dataclasses.replace(net_config, num_blocks=k, scan_blocks=False,
                                                           attention="xla"), mesh, latent_chw, batch_size)
               for k in (1, 2)]
    updates = {}
    for name in UPDATES:
        mem = compiled[name].memory_analysis()
        f1, f2 = (_flops(c[name]) for c in counted)
        args, out, alias, temp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                                  int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes))
        updates[name] = {"argument_bytes": args, "output_bytes": out, "temp_bytes": temp,
                         "total_bytes": args + out - alias + temp,
                         "flops": f1 + (net_config.num_blocks - 1) * (f2 - f1)}
    return {"devices": n, "mesh": dict(mesh.shape), "updates": updates}


def format_table(result: dict, batch_size: int, latent_chw) -> str:
    """Human-readable per-device table of a plan dict."""
    n = result["devices"]
    lines = [f"{n} devices, mesh {result['mesh']}, batch {batch_size}, latents {tuple(latent_chw)} "
             "(XLA:CPU estimates; bytes and TFLOP per device, TFLOP x devices)",
             f"{'update':8} {'argument GiB':>12} {'output GiB':>11} {'temp GiB':>9} {'total GiB':>10} "
             f"{'TFLOP/dev':>10} {'TFLOP':>9}"]
    for name, u in result["updates"].items():
        lines.append(f"{name:8} {u['argument_bytes'] / GIB:12.2f} {u['output_bytes'] / GIB:11.2f} "
                     f"{u['temp_bytes'] / GIB:9.2f} {u['total_bytes'] / GIB:10.2f} {u['flops'] / 1e12:10.1f} "
                     f"{u['flops'] * n / 1e12:9.1f}")
    return "\n".join(lines)


config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/predict25_4step.py[:tiny].")
flags.DEFINE_string("mesh", "data:1,fsdp:8,seq:1", "Mesh axis sizes; their product is the simulated device count.")
flags.DEFINE_bool("json", False, "Print the plan as JSON.")
flags.DEFINE_integer("frames", 93, "Video frames (1 + 4k).")
flags.DEFINE_integer("height", 704, "Video height in pixels.")
flags.DEFINE_integer("width", 1280, "Video width in pixels.")
flags.DEFINE_integer("batch_per_rank", 1, "Samples per data-parallel rank (data x fsdp).")
flags.DEFINE_string("net", "predict25_2b", "networks preset of the architecture.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/predict25_4step.py")
    try:
        mesh_config = parse_mesh(f.mesh)
        # Before the backend starts (get_preset already asks for it): N simulated CPU devices, even beside GPUs.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", math.prod(mesh_config.values()))
        latent = latent_shape(f.frames, f.height, f.width)
        net_config = networks.get_preset(f.net)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    result = plan(f.config, net_config, mesh_config, latent, f.batch_per_rank)
    if f.json:
        print(json.dumps(result))
    else:
        batch = f.batch_per_rank * math.prod(result["mesh"].get(a, 1) for a in sharding.BATCH_AXES)
        print(format_table(result, batch, latent))


if __name__ == "__main__":
    app.run(main)
