"""Sampling speed: the 4-step student against the teacher's 35-step guided sampler (JAX, tiny Cosmos DiT).

    python benchmarks/sampling_speed.py --json /tmp/sampling.json

Student: dmd2.student_samples (4 network calls, no CFG). Teacher: sampling.sample_teacher_cfg, 35 Euler steps
with guidance 4, i.e. 70 network calls (the NFE limit of the speed-up is 70 / 4 = 17.5x), in two forms:
"separate" (the cond and uncond denoisers called one after the other on B samples each) and "batched" (one call on
2B samples whose halves are combined by CFG). Same random weights for both nets (speed does not depend on them),
Video2World conditioning (0, 1, 2 GT frames in turn), everything jitted; each call is timed to
block_until_ready, wall-clock medians after one warm-up call (compilation), the samplers called in turn per round.
The headline speed-up divides the faster teacher form by the student.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.core import losses, sampling  # noqa: E402
from trigflow_distill.methods import dmd2, video2world  # noqa: E402
from trigflow_distill.models import cosmos_dit  # noqa: E402
from trigflow_distill.training import builder

from step_speed import PRESETS, load_average, make_batch, timed  # noqa: E402

TEACHER_STEPS, GUIDANCE = 35, 4.0


def teacher_samples(algo, params, batch, key, batched: bool):
    """35-step CFG teacher samples (B,16,T,H,W) for the conditioning of `batch`: `video2world.sample` (separate
    conditional and unconditional calls), or the same x0 builder with both halves in one batched call."""
    cfg = algo.net_config
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    gt = batch["latents"]
    mask = video2world.cond_mask(batch["num_cond_frames"], gt.shape)
    context = cosmos_dit.project_text(params["crossattn_proj"], batch["text"])
    uncond = cosmos_dit.unconditional_context(params["crossattn_proj"], context.shape)
    eps = jax.random.normal(key, gt.shape, jnp.float32)
    settings = sampling.SamplerSettings(
        "teacher", TEACHER_STEPS, GUIDANCE, shift=algo.timestep_shift, sigma_data=algo.sigma_data
    )
    if not batched:
        return video2world.sample(settings, cfg, net, context, uncond, gt, mask, eps, scaling=algo.scaling)
    two = lambda a: jnp.concatenate([a, a])  # noqa: E731
    both = video2world.make_x0_fn(
        cfg, jnp.concatenate([context, uncond]), two(gt), two(mask), scaling=algo.scaling, sigma_data=algo.sigma_data
    )

    def guided(x, tau_b):
        x0_c, x0_u = jnp.split(both(net, two(x), two(tau_b)), 2)
        return losses.cfg_x0(x0_c, x0_u, GUIDANCE)

    unguided = dataclasses.replace(settings, guidance=None)  # one (already guided) call per step
    x0 = sampling.sample(unguided, guided, None, eps)
    return mask * gt + (1.0 - mask) * x0


def run(args) -> dict:
    overrides, latent, _ = PRESETS[args.preset]
    net_config = cosmos_dit.get_preset("tiny", **overrides)
    algo = dmd2.Algo(net_config=net_config)
    params = cosmos_dit.init_params(net_config, jax.random.PRNGKey(0))
    teacher = builder.split_teacher(params)
    result = {
        "preset": args.preset,
        "latent": latent,
        "attention": net_config.attention,
        "teacher_steps": TEACHER_STEPS,
        "guidance": GUIDANCE,
        "student_steps": algo.num_student_steps,
        "repeats": args.repeats,
        "load_average_start": load_average(),
        "batches": [],
    }
    print(
        f"# sampling speed: preset {args.preset}, latent {'x'.join(map(str, latent))}, attention "
        f"{net_config.attention}; load average {result['load_average_start']}",
        flush=True,
    )
    student = jax.jit(functools.partial(dmd2.student_samples, algo))
    teachers = {
        name: jax.jit(functools.partial(teacher_samples, algo, batched=b))
        for name, b in (("teacher_separate", False), ("teacher_batched", True))
    }
    key = jax.random.PRNGKey(1)
    for batch_size in [int(b) for b in args.batches.split(",")]:
        batch = jax.tree.map(jnp.asarray, make_batch(batch_size, latent, net_config.crossattn_proj_in_channels))
        calls = {
            "student": lambda: student(teacher["net"], teacher, batch, key).block_until_ready(),
            **{
                name: functools.partial(lambda f: f(params, batch, key).block_until_ready(), f)
                for name, f in teachers.items()
            },
        }
        first = {}
        for name, call in calls.items():
            first[name] = timed(call, 1)[0]
            if not np.isfinite(np.asarray(call())).all():
                raise FloatingPointError(f"{name} produced non-finite samples at batch {batch_size}")
        times = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                times[name] += timed(call, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min(("teacher_separate", "teacher_batched"), key=med.get)
        row = {
            "batch": batch_size,
            "median_s": med,
            "first_call_s": first,
            "faster_teacher": best,
            "speedup": med[best] / med["student"],
            "speedup_by_teacher": {k: med[k] / med["student"] for k in teachers},
        }
        result["batches"].append(row)
        print(
            f"batch {batch_size}: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
            + f"; speed-up {row['speedup']:.1f}x ({best})",
            flush=True,
        )
    result["load_average_end"] = load_average()
    return result


def markdown(result) -> str:
    lines = [
        "| batch | student 4 NFE, ms | teacher 70 NFE separate, ms | teacher 70 NFE batched 2B, ms "
        "| speed-up (vs faster teacher) | NFE limit |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["batches"]:
        m = row["median_s"]
        lines.append(
            f"| {row['batch']} | {m['student'] * 1e3:.1f} | {m['teacher_separate'] * 1e3:.1f} | "
            f"{m['teacher_batched'] * 1e3:.1f} | {row['speedup']:.1f}x ({row['faster_teacher']}) | "
            f"{2 * TEACHER_STEPS / result['student_steps']:.1f}x |"
        )
    lines.append("")
    lines.append(
        f"Wall-clock medians of {result['repeats']} calls after warm-up. Load average start "
        f"{result['load_average_start']}, end {result['load_average_end']}."
    )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batches", default="1,64", help="comma list of batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per sampler and batch (median)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    result = run(args)
    print(markdown(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
