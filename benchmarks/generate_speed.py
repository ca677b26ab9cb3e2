"""Generation speed end to end: text encoding, sampling and VAE decoding timed separately for the 4-step student
(4 NFE) and the teacher (35 Euler steps with CFG = 70 NFE), on the same prompts, in one run.

    python benchmarks/generate_speed.py --json /tmp/generate_speed.json            # tiny random nets on the CPU
    python benchmarks/generate_speed.py --student S.pt --teacher T.pt --vae SRC --text-encoder SRC \\
        --size 1280x704 --num-frames 93 --dtype bfloat16                             # real nets on an accelerator
    python benchmarks/generate_speed.py --flops --size 1280x704 --num-frames 93     # release-size FLOPs, no weights

Every stage is the code `trigflow-generate` runs: `generate._context` (Reason1 embedding and the
frozen text projection), `generate._sample_jit` (`video2world.sample`: the student's k-step or the
teacher's CFG sampler), `wan_vae.decode`. Each is called once to compile (reported as first_call_s), then
`--repeats` times, student and teacher sampling in turn each round; the table has wall-clock medians per batch of
`--prompts` videos, block_until_ready. Without checkpoints the nets are random: the tiny DiT preset, a tiny
Qwen2 text encoder (2 x 48 features, what the tiny DiT's projection takes) and a Wan2.1 VAE of width --vae-dim
(speed does not depend on the weights). Text-to-video (no conditional frames).

--flops counts instead of timing (nothing is allocated or run): XLA's cost analysis of one evaluation of the 2B DiT
(blocks unrolled, dense attention) and of the release Wan2.1 VAE decoder, lowered on abstract shapes; XLA counts a
`lax.scan` body once, so the decoder's total is first frame + (T_lat - 1) x (cost at T_lat=2 - cost at T_lat=1).
The Reason1-7B embedding is counted analytically (2 x non-embedding params x tokens + attention, plus the
projection 100352 -> 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from trigflow_distill.common import sharding
from trigflow_distill.core import sampling
from trigflow_distill.inference import generate, loader
from trigflow_distill.models import cosmos_dit, reason1, wan_vae
from trigflow_distill.models.reason1 import qwen2

PROMPTS = [
    "A robot arm picks up a red cube and places it on a blue plate.",
    "A car drives along a coastal road at sunset, waves breaking on the rocks.",
    "Close-up of hands kneading dough on a wooden table.",
    "A drone flies over a forest in autumn.",
]


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _tiny_models(args, tmp: str):
    net_config = cosmos_dit.get_preset("tiny", dtype=args.dtype, attention=args.attention)
    params = jax.tree.map(np.asarray, cosmos_dit.init_params(net_config, jax.random.key(0)))
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    model = loader.Model(net_config, net, params["crossattn_proj"], dict(loader.PREDICT25), "tiny random")
    te = os.path.join(tmp, "text_encoder")
    reason1.write_tiny(te, num_layers=2, hidden_size=48, words=" ".join(PROMPTS).replace(".", "").split())
    vae_cfg = wan_vae.WanVAEConfig(dim=args.vae_dim)
    return model, model, te, (vae_cfg, wan_vae.init_params(vae_cfg, jax.random.key(1)))


def _models(args, tmp: str):
    if not (args.student or args.teacher):
        return _tiny_models(args, tmp)
    if not (args.student and args.teacher and args.vae and args.text_encoder):
        raise SystemExit("give all of --student, --teacher, --vae and --text-encoder, or none (tiny random nets)")
    options = dict(dtype=args.dtype, attention=args.attention, remat=False)
    return (
        loader.load_checkpoint(args.student, **options),
        loader.load_checkpoint(args.teacher, **options),
        args.text_encoder,
        wan_vae.load(args.vae),
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def run(args) -> dict:
    width, height = (int(v) for v in args.size.split("x"))
    prompts = (PROMPTS * args.prompts)[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, te_src, (vae_cfg, vae_params) = _models(args, tmp)
        mesh = sharding.make_mesh({"data": -1}, jax.local_devices()[:1])
        te_cfg, te_params = reason1.load(te_src, args.text_encoder_dtype)
        ids = reason1.tokenize(reason1.load_tokenizer(te_src), prompts)
    t_lat = 1 + (args.num_frames - 1) // vae_cfg.time_factor
    shape = (
        len(prompts),
        student.net_config.in_channels,
        t_lat,
        height // vae_cfg.space_factor,
        width // vae_cfg.space_factor,
    )
    eps = jnp.stack([generate.initial_noise(0, i, shape[1:]) for i in range(len(prompts))])
    gt = jnp.zeros((1, *shape[1:]))
    mask = jnp.zeros((1, 1, *shape[2:]))
    padding = jnp.zeros((1, 1, height, width))
    samplers = {
        "student": sampling.SamplerSettings("student", 4),
        "teacher": sampling.SamplerSettings("teacher", args.teacher_steps, guidance=4.0),
    }
    models = {"student": student, "teacher": teacher}
    device = {k: jax.device_put(m.params, sharding.replicated(mesh)) for k, m in models.items()}
    # The text projection is frozen, so student and teacher share the context (the same text encoding).
    context = {}
    latents = {}
    uncond = cosmos_dit.unconditional_context(student.text_proj, (1, 1, student.net_config.crossattn_emb_channels))

    def text():
        context["both"] = generate._context(te_cfg, te_params, ids, student.text_proj)
        return context["both"]

    def sample(name):
        latents[name] = generate._sample_jit(
            samplers[name],
            models[name].net_config,
            device[name],
            context["both"],
            uncond,
            gt,
            mask,
            eps,
            scaling="rectified_flow",
            padding_mask_b1hw=padding,
        )
        return latents[name]

    def decode():
        return wan_vae.decode(vae_cfg, vae_params, latents["student"])

    calls = {
        "text_encoding": text,
        "student_sampling": lambda: sample("student"),
        "teacher_sampling": lambda: sample("teacher"),
        "decoding": decode,
    }
    result = {
        "prompts": len(prompts),
        "size": [width, height],
        "num_frames": args.num_frames,
        "latent_shape": list(shape[1:]),
        "student_nfe": samplers["student"].nfe,
        "teacher_nfe": samplers["teacher"].nfe,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "nets": "checkpoints" if args.student else f"tiny random (DiT tiny, VAE dim {args.vae_dim})",
        "device": str(jax.devices()[0].device_kind),
        "load_average_start": load_average(),
    }
    print(
        f"# generate speed: {len(prompts)} prompts, {width}x{height}, {args.num_frames} frames (latent "
        f"{'x'.join(map(str, shape[1:]))}), {result['nets']}; load average {result['load_average_start']}",
        flush=True,
    )
    result["first_call_s"] = {name: _timed(call) for name, call in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            times[name].append(_timed(call))
    med = {name: statistics.median(v) for name, v in times.items()}
    result["median_batch_s"] = med
    text_s = med["text_encoding"]
    result["end_to_end_batch_s"] = {
        "student": text_s + med["student_sampling"] + med["decoding"],
        "teacher": text_s + med["teacher_sampling"] + med["decoding"],
    }
    result["speedup_end_to_end"] = result["end_to_end_batch_s"]["teacher"] / result["end_to_end_batch_s"]["student"]
    result["speedup_sampling"] = med["teacher_sampling"] / med["student_sampling"]
    result["load_average_end"] = load_average()
    return result


def markdown(r) -> str:
    m, e = r["median_batch_s"], r["end_to_end_batch_s"]
    n = r["prompts"]

    def row(name, nfe, text_s, sample_s):
        total = text_s + sample_s + m["decoding"]
        return (
            f"| {name} | {nfe} | {text_s / n:.3f} ({100 * text_s / total:.0f}%) | {sample_s / n:.3f} "
            f"({100 * sample_s / total:.0f}%) | {m['decoding'] / n:.3f} ({100 * m['decoding'] / total:.0f}%) "
            f"| {total / n:.3f} |"
        )

    return "\n".join(
        [
            "| model | NFE | text encoding s/video | sampling s/video | VAE decoding s/video | end to end s/video |",
            "|---|---|---|---|---|---|",
            row("student (4 steps)", r["student_nfe"], m["text_encoding"], m["student_sampling"]),
            row(
                f"teacher ({r['teacher_nfe'] // 2} steps, CFG)",
                r["teacher_nfe"],
                m["text_encoding"],
                m["teacher_sampling"],
            ),
            "",
            f"Speed-up: sampling {r['speedup_sampling']:.1f}x, end to end {r['speedup_end_to_end']:.1f}x "
            f"(teacher {e['teacher'] / n:.3f} s vs student {e['student'] / n:.3f} s per video). {r['nets']}, "
            f"{r['size'][0]}x{r['size'][1]}, {r['num_frames']} frames, batch {n}, {r['device']}; medians of "
            f"{r['repeats']} after a compiling call; load average {r['load_average_start']} -> "
            f"{r['load_average_end']}.",
        ]
    )


def flops(args) -> dict:
    """Per-video FLOPs of each stage at release size (see the module doc)."""
    width, height = (int(v) for v in args.size.split("x"))
    t_lat = 1 + (args.num_frames - 1) // 4
    cfg = cosmos_dit.get_preset("predict25_2b", dtype="bfloat16", attention="xla", scan_blocks=False)
    shapes = cosmos_dit.param_shapes(cfg)
    proj_in, ctx = shapes.pop("crossattn_proj")["kernel"]
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    lat = (1, 16, t_lat, height // 8, width // 8)
    dit = (
        jax.jit(lambda p, x, t, c: cosmos_dit.velocity(cfg, p, x, t, c))
        .lower(
            abstract,
            jax.ShapeDtypeStruct(lat, jnp.float32),
            jax.ShapeDtypeStruct((1, t_lat), jnp.float32),
            jax.ShapeDtypeStruct((1, reason1.MAX_LENGTH, ctx), jnp.float32),
        )
        .cost_analysis()["flops"]
    )
    vcfg = wan_vae.WanVAEConfig()
    vparams = wan_vae.from_torch(
        {k: np.broadcast_to(np.float32(0), s) for k, s in wan_vae.param_shapes(vcfg).items()}, vcfg
    )
    vparams = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), vparams)

    def decode_flops(frames):
        z = jax.ShapeDtypeStruct((1, frames, height // 8, width // 8, 16), jnp.float32)
        return (
            jax.jit(lambda p, z: wan_vae.decode_pixels(vcfg, p, z, dtype=jnp.bfloat16))
            .lower(vparams, z)
            .cost_analysis()["flops"]
        )

    first, two = decode_flops(1), decode_flops(2)
    decode = first + (t_lat - 1) * (two - first)
    te = qwen2.REASON1_7B
    te_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(qwen2.param_shapes(te)))
    tokens = reason1.MAX_LENGTH
    text = (
        2 * (te_params - te.vocab_size * te.hidden_size) * tokens
        + 4 * tokens**2 * te.hidden_size * te.num_layers
        + 2 * tokens * proj_in * ctx
    )
    stages = {
        "text_encoding": text,
        "dit_evaluation": dit,
        "student_sampling": 4 * dit,
        "teacher_sampling": 2 * args.teacher_steps * dit,
        "decoding": decode,
    }
    student = text + 4 * dit + decode
    teacher = text + 2 * args.teacher_steps * dit + decode
    return {
        "size": [width, height],
        "num_frames": args.num_frames,
        "latent_shape": list(lat[1:]),
        "tokens": t_lat * (height // 16) * (width // 16),
        "tflop": {k: v / 1e12 for k, v in stages.items()},
        "end_to_end_tflop": {"student": student / 1e12, "teacher": teacher / 1e12},
        "teacher_steps": args.teacher_steps,
        "flop_ratio_end_to_end": teacher / student,
        "flop_ratio_sampling": 2 * args.teacher_steps / 4,
    }


def flops_markdown(r) -> str:
    f, e = r["tflop"], r["end_to_end_tflop"]

    def row(name, nfe, sample):
        total = f["text_encoding"] + sample + f["decoding"]
        return (
            f"| {name} | {nfe} | {f['text_encoding']:.1f} ({100 * f['text_encoding'] / total:.2f}%) | "
            f"{sample:,.0f} ({100 * sample / total:.1f}%) | {f['decoding']:,.0f} "
            f"({100 * f['decoding'] / total:.1f}%) | {total:,.0f} |"
        )

    return "\n".join(
        [
            "| model | NFE | text encoding TFLOP | sampling TFLOP | VAE decoding TFLOP | end to end TFLOP |",
            "|---|---|---|---|---|---|",
            row("student (4 steps)", 4, f["student_sampling"]),
            row(f"teacher ({r['teacher_steps']} steps, CFG)", 2 * r["teacher_steps"], f["teacher_sampling"]),
            "",
            f"{r['size'][0]}x{r['size'][1]}, {r['num_frames']} frames ({r['tokens']} DiT tokens), batch 1; one 2B DiT "
            f"evaluation {f['dit_evaluation']:,.0f} TFLOP. FLOP ratio teacher / student: sampling "
            f"{r['flop_ratio_sampling']:.1f}x, end to end {r['flop_ratio_end_to_end']:.1f}x "
            f"({e['teacher']:,.0f} vs {e['student']:,.0f} TFLOP).",
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=2, help="videos per batch (default 2)")
    p.add_argument("--size", default="320x192", help="WxH frame size (default 320x192, the 256 16:9 bucket)")
    p.add_argument("--num-frames", type=int, default=29, help="1 + 4k frames (default 29)")
    p.add_argument("--teacher-steps", type=int, default=35)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per stage (median)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="DiT compute dtype")
    p.add_argument("--text-encoder-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="auto")
    p.add_argument("--vae-dim", type=int, default=8, help="width of the random VAE (release: 96)")
    p.add_argument("--student", help="student .pt (with --teacher, --vae, --text-encoder: real nets)")
    p.add_argument("--teacher", help="teacher .pt")
    p.add_argument("--vae", help="Wan2.1 VAE source")
    p.add_argument("--text-encoder", help="Reason1 text encoder folder")
    p.add_argument("--flops", action="store_true", help="count release-size FLOPs instead of timing (no weights)")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.prompts < 1 or (args.num_frames - 1) % 4:
        p.error("--repeats and --prompts must be >= 1, --num-frames 1 + 4k")
    result = flops(args) if args.flops else run(args)
    print((flops_markdown if args.flops else markdown)(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
