"""Step speed: the DMD2 critic and student updates in JAX against the same updates in PyTorch, in one process.

    python benchmarks/step_speed.py --preset tiny  --json /tmp/step_tiny.json
    python benchmarks/step_speed.py --preset small --json /tmp/step_small.json

JAX: trigflow_distill.methods.dmd2.critic_update / student_update, jitted by dmd2.make_update_fns (state donated).
PyTorch: benchmarks/torch_dmd2.py (the same algorithm on diffusers' CosmosTransformer3DModel holding the same
weights), eager and torch.compile (reported "n/a" if compiling fails). Same Cosmos DiT config, batch, latent shape
and Video2World conditioning for all. The backward-simulation length n is fixed per timed row: JAX draws n from
fold_in(state.key, state.step), so each row runs at a step whose draw is n (checked on the returned metrics).

Each row: warm-up calls (compilation), then `--steps` rounds that call every implementation once in turn, so a
change of machine load hits all of them alike; medians are reported. Model FLOPs of one network call come from
XLA's cost analysis (forward, and forward+backward w.r.t. the params) of the JAX network: critic update =
n fwd + 1 fwd/bwd, student update = (n + 2) fwd + 1 fwd/bwd (the same count is used for PyTorch; diffusers does
some extra work of its own, e.g. the AdaLN modulation per token instead of per frame). The fraction of the
machine's large-matmul rate divides that by a jitted 2048^3 float32 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time

# Before torch loads OpenMP: with the default (spinning) wait policy, torch's two OpenMP threads slow down 10-50x
# whenever the cores are shared (measured here at load 12: a tiny forward 0.26-2.7 s vs 0.03-0.05 s passive), and
# spinning threads would also steal the cores from the JAX calls that alternate with them. OMP_WAIT_POLICY=ACTIVE
# restores the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trigflow_distill.core import optim, sampling  # noqa: E402
from trigflow_distill.methods import (
    dmd2,  # noqa: E402
    train_state,
)
from trigflow_distill.models import cosmos_dit  # noqa: E402
from trigflow_distill.training import builder

import torch_dmd2  # noqa: E402

# name -> (overrides of the "tiny" DiT preset, default latent shape C x T x H x W, default batch)
PRESETS = {
    "tiny": ({}, (16, 4, 8, 8), 32),
    "small": (
        dict(model_channels=256, num_blocks=4, num_heads=4, mlp_ratio=4.0, adaln_lora_dim=64),
        (16, 8, 16, 16),
        8,
    ),
}
TEXT_LEN = 8
LR, B1, WARMUP = 1e-4, 0.0, 10  # the :tiny training config's optimizer


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of a jitted size^3 float32 matmul in JAX (and of torch.mm for reference), medians."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    mm(a, a).block_until_ready()
    t_jax = statistics.median(timed(lambda: mm(a, a).block_until_ready(), repeats))
    ta = torch.randn(size, size)
    torch.mm(ta, ta)
    t_torch = statistics.median(timed(lambda: torch.mm(ta, ta), repeats))
    flops = 2.0 * size**3
    return {"size": size, "jax_flops_per_s": flops / t_jax, "torch_flops_per_s": flops / t_torch}


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def network_flops(net_config, net_params, x, timesteps, context, mask) -> dict:
    """XLA-counted FLOPs of one network call (fwd) and of its gradient w.r.t. the params (fwd+bwd).

    Every block output is requested so the block scan is split into length-1 pieces: cost analysis counts a
    scan body once, whatever its length.
    """
    blocks = tuple(range(net_config.num_blocks))

    def fwd(p):
        return cosmos_dit.velocity(net_config, p, x, timesteps, context, mask, return_block_outputs=blocks)[0]

    def loss(p):
        return jnp.sum(fwd(p) ** 2)

    return {
        "fwd": _cost_flops(jax.jit(fwd).lower(net_params).compile()),
        "fwd_bwd": _cost_flops(jax.jit(jax.grad(loss)).lower(net_params).compile()),
    }


def steps_drawing(key, max_steps: int) -> dict[int, int]:
    """{n: the first step whose draw in dmd2.py's update is n} (keys: split(fold_in(key, step), 4)[1])."""
    found = {}
    for step in range(10_000):
        k_n = jax.random.split(jax.random.fold_in(key, step), 4)[1]
        found.setdefault(int(sampling.draw_num_steps(k_n, max_steps)), step)
        if len(found) == max_steps:
            return found
    raise RuntimeError("no step draws every n")


def make_batch(batch: int, latent, text_in: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((batch, *latent)).astype(np.float32),
        "text": rng.standard_normal((batch, TEXT_LEN, text_in)).astype(np.float32),
        "num_cond_frames": (np.arange(batch) % 3).astype(np.int32),
    }  # 0, 1 and 2 conditional frames


class JaxRunner:
    """Jitted dmd2.py updates with n pinned through the step counter."""

    def __init__(self, net_config, params, batch):
        self.algo = dmd2.Algo(net_config=net_config)
        tx = optim.make_optimizer(LR, b1=B1, warmup=WARMUP)
        self.teacher = builder.split_teacher(params)
        init = functools.partial(train_state.init_state, student_tx=tx, critic_tx=tx, seed=0)
        self.state = jax.jit(init)(self.teacher)
        self.fns = dict(zip(("critic", "student"), dmd2.make_update_fns(self.algo, tx, tx, optim.ema_gamma(0.1))))
        self.batch = jax.tree.map(jnp.asarray, batch)
        self.step_for_n = steps_drawing(self.state.key, self.algo.num_student_steps)

    def __call__(self, update: str, n: int):
        state = self.state.replace(step=jnp.asarray(self.step_for_n[n], jnp.int32))
        self.state, metrics = self.fns[update](state, self.teacher, self.batch)
        jax.block_until_ready((self.state, metrics))
        got = int(metrics[f"{update}/sim_steps"])
        if got != n:
            raise RuntimeError(
                f"dmd2.{update}_update drew n={got}, expected {n}: its key layout changed; update steps_drawing()"
            )


class TorchRunner:
    def __init__(self, net_config, params, batch, compile: bool):
        self.dmd = torch_dmd2.DMD2(
            net_config, params, torch_dmd2.Hparams(lr=LR, betas=(B1, 0.999), warmup=WARMUP), compile=compile
        )
        self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}

    def __call__(self, update: str, n: int):
        b = self.batch
        cond = torch_dmd2.make_cond(b["latents"], b["text"], b["num_cond_frames"].long(), self.dmd.text_proj)
        getattr(self.dmd, f"{update}_update")(cond, n)


def mean_over_n(ts: dict[int, float], max_steps: int) -> float:
    """Expected time under n ~ U{1..max_steps}: exact if every n was timed, else from a line fitted over n (>= 2)."""
    ns = sorted(ts)
    if ns == list(range(1, max_steps + 1)):
        return float(np.mean([ts[n] for n in ns]))
    slope, icept = np.polyfit(ns, [ts[n] for n in ns], 1)
    return float(icept + slope * (max_steps + 1) / 2)


def update_flops(update: str, n: int, f: dict) -> float:
    return n * f["fwd"] + f["fwd_bwd"] if update == "critic" else (n + 2) * f["fwd"] + f["fwd_bwd"]


def run(args) -> dict:
    overrides, default_latent, default_batch = PRESETS[args.preset]
    if args.attention:
        overrides = {**overrides, "attention": args.attention}
    net_config = cosmos_dit.get_preset("tiny", **overrides)
    latent = tuple(int(v) for v in args.latent.split("x")) if args.latent else default_latent
    batch_size = args.batch or default_batch
    sim_steps = [int(v) for v in args.sim_steps.split(",")]
    versions = {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version()}
    result = {
        "preset": args.preset,
        "net_config": dataclasses.asdict(net_config),
        "latent": latent,
        "batch": batch_size,
        "text_len": TEXT_LEN,
        "sim_steps": sim_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "versions": versions,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_average(),
    }
    print(
        f"# step speed: preset {args.preset} (D={net_config.model_channels}, {net_config.num_blocks} blocks, "
        f"{net_config.num_heads} heads, attention={net_config.attention}), batch {batch_size}, latent "
        f"{'x'.join(map(str, latent))}; load average {result['load_average_start']}",
        flush=True,
    )

    params = cosmos_dit.init_params(net_config, jax.random.PRNGKey(0))
    batch = make_batch(batch_size, latent, net_config.crossattn_proj_in_channels)
    result["matmul"] = matmul_rate()
    peak = result["matmul"]["jax_flops_per_s"]
    print(
        f"matmul 2048^3 f32: jax {peak / 1e9:.1f} GFLOP/s, torch "
        f"{result['matmul']['torch_flops_per_s'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )

    runners = {
        "jax": JaxRunner(net_config, params, batch),
        "torch_eager": TorchRunner(net_config, params, batch, compile=False),
    }
    if not args.no_compile:
        runners["torch_compile"] = TorchRunner(net_config, params, batch, compile=True)
    teacher = runners["jax"].teacher
    b = jax.tree.map(jnp.asarray, batch)
    mask = jnp.broadcast_to(
        (jnp.arange(latent[1]) < b["num_cond_frames"][:, None]).astype(jnp.float32)[:, None, :, None, None],
        (batch_size, 1, *latent[1:]),
    )
    context = cosmos_dit.project_text(params["crossattn_proj"], b["text"])
    flops = network_flops(
        net_config, teacher["net"], b["latents"], jnp.full((batch_size, latent[1]), 0.5), context, mask
    )
    result["network_flops"] = flops
    print(
        f"network call at batch {batch_size}: fwd {flops['fwd'] / 1e9:.2f} GFLOP, fwd+bwd "
        f"{flops['fwd_bwd'] / 1e9:.2f} GFLOP",
        flush=True,
    )

    rows, failed, first_call = [], {}, {}
    for update in ("critic", "student"):
        for n in sim_steps:
            active = [name for name in runners if name not in failed]
            for name in active:
                try:
                    first_call.setdefault(name, []).append(timed(lambda: runners[name](update, n), 1)[0])
                    timed(lambda: runners[name](update, n), args.warmup - 1)
                except Exception as e:  # noqa: BLE001 - torch.compile may fail in many ways; report, go on
                    if name != "torch_compile":
                        raise
                    failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"torch.compile failed, reported n/a: {failed[name]}", flush=True)
            active = [name for name in runners if name not in failed]
            times = {name: [] for name in active}
            for _ in range(args.steps):
                for name in active:
                    times[name] += timed(lambda: runners[name](update, n), 1)
            row = {
                "update": update,
                "n": n,
                "flops": update_flops(update, n, flops),
                "median_s": {k: statistics.median(v) for k, v in times.items()},
                "min_s": {k: min(v) for k, v in times.items()},
            }
            rows.append(row)
            print(
                f"{update} n={n}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["median_s"].items()), flush=True
            )
    result.update(
        rows=rows,
        torch_compile_error=failed.get("torch_compile"),
        first_call_s={k: v[0] for k, v in first_call.items()},
        load_average_end=load_average(),
    )
    result["summary"] = summarize(rows, list(runners), failed, flops, net_config, peak)
    return result


def summarize(rows, impls, failed, flops, net_config, peak) -> list[dict]:
    """Per update: every timed n, the mean over n ~ U{1..4}, and a training iteration (4 critic : 1 student)."""
    max_steps = dmd2.Algo(net_config=net_config).num_student_steps
    out, means = [], {}
    for update in ("critic", "student"):
        mine = [r for r in rows if r["update"] == update]
        out += [dict(label=f"{update} n={r['n']}", flops=r["flops"], s=r["median_s"]) for r in mine]
        if len(mine) < 2:
            continue
        s = {k: mean_over_n({r["n"]: r["median_s"][k] for r in mine}, max_steps) for k in impls if k not in failed}
        f = mean_over_n({r["n"]: r["flops"] for r in mine}, max_steps)
        means[update] = dict(label=f"{update} mean n~U{{1..{max_steps}}}", flops=f, s=s)
        out.append(means[update])
    if means:
        crit, stud = means["critic"], means["student"]
        out.append(
            dict(
                label="iteration (4 critic : 1 student)",
                flops=(4 * crit["flops"] + stud["flops"]) / 5,
                s={k: (4 * crit["s"][k] + stud["s"][k]) / 5 for k in crit["s"]},
            )
        )
    for row in out:
        row["matmul_fraction"] = {k: row["flops"] / v / peak for k, v in row["s"].items()}
        row["jax_speed_over"] = {k: v / row["s"]["jax"] for k, v in row["s"].items() if k != "jax"}
    return out


def markdown(result) -> str:
    impls = ["jax", "torch_eager", "torch_compile"]
    head = (
        "| update | GFLOP | JAX ms | eager ms | compile ms | JAX speed / eager | JAX speed / compile "
        "| JAX % mm | eager % mm | compile % mm |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(row, k):
        return f"{row['s'][k] * 1e3:.1f}" if k in row["s"] else "n/a"

    def ratio(row, k):
        return f"{row['jax_speed_over'][k]:.2f}x" if k in row["jax_speed_over"] else "n/a"

    def frac(row, k):
        return f"{100 * row['matmul_fraction'][k]:.0f}%" if k in row["matmul_fraction"] else "n/a"

    for row in result["summary"]:
        lines.append(
            f"| {row['label']} | {row['flops'] / 1e9:.2f} | "
            + " | ".join(ms(row, k) for k in impls)
            + f" | {ratio(row, 'torch_eager')} | {ratio(row, 'torch_compile')} | "
            + " | ".join(frac(row, k) for k in impls)
            + " |"
        )
    mm = result["matmul"]
    lines.append("")
    lines.append(
        f"JAX speed / X = X's time / JAX's time (> 1: JAX faster). % mm = model FLOPs / time / the "
        f"2048^3 f32 matmul rate measured in this run ({mm['jax_flops_per_s'] / 1e9:.1f} GFLOP/s in JAX, "
        f"{mm['torch_flops_per_s'] / 1e9:.1f} in torch). First call (compile) s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["first_call_s"].items())
        + f". Load average start {result['load_average_start']}, end {result['load_average_end']} "
        f"on {result['cpus']} CPUs."
    )
    if result["torch_compile_error"]:
        lines.append(f"torch.compile: n/a ({result['torch_compile_error']})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--latent", default="", help="C x T x H x W, e.g. 16x8x16x16 (default: per preset)")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: per preset)")
    p.add_argument("--sim-steps", default="1,4", help="backward-simulation lengths n to time (comma list)")
    p.add_argument("--steps", type=int, default=10, help="timed calls per implementation and row (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1: compilation)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--attention", default="", help="override the DiT attention impl (cosmos_dit.attention)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    result = run(args)
    print(markdown(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
