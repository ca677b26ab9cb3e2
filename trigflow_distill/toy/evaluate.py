"""Evaluation harness on the toy world (issue 5): teacher and student samplers side by side, with pictures.

    python -m trigflow_distill.toy.evaluate --workdir=DIR [--num_samples=1024]    # a finished training run

The time shift, guidance, TrigFlow scaling, student step counts (config.eval.student_steps) and the conditional-
frame probabilities all come from the run's config. A guidance-conditioned student (docs/algorithm.md §15) is
scored at the run's distill.guidance and, in rows marked "sweep", at each of config.eval.guidance_values beside the
35-step teacher at the same scale.

Every sampler gets the same Video2World conditioning, taken from a fixed set of held-out real clips (balanced
prompts, their text, their N conditional frames and those ground-truth frames) and the same initial noise, so the
rows differ only in the sampler. Metrics are `toy_metrics.metrics` against `toy.reference_set` (a disjoint
held-out stream); the "data" row scores the conditioning clips themselves and "floor" is `toy_metrics.real_floor`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from trigflow_distill import toy
from trigflow_distill.common import cli, errors
from trigflow_distill.core import sampling
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit
from trigflow_distill.toy import metrics as toy_metrics
from trigflow_distill.toy import plot
from trigflow_distill.training import restore

COND_SEED = 2_000_003  # sample_videos stream of the conditioning clips (+ seed); reference / floor use others
# Teacher samplers at the student's cost and above (issue 16): (steps, guided?). NFE = steps, x2 when guided.
TEACHER_ROWS = ((2, "guided"), (4, None), (4, "guided"), (8, "guided"), (16, "guided"), (35, "guided"), (35, None))
STUDENT_NAMES = ("student_ema", "student")
METRIC_KEYS = (
    "prompt_accuracy",
    "motion_accuracy",
    "amplitude_ratio",
    "diversity",
    "fd_hand",
    "fd_proj",
    "cond_consistency",
)


def conditioning_set(world: toy.World, n: int, seed: int = 0) -> dict:
    """n held-out real clips with balanced prompts (k = i mod K): sample_videos' dict, stream COND_SEED + seed."""
    prompts = np.arange(n, dtype=np.int64) % world.config.num_prompts
    return toy.sample_videos(world, COND_SEED + seed, n, prompts=prompts)


def _sample_fn(net_config, settings: sampling.SamplerSettings, scaling: str):
    """fn(params, eps, context, uncond_context, gt, mask) -> x0 (B,C,T,H,W): `video2world.sample`, the sampling path
    of training samples and `generate` (a guidance-conditioned student takes settings.guidance as input, §15)."""

    def fn(params, eps, context, uncond_context, gt, mask):
        return video2world.sample(settings, net_config, params, context, uncond_context, gt, mask, eps, scaling=scaling)

    return fn


def _generate(fn, params, inputs: dict, batch_size: int) -> tuple[np.ndarray, float]:
    """Runs `fn` over the (padded) inputs in batches; returns (samples (n,...), seconds per generated sample).

    The function is compiled ahead of time (lower + compile) so the timing excludes compilation.
    """
    n = len(inputs["eps"])
    bs = min(batch_size, n)
    num_batches = -(-n // bs)
    pad = num_batches * bs - n
    arrays = [
        np.concatenate([a, a[:pad]]) if pad else a
        for a in (inputs["eps"], inputs["context"], inputs["uncond_context"], inputs["gt"], inputs["mask"])
    ]
    compiled = jax.jit(fn).lower(params, *(a[:bs] for a in arrays)).compile()
    out = []
    start = time.perf_counter()
    for i in range(num_batches):
        out.append(compiled(params, *(a[i * bs : (i + 1) * bs] for a in arrays)))
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / (num_batches * bs)
    return np.concatenate([np.asarray(x) for x in out])[:n], seconds


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _clean(tree):
    """JSON-ready copy: NaN / inf floats -> None (null), numpy scalars -> Python."""
    if isinstance(tree, dict):
        return {k: _clean(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clean(v) for v in tree]
    if isinstance(tree, np.generic):
        tree = tree.item()
    return _finite_or_none(tree)


def _label(name: str, steps: int, guidance) -> str:
    if name == "data":
        return "data"
    return f"{name}{steps}" + ("" if guidance is None else f"_cfg{guidance:g}")


def format_table(result: dict) -> str:
    """The eval.json content as a fixed-width text table (one row per sampler, then the real-data floor)."""
    head = (
        f"{'sampler':<16}{'steps':>6}{'cfg':>5}{'nfe':>5}{'ms/sample':>11}{'prompt':>8}{'motion':>8}"
        f"{'amp':>7}{'div':>7}{'fd_hand':>9}{'fd_proj':>9}{'cond':>7}"
    )

    def num(v, width, fmt):
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"

    def metric_cols(m):
        return (
            num(m["prompt_accuracy"], 8, ".3f")
            + num(m["motion_accuracy"], 8, ".3f")
            + num(m["amplitude_ratio"], 7, ".3f")
            + num(m["diversity"], 7, ".3f")
            + num(m["fd_hand"], 9, ".3f")
            + num(m["fd_proj"], 9, ".3f")
            + num(m["cond_consistency"], 7, ".3f")
        )

    lines = [head, "-" * len(head)]
    for r in result["samplers"]:
        ms = None if r["seconds_per_sample"] is None else 1e3 * r["seconds_per_sample"]
        lines.append(
            f"{r['name']:<16}{r['steps']:>6}"
            + num(r["guidance"], 5, "g")
            + f"{r['nfe']:>5}"
            + num(ms, 11, ".3f")
            + metric_cols(r["metrics"])
        )
    lines.append(f"{'floor (real)':<16}{'':>6}{'':>5}{'':>5}{'':>11}" + metric_cols(result["floor"]))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The eval.json content as the README's markdown table (one row per sampler, then the real-data floor)."""
    names = {"teacher": "teacher", "student_ema": "student (EMA)", "student": "student (raw)", "data": "real data"}
    keys = (
        "prompt_accuracy",
        "motion_accuracy",
        "amplitude_ratio",
        "diversity",
        "fd_hand",
        "fd_proj",
        "cond_consistency",
    )
    fmt = (".3f", ".3f", ".3f", ".3f", ".2f", ".2f", ".3f")
    head = (
        "| sampler | steps | cfg | NFE | prompt acc | motion acc | amplitude | diversity | fd_hand | fd_proj | "
        "cond. consistency |"
    )

    def cols(m):
        return " | ".join("–" if m[k] is None else f"{m[k]:{f}}" for k, f in zip(keys, fmt))

    lines = [head, "|" + "---|" * 11]
    for r in result["samplers"]:
        data = r["name"] == "data"
        cfg = "–" if r["guidance"] is None else f"{r['guidance']:g}"
        steps, nfe = ("–", "–") if data else (r["steps"], r["nfe"])
        lines.append(f"| {names.get(r['name'], r['name'])} | {steps} | {cfg} | {nfe} | {cols(r['metrics'])} |")
    lines.append(f"| real-vs-real floor | | | | {cols(result['floor'])} |")
    return "\n".join(lines)


def evaluate(
    world: toy.World,
    net_config,
    teacher,
    samplers_params: dict,
    out_dir: str,
    num_samples: int = 1024,
    seed: int = 0,
    batch_size: int = 256,
    guidance: float = 4.0,
    scaling: str = "rectified_flow",
    sigma_data: float = 1.0,
    time_shift: float = 5.0,
    student_steps=(1, 2, 4),
    train_steps: int = 4,
    guidance_values=(),
    log=print,
) -> dict:
    """Samples and scores the teacher (TEACHER_ROWS: guided 2, 4, 8, 16, 35 steps and unguided 4, 35, so that
    some rows cost what the student costs), the given students (each of `student_steps`, on the first steps of
    their `train_steps` schedule) and the held-out data; `time_shift` shifts the teacher grid and the student
    schedules (docs/algorithm.md §3); writes out_dir/eval.json, quality_vs_nfe.png (the FDs against network
    evaluations), samples_student4.npz and a PNG grid + GIF per sampler.

    teacher: the teacher value {"net", "text_proj"} (`builder.load_teacher`): every sampler gets the clips' text
    through its frozen projection. samplers_params: a subset of {"student_ema": params, "student": params}.
    samples_student4.npz (latents, prompt) holds the 4-step samples of "student_ema" if given, else of
    "student" (not written without a student). Returns the eval.json content (NaN as None).

    A guidance-conditioned student (params with a guidance embedder, docs/algorithm.md §15) samples at `guidance`
    in its main rows; for each other scale of `guidance_values` the 35-step teacher and the student's 4-step sampler
    add a row at that scale (marked "sweep": true, left out of the plot).
    """
    unknown = set(samplers_params) - set(STUDENT_NAMES)
    if unknown:
        raise ValueError(f"samplers_params has unknown keys {sorted(unknown)}; use a subset of {STUDENT_NAMES}.")
    if teacher.get("text_proj") is None:
        raise ValueError("the teacher has no text projection: the toy world's text is raw (its tiny DiT projects it).")
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"evaluate needs num_samples >= 2 and batch_size >= 1, got {num_samples}, {batch_size}.")
    out = epath.Path(out_dir)  # local or remote (gs://)
    out.mkdir(parents=True, exist_ok=True)

    reference = toy.reference_set(world, num_samples)
    cond = conditioning_set(world, num_samples, seed)
    prompts, num_cond, gt = cond["prompt"], cond["num_cond_frames"], cond["latents"]
    mask = np.asarray(video2world.cond_mask(jnp.asarray(num_cond), gt.shape))
    eps = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), gt.shape, jnp.float32))
    context = np.asarray(jax.jit(cosmos_dit.project_text)(teacher["text_proj"], cond["text"]))
    uncond_context = np.asarray(cosmos_dit.unconditional_context(teacher["text_proj"], context.shape))
    inputs = dict(eps=eps, context=context, uncond_context=uncond_context, gt=gt, mask=mask)

    rows, samples_student4, student4_from = [], None, None

    def add_row(name, steps, g, nfe, seconds, latents, sweep=False):
        m = toy_metrics.metrics(world, latents, prompts, reference=reference, cond_latents=gt, num_cond_frames=num_cond)
        row = {
            "name": name,
            "steps": steps,
            "guidance": g,
            "nfe": nfe,
            "seconds_per_sample": seconds,
            "metrics": {k: m[k] for k in METRIC_KEYS},
            **({"sweep": True} if sweep else {}),
        }
        rows.append(row)
        label = _label(name, steps, g)
        toy.save_grid_png(world, latents, prompts, out / f"{label}.png")
        toy.save_gif(world, latents, prompts, out / f"{label}.gif")
        ms = "" if seconds is None else f"  {1e3 * seconds:.3f} ms/sample"
        log(
            f"eval {label:<18} prompt {m['prompt_accuracy']:.3f}  motion {m['motion_accuracy']:.3f}  "
            f"fd_hand {m['fd_hand']:.3f}  fd_proj {m['fd_proj']:.3f}{ms}"
        )

    def teacher_settings(steps, g):
        return sampling.SamplerSettings("teacher", steps, g, shift=time_shift, sigma_data=sigma_data)

    def student_settings(steps, g):
        return sampling.SamplerSettings("student", steps, g, time_shift, sigma_data, train_steps)

    conditioned = any(cosmos_dit.GUIDANCE_EMBEDDER in p for p in samplers_params.values())
    sweep = [float(g) for g in guidance_values if float(g) != float(guidance)] if conditioned else []
    students = [name for name in STUDENT_NAMES if name in samplers_params]
    per_student = [
        len(student_steps) + len(sweep) * (cosmos_dit.GUIDANCE_EMBEDDER in samplers_params[n]) for n in students
    ]
    num_rows = len(TEACHER_ROWS) + len(sweep) + sum(per_student)
    done = 0

    def progress(name, steps, g):
        # each sampler compiles and samples num_samples clips: minutes on a CPU, so say which one runs
        nonlocal done
        done += 1
        log(f"{cli.stamp()} evaluating sampler {done}/{num_rows}: {_label(name, steps, g)} ...")

    for steps, kind in TEACHER_ROWS:
        settings = teacher_settings(steps, float(guidance) if kind == "guided" else None)
        progress("teacher", steps, settings.guidance)
        latents, seconds = _generate(_sample_fn(net_config, settings, scaling), teacher["net"], inputs, batch_size)
        add_row("teacher", steps, settings.guidance, settings.nfe, seconds, latents)
    for g in sweep:  # the teacher's reference at every other scale the conditioned student is scored at
        settings = teacher_settings(35, g)
        progress("teacher", 35, g)
        latents, seconds = _generate(_sample_fn(net_config, settings, scaling), teacher["net"], inputs, batch_size)
        add_row("teacher", 35, g, settings.nfe, seconds, latents, sweep=True)
    for name in students:
        params = samplers_params[name]
        g = float(guidance) if cosmos_dit.GUIDANCE_EMBEDDER in params else None
        for steps in student_steps:
            progress(name, steps, g)
            fn = _sample_fn(net_config, student_settings(steps, g), scaling)
            latents, seconds = _generate(fn, params, inputs, batch_size)
            add_row(name, steps, g, steps, seconds, latents)
            if steps == 4 and samples_student4 is None:
                samples_student4, student4_from = latents, name
        for s in sweep if g is not None else []:
            progress(name, train_steps, s)
            fn = _sample_fn(net_config, student_settings(train_steps, s), scaling)
            latents, seconds = _generate(fn, params, inputs, batch_size)
            add_row(name, train_steps, s, train_steps, seconds, latents, sweep=True)
    add_row("data", 0, None, 0, None, gt)

    floor = toy_metrics.real_floor(world, num_samples, reference=reference)
    result = _clean({"samplers": rows, "floor": {k: floor[k] for k in METRIC_KEYS}})
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    plot.plot_quality_vs_nfe(result, out / "quality_vs_nfe.png")
    if samples_student4 is not None:
        with (out / "samples_student4.npz").open("wb") as f:
            np.savez(f, latents=samples_student4.astype(np.float32), prompt=prompts.astype(np.int32))
        log(f"samples_student4.npz: 4-step samples of {student4_from!r}")
    log(format_table(result))
    return result


def evaluate_run(workdir: str, num_samples: int | None = None, batch_size: int = 256, log=print) -> dict:
    """`evaluate` on the latest checkpoint of the training run in `workdir` (output goes there too), every setting
    from the run's config; num_samples None: config.eval.num_samples."""
    if not epath.Path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir {workdir} does not exist; pass the directory of a training run.")
    config, net_config, teacher, student_params, ema_params = restore.load_run(workdir)
    students = {k: v for k, v in (("student_ema", ema_params), ("student", student_params)) if v is not None}
    num_samples = num_samples if num_samples is not None else int(config.eval.num_samples)
    return evaluate(
        world_from_config(config),
        net_config,
        teacher,
        students,
        workdir,
        num_samples=num_samples,
        seed=int(config.seed),
        batch_size=batch_size,
        guidance=float(config.distill.guidance),
        scaling=config.teacher.scaling,
        sigma_data=float(config.teacher.sigma_data),
        time_shift=float(config.distill.timestep_shift),
        student_steps=tuple(int(n) for n in config.eval.student_steps),
        train_steps=int(config.distill.num_student_steps),
        guidance_values=tuple(float(g) for g in config.eval.guidance_values),
        log=log,
    )


def world_from_config(config) -> toy.World:
    """The toy world of a run: its conditional-frame probabilities are config.distill.cond_frame_probs."""
    return toy.make_world(toy.WorldConfig(cond_frame_probs=tuple(float(p) for p in config.distill.cond_frame_probs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-toy-evaluate",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a finished training run's directory (output goes there)")
    parser.add_argument("--num_samples", type=int, default=None, help="default: the run's config.eval.num_samples")
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        evaluate_run(args.workdir, args.num_samples, args.batch_size)
    except errors.CLI_ERRORS as e:
        return errors.fail(e)
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
