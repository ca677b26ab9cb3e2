"""generate CLI with tiny random nets: mp4s for text, image and video conditioning, kept conditional frames, parity
of the student and teacher paths with sampling.sample_student / sample_teacher_cfg / sample_teacher_unipc (NVIDIA's
reference sampler), crop vs pad preprocessing, the --workdir path and its replace_gt_timesteps, errors."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from trigflow_distill.common import video
from trigflow_distill.core import sampling
from trigflow_distill.inference import generate, inputs
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit, reason1, torchfile, wan_vae
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import restore

NET = cosmos_dit.get_preset("tiny")  # text projection 96 -> 64: the tiny encoder below gives 2 x 48 features
VAE_CFG = wan_vae.WanVAEConfig(dim=8, z_dim=16)
SIZE = (64, 32)  # --size 64x32: latents 8 x 4
FRAMES = 9  # 3 latent frames


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    student = jax.tree.map(np.asarray, cosmos_dit.init_params(NET, jax.random.key(0)))
    teacher = jax.tree.map(np.asarray, cosmos_dit.init_params(NET, jax.random.key(1)))
    convert.export_torch(student, NET, d / "student.pt", dtype=np.float32)
    convert.export_torch(teacher, NET, d / "teacher.pt", dtype=np.float32)
    # A guidance-conditioned student (§15) with a non-zero guidance projection, so that the scale matters.
    student_gc = cosmos_dit.add_guidance_embedder(student)
    d_model = NET.model_channels
    kernel = np.asarray(jax.random.normal(jax.random.key(3), (d_model, d_model))) / np.sqrt(d_model)
    student_gc[cosmos_dit.GUIDANCE_EMBEDDER] = {"linear": {"kernel": kernel}}
    gc_net = dataclasses.replace(NET, guidance_embedder=True)
    convert.export_torch(student_gc, gc_net, d / "student_gc.pt", dtype=np.float32)
    reason1.write_tiny(d / "te", num_layers=2, hidden_size=48, words=["a", "red", "car", "blue", "boat"])
    vae_params = wan_vae.init_params(VAE_CFG, jax.random.key(2))
    torchfile.save(d / "wan_vae.pth", wan_vae.to_torch(vae_params, VAE_CFG))
    rng = np.random.default_rng(0)
    # 48x30 frames: nearest aspect to 64x32 after a fit-inside resize is 51x32, so the padding mask is not empty
    clip = np.clip(rng.normal(128, 60, (7, 30, 48, 3)).cumsum(0) / 3, 0, 255).astype(np.uint8)
    Image.fromarray(clip[0]).save(d / "first.png")
    video.write_mp4(d / "clip.mp4", clip, 8)
    return {"dir": d, "student": student, "student_gc": student_gc, "teacher": teacher, "vae_params": vae_params}


def _run(assets, out, *extra, model=("--student", "student.pt")):
    """generate.main with the tiny assets; `model` is (flag, file in the assets folder or any other value)."""
    d = assets["dir"]
    source = d / model[1] if (d / model[1]).exists() else model[1]
    argv = [
        model[0],
        str(source),
        "--vae",
        str(d / "wan_vae.pth"),
        "--text-encoder",
        str(d / "te"),
        "--size",
        f"{SIZE[0]}x{SIZE[1]}",
        "--num-frames",
        str(FRAMES),
        "--dtype",
        "float32",
        "--text-encoder-dtype",
        "float32",
        "--save-latents",
        "--out",
        str(out),
        *extra,
    ]
    assert generate.main(argv) == 0
    return json.loads((out / "generate.json").read_text())


def _latents(out, report, i):
    with np.load(out / report["videos"][i]["file"].replace(".mp4", ".npz")) as z:
        return z["latents"]


def _context(assets, prompts, params):
    """Projected context computed here: tokenizer -> Reason1 embedding -> the checkpoint's crossattn_proj."""
    te_cfg, te_params = reason1.load(assets["dir"] / "te", "float32")
    emb = reason1.embed(te_cfg, te_params, reason1.tokenize(assets["dir"] / "te", prompts))
    return cosmos_dit.project_text(params["crossattn_proj"], emb)


def _reference(
    assets,
    params,
    prompts,
    seed,
    gt,
    mask,
    padding,
    teacher_steps=None,
    guidance=4.0,
    replace_gt=True,
    negative_prompt=None,
    steps=4,
):
    """Latents from the samplers of sampling.py, every call through video2world.denoise (docs/algorithm.md §3, §7); a
    guidance-conditioned student (§15) gets `guidance` as its input. With `negative_prompt` the teacher is NVIDIA's
    reference sampler (UniPC) with that prompt's context as the unconditional one, else Euler with zero text."""
    context = _context(assets, prompts, params)
    if negative_prompt is None:
        uncond = cosmos_dit.project_text(params["crossattn_proj"], jnp.zeros((len(prompts), 512, 96)))
    else:
        uncond = jnp.broadcast_to(_context(assets, [negative_prompt], params), context.shape)
    net = {k: v for k, v in params.items() if k != "crossattn_proj"}
    eps = jnp.stack([generate.initial_noise(seed, i, gt.shape[1:]) for i in range(len(prompts))])
    solver = "euler" if negative_prompt is None else "unipc"
    return _sample(teacher_steps, guidance, solver, replace_gt, steps, net, context, uncond, gt, mask, padding, eps)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sample(teacher_steps, guidance, solver, replace_gt, steps, net, context, uncond, gt, mask, padding, eps):
    b = eps.shape[0]
    gt, mask = jnp.broadcast_to(gt, (b, *gt.shape[1:])), jnp.broadcast_to(mask, (b, *mask.shape[1:]))

    conditioned = teacher_steps is None and cosmos_dit.GUIDANCE_EMBEDDER in net
    guidance_b = jnp.full((b,), guidance) if conditioned else None

    def x0_fn(ctx):
        return lambda x, tau: video2world.denoise(
            NET,
            net,
            x,
            tau,
            ctx,
            gt,
            mask,
            padding_mask_b1hw=padding,
            guidance_b=guidance_b,
            replace_gt_timesteps=replace_gt,
        )

    if teacher_steps is None:
        x = sampling.sample_student(x0_fn(context), eps, sampling.student_schedule(steps))
    elif solver == "unipc":
        x = sampling.sample_teacher_unipc(x0_fn(context), x0_fn(uncond), eps, guidance, teacher_steps)
    else:
        x = sampling.sample_teacher_cfg(x0_fn(context), x0_fn(uncond), eps, guidance, teacher_steps)
    return mask * gt + (1 - mask) * x


def _luma_error(a_thw3, b_thw3):
    """Mean absolute luma difference (0-255): H.264 yuv420p keeps luma well, subsamples colour."""
    weights = np.array([0.299, 0.587, 0.114])
    return float(np.abs(a_thw3.astype(float) @ weights - b_thw3.astype(float) @ weights).mean())


def _no_cond():
    t, h, w = 1 + (FRAMES - 1) // 4, SIZE[1] // 8, SIZE[0] // 8
    zeros = np.zeros((1, 1, SIZE[1], SIZE[0]), np.float32)
    return np.zeros((1, 16, t, h, w), np.float32), np.zeros((1, 1, t, h, w), np.float32), zeros


def _encoded(assets, frames, preprocess="pad"):
    """(gt, mask, padding, latents) of conditioning frames, prepared here as docs/algorithm.md §12 says (pad) or as
    NVIDIA's inference CLI does (crop)."""
    pixels, padding = (video.resize_and_crop if preprocess == "crop" else video.resize_and_pad)(frames, SIZE)
    latents = np.asarray(wan_vae.encode(VAE_CFG, assets["vae_params"], pixels[None]))
    gt, mask, _ = _no_cond()
    n = latents.shape[2]
    gt[:, :, :n], mask[:, :, :n] = latents, 1.0
    return gt, mask, padding[None], latents


def test_text_only_videos_match_sample_student(assets, tmp_path):
    prompts = ["a red car", "a blue boat"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"caption": p}) for p in prompts) + "\n\n")
    report = _run(assets, tmp_path, "--prompts", str(tmp_path / "p.jsonl"), "--seed", "3")
    assert report["nfe"] == 4 and report["settings"]["devices"] == 2 and report["seconds_per_video"] > 0
    for i, v in enumerate(report["videos"]):
        frames, fps = video.read_video(tmp_path / v["file"])
        assert v["prompt"] == prompts[i] and frames.shape == (FRAMES, SIZE[1], SIZE[0], 3) and fps == 16
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (4 * SIZE[0], 2 * (SIZE[1] + 14))

    want = _reference(assets, assets["student"], prompts, 3, *_no_cond())
    got = np.stack([_latents(tmp_path, report, i) for i in range(2)])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    assert np.abs(got[0] - got[1]).mean() > 0.1  # the prompts and noises differ


def test_image_conditioning_keeps_the_frame_and_matches_sample_student(assets, tmp_path):
    """A .pt student crops its conditioning image by default, as NVIDIA's inference CLI (no padding mask)."""
    report = _run(assets, tmp_path, "--prompt", "a red car", "--image", str(assets["dir"] / "first.png"))
    image = np.asarray(Image.open(assets["dir"] / "first.png"))[None]
    gt, mask, padding, latents = _encoded(assets, image, "crop")
    assert not padding.any() and report["settings"]["cond_latent_frames"] == 1
    assert report["settings"]["preprocess"] == "crop" and report["sampler"]["replace_gt_timesteps"] is True
    got = _latents(tmp_path, report, 0)
    np.testing.assert_array_equal(got[:, :1], latents[0])  # Video2World keeps the conditional latent frame
    np.testing.assert_allclose(
        got, _reference(assets, assets["student"], ["a red car"], 0, gt, mask, padding)[0], atol=2e-4, rtol=2e-4
    )
    # The decoder is causal: decoding the input latent alone or followed by zeros gives the same first frame.
    decoded_in = np.asarray(wan_vae.decode(VAE_CFG, assets["vae_params"], gt))[:, :, :1]
    decoded_out = np.asarray(wan_vae.decode(VAE_CFG, assets["vae_params"], got[None]))
    np.testing.assert_allclose(decoded_out[:, :, :1], decoded_in, atol=1e-5)
    frames, _ = video.read_video(tmp_path / report["videos"][0]["file"])
    assert frames.shape == (FRAMES, SIZE[1], SIZE[0], 3)
    assert _luma_error(frames[:1], video.to_uint8(decoded_in[0])) < 4


def test_video_conditioning_keeps_two_latent_frames(assets, tmp_path):
    report = _run(
        assets,
        tmp_path,
        "--prompt",
        "a boat",
        "--video",
        str(assets["dir"] / "clip.mp4"),
        "--cond-frames",
        "2",
        "--preprocess",
        "pad",
    )
    clip, _ = video.read_video(assets["dir"] / "clip.mp4")
    gt, _, _, latents = _encoded(assets, clip[-5:])  # the last 1 + 4 frames are 2 latent frames
    assert report["settings"]["preprocess"] == "pad"
    got = _latents(tmp_path, report, 0)
    np.testing.assert_array_equal(got[:, :2], latents[0])
    decoded_in = np.asarray(wan_vae.decode(VAE_CFG, assets["vae_params"], gt))[:, :, :5]
    decoded_out = np.asarray(wan_vae.decode(VAE_CFG, assets["vae_params"], got[None]))
    np.testing.assert_allclose(decoded_out[:, :, :5], decoded_in, atol=1e-5)
    frames, _ = video.read_video(tmp_path / report["videos"][0]["file"])
    assert frames.shape == (FRAMES, SIZE[1], SIZE[0], 3)
    assert _luma_error(frames[:5], video.to_uint8(decoded_in[0])) < 4


def test_teacher_matches_sample_teacher_cfg(assets, tmp_path):
    report = _run(
        assets,
        tmp_path,
        "--prompt",
        "a red car",
        "--teacher-steps",
        "2",
        "--guidance",
        "3",
        model=("--teacher", "teacher.pt"),
    )
    assert report["nfe"] == 4 and report["model"]["kind"] == "teacher"
    assert report["sampler"]["name"] == "dmd2-target" and report["sampler"]["solver"] == "euler"
    assert report["sampler"]["negative_prompt"] is None and report["sampler"]["unconditional_context"] == "zero text"
    want = _reference(assets, assets["teacher"], ["a red car"], 0, *_no_cond(), teacher_steps=2, guidance=3.0)
    np.testing.assert_allclose(_latents(tmp_path, report, 0), want[0], atol=2e-4, rtol=2e-4)


def test_workdir_uses_the_ema_student_and_the_run_settings(assets, tmp_path, monkeypatch):
    _fake_run(monkeypatch, assets)  # a run config from before distill.replace_gt_timesteps: on, as then
    calls = []
    fake = restore.load_student

    def load_student(workdir, which="ema", **net_overrides):
        calls.append((workdir, which))
        return fake(workdir, which, **net_overrides)

    monkeypatch.setattr(restore, "load_student", load_student)
    report = _run(assets, tmp_path / "w", "--prompt", "a red car", "--steps", "2", model=("--workdir", "RUN"))
    student = _run(assets, tmp_path / "s", "--prompt", "a red car", "--steps", "2")
    assert calls == [("RUN", "ema")] and report["nfe"] == 2  # only the EMA is restored
    np.testing.assert_array_equal(_latents(tmp_path / "w", report, 0), _latents(tmp_path / "s", student, 0))


@pytest.mark.slow
def test_teacher_reference_sampler_is_nvidias_inference(assets, tmp_path):
    """--teacher-sampler reference: UniPC at the net's quantized times, s = 8 (NVIDIA's guidance 7) against NVIDIA's
    negative prompt, the image cropped (no padding mask), conditional frames fed the step's time (no GT timestep)."""
    image_args = ("--image", str(assets["dir"] / "first.png"))
    report = _run(
        assets,
        tmp_path,
        "--prompt",
        "a red car",
        *image_args,
        "--teacher-steps",
        "3",
        "--teacher-sampler",
        "reference",
        model=("--teacher", "teacher.pt"),
    )
    sampler = report["sampler"]
    assert sampler["name"] == "reference" and sampler["solver"] == "unipc" and sampler["guidance"] == 8.0
    assert sampler["negative_prompt"] == generate.DEFAULT_NEGATIVE_PROMPT and sampler["replace_gt_timesteps"] is False
    assert report["nfe"] == 6 and report["settings"]["preprocess"] == "crop"
    assert generate.DEFAULT_NEGATIVE_PROMPT.startswith("The video captures a series of frames showing ugly scenes")
    image = np.asarray(Image.open(assets["dir"] / "first.png"))[None]
    cond = _encoded(assets, image, "crop")[:3]
    ref = functools.partial(_reference, assets, assets["teacher"], ["a red car"], 0, *cond, teacher_steps=3)
    got = _latents(tmp_path, report, 0)
    want = ref(guidance=8.0, replace_gt=False, negative_prompt=generate.DEFAULT_NEGATIVE_PROMPT)[0]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    # Each ingredient matters: GT timesteps, the zero-text unconditional context, the Euler sampler all differ.
    for other in (
        ref(guidance=8.0, replace_gt=True, negative_prompt=generate.DEFAULT_NEGATIVE_PROMPT),
        ref(guidance=8.0, replace_gt=False, negative_prompt="a blue boat"),
        ref(guidance=8.0, replace_gt=False),
    ):
        assert np.abs(np.asarray(other[0]) - got).max() > 1e-3


def _fake_run(monkeypatch, assets, **distill):
    """restore.load_student returning the tiny student under a run config with `distill` settings."""
    import ml_collections

    config = ml_collections.ConfigDict(
        {
            "teacher": {"scaling": "rectified_flow", "sigma_data": 1.0},
            "distill": {"timestep_shift": 5.0, "num_student_steps": 4, "guidance": 4.0, **distill},
        }
    )

    def load_student(workdir, which="ema", **net_overrides):
        params = dict(assets["student"])
        return (
            config,
            dataclasses.replace(NET, **net_overrides),
            {"net": params, "text_proj": params.pop("crossattn_proj")},
        )

    monkeypatch.setattr(restore, "load_student", load_student)


def test_workdir_student_without_gt_timesteps_is_sampled_without_them(assets, tmp_path, monkeypatch):
    """A run trained with distill.replace_gt_timesteps=False is sampled so: its conditional frames see the step's
    time, and its conditioning image is preprocessed as its training data (pad, with the padding mask)."""
    _fake_run(monkeypatch, assets, replace_gt_timesteps=False)
    image_args = ("--image", str(assets["dir"] / "first.png"))
    report = _run(assets, tmp_path, "--prompt", "a red car", *image_args, "--steps", "2", model=("--workdir", "RUN"))
    assert report["sampler"]["replace_gt_timesteps"] is False and report["settings"]["preprocess"] == "pad"
    image = np.asarray(Image.open(assets["dir"] / "first.png"))[None]
    gt, mask, padding, _ = _encoded(assets, image, "pad")
    assert padding.any()
    got = _latents(tmp_path, report, 0)
    ref = functools.partial(_reference, assets, assets["student"], ["a red car"], 0, gt, mask, padding, steps=2)
    np.testing.assert_allclose(got, ref(replace_gt=False)[0], atol=2e-4, rtol=2e-4)
    assert np.abs(np.asarray(ref(replace_gt=True)[0]) - got).max() > 1e-3  # what it was sampled with before


def test_crop_and_pad_preprocessing():
    """crop: NVIDIA's resize-to-cover + torchvision centre crop (round half to even), zero mask; pad: fit inside +
    reflection pad with the mask on the padding; --preprocess crop keeps the model's 16:9 size for any input."""
    rows = np.repeat(np.repeat((np.arange(35, dtype=np.uint8) * 7)[None, :, None, None], 32, 2), 3, 3)  # (1,35,32,3)
    pixels, mask = video.resize_and_crop(rows, (32, 32))  # no resize (r = 1); crop top = round(3 / 2) = 2
    assert pixels.shape == (3, 1, 32, 32) and mask.shape == (1, 32, 32) and not mask.any()
    np.testing.assert_allclose((pixels[0, 0, :, 0] + 1) * 127.5, np.arange(2, 34) * 7, atol=1e-4)
    top = video.resize_and_crop(rows[:, :33], (32, 32))[0]  # round(1 / 2) = 0: the top rows are kept
    np.testing.assert_allclose((top[0, 0, :, 0] + 1) * 127.5, np.arange(0, 32) * 7, atol=1e-4)
    # A wide frame (20 x 80) into 32 x 32: scaled by 1.6 to 32 x 128, the centre 32 columns kept: the black / white
    # edge in the middle of the frame lands in the middle of the crop.
    halves = np.zeros((2, 20, 80, 3), np.uint8)
    halves[:, :, 40:] = 255
    crop, crop_mask = video.resize_and_crop(halves, (32, 32))
    assert crop.shape == (3, 2, 32, 32) and not crop_mask.any()
    assert (crop[:, :, :, :15] < -0.99).all() and (crop[:, :, :, 17:] > 0.99).all()
    padded, pad_mask = video.resize_and_pad(halves, (32, 32))  # fit inside: 8 x 32 in the middle, 12 rows each side
    assert padded.shape == (3, 2, 32, 32) and pad_mask[0, :12].all() and not pad_mask[0, 12:20].any()
    assert pad_mask[0, 20:].all()

    class Args:
        size, aspect, resolution = None, None, "256"

    portrait = np.zeros((1, 320, 180, 3), np.uint8)
    for preprocess, want in (("crop", (320, 192)), ("pad", (192, 320))):
        Args.preprocess = preprocess
        assert inputs.choose_bucket(Args, portrait) == want


def test_guidance_conditioned_student_samples_at_the_given_scale(assets, tmp_path):
    runs = {
        g: _run(
            assets,
            tmp_path / str(g),
            "--prompt",
            "a red car",
            "--guidance",
            str(g),
            model=("--student", "student_gc.pt"),
        )
        for g in (2.0, 6.0)
    }
    got = {g: _latents(tmp_path / str(g), r, 0) for g, r in runs.items()}
    for g, report in runs.items():
        assert report["nfe"] == 4 and report["settings"]["guidance"] == g
        want = _reference(assets, assets["student_gc"], ["a red car"], 0, *_no_cond(), guidance=g)
        np.testing.assert_allclose(got[g], want[0], atol=2e-4, rtol=2e-4)
    assert np.abs(got[2.0] - got[6.0]).mean() > 1e-2  # the scale reaches the network


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_model", "student.pt: no such file"),
        ("bad_image", "--image .*cannot read the image"),
        ("frames", "--num-frames 6: the Wan2.1 VAE needs 1 \\+ 4k frames \\(nearest: 5 or 9\\)"),
        ("empty_prompts", "--prompts .*no prompts"),
        ("steps", "--steps 5: the student takes 1 to 4 steps"),
        ("guidance", "--guidance 2: this student was distilled at one CFG scale"),
        ("teacher_sampler", "--teacher-sampler is for --teacher"),
        ("negative_prompt", "--negative-prompt is the unconditional prompt of --teacher-sampler reference"),
    ],
)
def test_bad_input_is_one_line_error(assets, tmp_path, capsys, case, match):
    d = assets["dir"]
    argv = [
        "--student",
        str(d / "student.pt"),
        "--vae",
        str(d / "wan_vae.pth"),
        "--text-encoder",
        str(d / "te"),
        "--prompt",
        "a car",
        "--out",
        str(tmp_path / "out"),
        "--size",
        "64x32",
        "--num-frames",
        "5",
    ]
    if case == "missing_model":
        argv[1] = str(tmp_path / "student.pt")
    elif case == "bad_image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        argv += ["--image", str(tmp_path / "bad.png")]
    elif case == "frames":
        argv += ["--num-frames", "6"]
    elif case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n  \n")
        argv = [a for a in argv if a not in ("--prompt", "a car")] + ["--prompts", str(tmp_path / "p.txt")]
    elif case == "guidance":
        argv += ["--guidance", "2"]
    elif case == "teacher_sampler":
        argv += ["--teacher-sampler", "reference"]
    elif case == "negative_prompt":
        argv += ["--negative-prompt", "ugly"]
    else:
        argv += ["--steps", "5"]
    assert generate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(match, err[-1]), err
    assert not (tmp_path / "out" / "generate.json").exists()


def test_python_pipeline_generates_what_the_cli_writes(assets, tmp_path):
    """`from trigflow_distill.inference import Pipeline`: the API the CLI is built on gives the CLI's videos for the
    same seed, for text and image conditioning, and its own checks raise one-line errors."""
    from trigflow_distill.inference import Pipeline

    d = assets["dir"]
    image = str(d / "first.png")
    report = _run(assets, tmp_path, "--prompt", "a red car", "--prompt", "a blue boat", "--image", image, "--seed", "5")
    pipe = Pipeline.load(
        student=str(d / "student.pt"),
        vae=str(d / "wan_vae.pth"),
        text_encoder=str(d / "te"),
        dtype="float32",
        text_encoder_dtype="float32",
    )
    options = dict(image=image, seed=5, size=SIZE, num_frames=FRAMES)
    latents = pipe.generate(["a red car", "a blue boat"], output="latent", **options)
    frames = pipe.generate(["a red car", "a blue boat"], **options)
    assert latents.shape == (2, 16, 3, SIZE[1] // 8, SIZE[0] // 8) and frames.dtype == np.uint8
    assert frames.shape == (2, FRAMES, SIZE[1], SIZE[0], 3)
    for i in range(2):
        np.testing.assert_array_equal(latents[i], _latents(tmp_path, report, i))
        decoded = np.asarray(wan_vae.decode(VAE_CFG, assets["vae_params"], latents[i : i + 1]))[0]
        np.testing.assert_array_equal(frames[i], video.to_uint8(decoded))
        written, _ = video.read_video(tmp_path / report["videos"][i]["file"])
        assert _luma_error(written, frames[i]) < 4  # the mp4 is that video, lossy-coded
    # One prompt, one image array, a batch of one: the same first video (the noise depends on the index only).
    one = pipe.generate("a red car", image=np.asarray(Image.open(image)), seed=5, size=SIZE, num_frames=FRAMES)
    np.testing.assert_array_equal(one[0], frames[0])
    with pytest.raises(ValueError, match="--steps 5: the student takes 1 to 4 steps"):
        pipe.generate("a red car", steps=5, size=SIZE, num_frames=FRAMES)
    with pytest.raises(ValueError, match="give exactly one of student=, workdir=, teacher="):
        Pipeline.load(student=str(d / "student.pt"), teacher=str(d / "teacher.pt"))


def test_an_out_with_another_runs_outputs_needs_overwrite(assets, tmp_path, capsys):
    """generate.json describes exactly the videos beside it: a second run into the same --out is refused (before the
    model is loaded) unless --overwrite, which removes the first run's files; other files in --out stay."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = _run(assets, out, "--prompt", "a red car", "--prompt", "a blue boat", "--steps", "1")
    assert len(first["videos"]) == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    d = assets["dir"]
    argv = ["--student", str(d / "missing.pt"), "--prompt", "a dog", "--out", str(out)]
    assert generate.main(argv) == 1  # refused before the (missing) model is looked at
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith(f"error: --out {out} holds the outputs of another generate run") and "--overwrite" in err[-1]
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = _run(assets, out, "--prompt", "a dog", "--steps", "1", "--overwrite")
    files = sorted(p.name for p in out.iterdir())
    stem = second["videos"][0]["file"][: -len(".mp4")]
    assert files == sorted(["notes.txt", "generate.json", "contact_sheet.png", f"{stem}.mp4", f"{stem}.npz"])
    assert [v["prompt"] for v in second["videos"]] == ["a dog"]


def test_non_utf8_prompts_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red car\n".encode() + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=re.escape(f"--prompts {path} line 2: not UTF-8 text (byte 0xe9 at column 4)")):
        inputs.read_prompts(str(path))
    path.write_bytes("\ufeffa red car\n".encode())  # a BOM is not a prompt character
    assert inputs.read_prompts(str(path)) == ["a red car"]
