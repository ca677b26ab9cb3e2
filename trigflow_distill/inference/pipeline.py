"""The Python API for sampling; `trigflow-generate` is this plus its files (mp4s, contact sheet, generate.json).

  from trigflow_distill.inference import Pipeline

  pipe = Pipeline.load(student="student.pt")  # or workdir="/tmp/run", or teacher="teacher.pt"
  videos = pipe.generate(["A robot arm stacks red cubes"], image="first.jpg", steps=4, seed=0)
  # videos: (N, T, H, W, 3) uint8; output="float" gives [-1, 1] float32, output="latent" the latents (N, C, T, h, w)

`Pipeline.load` reads the DiT (a run's EMA student, a native Cosmos `.pt` or diffusers folder, local or hf://) and
the Wan2.1 VAE (`vae=`); the Reason1 text encoder (`text_encoder=`) is read at the first `generate` and kept.
`generate` takes the CLI's options as keywords (`steps`, `guidance`, `teacher_steps`, `teacher_sampler`,
`negative_prompt`, `seed`, `num_frames`, `resolution`, `aspect`, `size`, `preprocess`, `cond_frames`,
`batch_size`); `image` / `video` are a path or uint8 RGB frames. `prepare` + `batches` are the same run one batch at
a time (what the CLI uses to write as it goes). Sampling is `video2world.sample` (docs/algorithm.md §3), the one path
that training samples and evaluation use too. The initial noise of prompt i is normal(fold_in(key(seed), i)): a
video does not depend on the batch size or the number of devices. Batches are split over all local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trigflow_distill.common import sharding
from trigflow_distill.common import video as video_lib
from trigflow_distill.core import sampling
from trigflow_distill.inference.inputs import Conditioning, make_conditioning, output_size, read_conditioning
from trigflow_distill.inference.loader import Model, load_checkpoint, load_workdir
from trigflow_distill.methods import video2world
from trigflow_distill.models import cosmos_dit, reason1, wan_vae

TEXT_ENCODER_SOURCE = "hf://nvidia/Cosmos-Reason1-7B@3210bec0495fdc7a8d3dbb8d58da5711eab4b423"
VAE_SOURCE = wan_vae.DEFAULT_SOURCE

# NVIDIA's inference CLI default (cosmos_predict2/config.py DEFAULT_NEGATIVE_PROMPT, the same text in
# _src/predict2/inference/video2world.py): the `reference` teacher's unconditional prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky movements, "
    "low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, fake elements, "
    "unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. Overall, the video is of "
    "poor quality."
)
# teacher sampler -> (solver, default CFG scale s in x0_u + s (x0_c - x0_u)). reference: NVIDIA's inference
# (UniPC, their w = 7 in v_c + w (v_c - v_u), i.e. s = 8, negative prompt); dmd2-target: the teacher the DMD2 loss
# distills towards (§4: s = 4, zero text), Euler for like-for-like comparisons with the student.
TEACHER_SAMPLERS = {"reference": ("unipc", 8.0), "dmd2-target": ("euler", 4.0)}
DEFAULT_TEACHER_SAMPLER = "dmd2-target"
DEFAULT_TEACHER_STEPS = 35
OUTPUTS = ("uint8", "float", "latent")


def initial_noise(seed: int, index: int, shape) -> jax.Array:
    """eps of prompt `index` (float32, `shape`): independent of batching and devices."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), shape, jnp.float32)


# The one sampling path (`video2world.sample`: the student's k steps or the teacher's CFG Euler steps, conditional
# frames kept), jitted per settings, network config and scaling.
_sample_jit = jax.jit(video2world.sample, static_argnums=(0, 1), static_argnames=("scaling", "replace_gt_timesteps"))


@functools.partial(jax.jit, static_argnums=0)
def _context(te_cfg, te_params, ids_bl, text_proj):
    """Projected context (B, L, D) of token ids: Reason1 embedding -> the model's frozen text projection."""
    return cosmos_dit.project_text(text_proj, reason1.embed(te_cfg, te_params, ids_bl))


def _devices_for(batch_size: int) -> list:
    """The most local devices (at most batch_size) that split the batch evenly."""
    devices = jax.local_devices()
    n = max(d for d in range(1, min(len(devices), batch_size) + 1) if batch_size % d == 0)
    return devices[:n]


def load_text_encoder(src: str, devices, model: Model, dtype: str = "bfloat16"):
    """(mesh, config, params, tokenizer) of the Reason1 encoder, FSDP over `devices`, checked against the model's
    text projection."""
    mesh = sharding.make_mesh({"fsdp": -1}, devices)
    te_cfg, te_params = reason1.load(src, dtype, mesh=mesh)
    expected = model.text_proj["kernel"].shape[0]
    if te_cfg.num_layers * te_cfg.hidden_size != expected:
        raise ValueError(
            f"--text-encoder {src}: gives {te_cfg.num_layers} x {te_cfg.hidden_size} = "
            f"{te_cfg.num_layers * te_cfg.hidden_size} features, the model's text projection takes "
            f"{expected}; use the model's own text encoder (Cosmos-Reason1-7B for Predict2.5)"
        )
    return mesh, te_cfg, te_params, reason1.load_tokenizer(src)


def encode_with(encoder, prompts: list[str], batch_size: int, model: Model) -> np.ndarray:
    """Projected contexts (N, L, D) float32 of the prompts with a `load_text_encoder` result, in batches."""
    mesh, te_cfg, te_params, tok = encoder
    proj = jax.device_put(model.text_proj, sharding.replicated(mesh))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = reason1.tokenize(tok, chunk + [chunk[-1]] * (batch_size - len(chunk)))
        ids = jax.device_put(ids, sharding.batch_sharding(mesh))
        out.append(np.asarray(_context(te_cfg, te_params, ids, proj))[: len(chunk)])
    return np.concatenate(out)


def encode_prompts(
    src: str, prompts: list[str], batch_size: int, devices, model: Model, dtype: str = "bfloat16"
) -> np.ndarray:
    """Projected contexts (N, L, D) float32 of the prompts, in batches split over `devices` (FSDP text encoder
    in `dtype`)."""
    return encode_with(load_text_encoder(src, devices, model, dtype), prompts, batch_size, model)


def teacher_defaults(teacher_sampler=None, guidance=None, teacher_steps=None, negative_prompt=None):
    """(sampler, guidance, steps, negative prompt) of a teacher with the defaults filled: dmd2-target, its scale,
    35 steps; NVIDIA's negative prompt for `reference`, none otherwise."""
    sampler = teacher_sampler or DEFAULT_TEACHER_SAMPLER
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"teacher sampler {sampler!r}: use one of {', '.join(TEACHER_SAMPLERS)}")
    if negative_prompt is not None and sampler != "reference":
        raise ValueError(
            "--negative-prompt is the unconditional prompt of --teacher-sampler reference; add that flag (the "
            "dmd2-target teacher and the students use the zero-text unconditional context)"
        )
    guidance = TEACHER_SAMPLERS[sampler][1] if guidance is None else guidance
    steps = DEFAULT_TEACHER_STEPS if teacher_steps is None else teacher_steps
    if sampler == "reference" and negative_prompt is None:
        negative_prompt = DEFAULT_NEGATIVE_PROMPT
    return sampler, guidance, steps, negative_prompt


class Job(NamedTuple):
    """One `generate` call resolved: its settings, conditioning and encoded prompts (what `batches` samples)."""

    prompts: list[str]
    settings: sampling.SamplerSettings
    sampler: str  # "student" or the teacher sampler's name
    negative_prompt: str | None
    replace_gt: bool
    preprocess: str
    bucket_wh: tuple[int, int]
    latent_shape: tuple[int, int, int, int]
    cond: Conditioning
    seed: int
    batch_size: int
    devices: list
    contexts: np.ndarray  # (N [+ 1 negative prompt], L, D)
    text_encoding_s: float


class Batch(NamedTuple):
    """One sampled and decoded batch."""

    indices: list[int]  # prompt indices
    latents: np.ndarray  # (b, C, T, h, w) float32
    pixels: np.ndarray  # (b, 3, T, H, W) float in [-1, 1]
    sampling_s: float
    decoding_s: float


@dataclasses.dataclass
class Pipeline:
    """A loaded DiT (student or teacher) with its VAE and text encoder source: `Pipeline.load(...)`, then
    `.generate(prompts, ...)`."""

    model: Model
    vae_cfg: Any
    vae_params: Any
    origin: str  # "student" | "workdir" | "teacher"
    vae: str = VAE_SOURCE
    text_encoder: str = TEXT_ENCODER_SOURCE
    vae_dtype: str = "float32"
    text_encoder_dtype: str = "bfloat16"
    _encoders: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        student: str | None = None,
        *,
        workdir: str | None = None,
        teacher: str | None = None,
        vae: str = VAE_SOURCE,
        text_encoder: str = TEXT_ENCODER_SOURCE,
        dtype: str = "bfloat16",
        vae_dtype: str = "float32",
        text_encoder_dtype: str = "bfloat16",
        attention: str = "auto",
    ) -> Pipeline:
        """The DiT of `student` (a native Cosmos `.pt` or diffusers folder, local or hf://), `workdir` (a training
        run's EMA student, with the run's settings) or `teacher` (sampled with CFG), and the VAE."""
        given = [name for name, v in (("student", student), ("workdir", workdir), ("teacher", teacher)) if v]
        if len(given) != 1:
            raise ValueError(
                f"Pipeline.load: got {' and '.join(given) or 'no model'}; give exactly one of student=, workdir=, "
                "teacher="
            )
        options = dict(dtype=dtype, attention=attention, remat=False)
        model = load_workdir(workdir, **options) if workdir else load_checkpoint(student or teacher, **options)
        vae_cfg, vae_params = wan_vae.load(vae)
        return cls(model, vae_cfg, vae_params, given[0], vae, text_encoder, vae_dtype, text_encoder_dtype)

    @property
    def is_teacher(self) -> bool:
        return self.origin == "teacher"

    def sampler_settings(
        self, steps=None, guidance=None, teacher_steps=None, teacher_sampler=None, negative_prompt=None
    ) -> tuple[sampling.SamplerSettings, str, str | None]:
        """(settings, sampler name, negative prompt) of this model with these options, defaults filled."""
        d = self.model.defaults
        common = dict(shift=d["shift"], sigma_data=d["sigma_data"], train_steps=d["train_steps"])
        if guidance is not None and not (math.isfinite(guidance) and guidance > 0):
            raise ValueError(f"--guidance {guidance}: must be a finite scale > 0 (1 = no guidance)")
        if self.is_teacher:
            if steps is not None:
                raise ValueError("--steps is for students; the teacher's is --teacher-steps")
            name, guidance, teacher_steps, negative = teacher_defaults(
                teacher_sampler, guidance, teacher_steps, negative_prompt
            )
            if teacher_steps < 1:
                raise ValueError(f"--teacher-steps {teacher_steps}: must be >= 1")
            solver = TEACHER_SAMPLERS[name][0]
            settings = sampling.SamplerSettings(
                kind="teacher", steps=teacher_steps, guidance=guidance, solver=solver, **common
            )
            return settings, name, negative
        if teacher_steps is not None:
            raise ValueError("--teacher-steps is for --teacher; students take --steps")
        if teacher_sampler is not None:
            raise ValueError("--teacher-sampler is for --teacher; students have their own k-step sampler")
        if negative_prompt is not None:
            teacher_defaults(None, None, None, negative_prompt)  # the one error for a negative prompt without CFG
        steps = 4 if steps is None else steps
        if not 1 <= steps <= d["train_steps"]:
            raise ValueError(
                f"--steps {steps}: the student takes 1 to {d['train_steps']} steps (the first k times "
                "of its training schedule)"
            )
        conditioned = cosmos_dit.GUIDANCE_EMBEDDER in self.model.params
        if guidance is not None and not conditioned:
            raise ValueError(
                f"--guidance {guidance:g}: this student was distilled at one CFG scale; --guidance picks the "
                "scale of a guidance-conditioned student (distill.guidance_conditioned=True, docs/algorithm.md §15)"
            )
        guidance = (d["guidance"] if guidance is None else guidance) if conditioned else None
        return sampling.SamplerSettings(kind="student", steps=steps, guidance=guidance, **common), "student", None

    def prepare(
        self,
        prompts: str | Sequence[str],
        *,
        image=None,
        video=None,
        cond_frames: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        teacher_steps: int | None = None,
        teacher_sampler: str | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        num_frames: int = 93,
        resolution: str = "720",
        aspect: str | None = None,
        size: tuple[int, int] | None = None,
        preprocess: str | None = None,
        batch_size: int | None = None,
    ) -> Job:
        """Checks the options, encodes the conditioning frames and the prompts: the `Job` that `batches` samples."""
        prompts = [prompts] if isinstance(prompts, str) else [p.strip() for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("--prompt: empty prompt; give some text")
        wan_vae.check_frame_count(num_frames, "--num-frames")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: must be >= 1")
        settings, sampler, negative = self.sampler_settings(
            steps, guidance, teacher_steps, teacher_sampler, negative_prompt
        )
        frames = read_conditioning(image, video, cond_frames)
        # crop for NVIDIA's checkpoints (as its inference CLI), a run's own preprocessing for its student
        preprocess = preprocess or ("pad" if self.origin == "workdir" else "crop")
        bucket = output_size(frames, size, aspect, resolution, preprocess)
        reference = settings.solver == "unipc"
        # NVIDIA's teacher inference feeds conditional frames the step's time; a student is sampled as its run
        # trained it (distill.replace_gt_timesteps; on for a .pt, as in the 2B reference distillation).
        replace_gt = not reference and bool(self.model.defaults["replace_gt_timesteps"])
        t_lat = 1 + (num_frames - 1) // self.vae_cfg.time_factor
        latent_shape = (
            self.model.net_config.in_channels,
            t_lat,
            bucket[1] // self.vae_cfg.space_factor,
            bucket[0] // self.vae_cfg.space_factor,
        )
        cond = make_conditioning(
            self.vae_cfg, self.vae_params, frames, bucket, latent_shape, self.vae_dtype, preprocess
        )
        if cond.num_cond >= t_lat:
            raise ValueError(
                f"--num-frames {num_frames} gives {t_lat} latent frames, all of them conditional "
                f"({cond.num_cond}); ask for more frames"
            )
        batch_size = min(batch_size or jax.local_device_count(), len(prompts))
        devices = _devices_for(batch_size)
        t = time.perf_counter()
        key = (self.text_encoder, self.text_encoder_dtype, tuple(d.id for d in devices))
        if key not in self._encoders:  # read once per device set, kept for later calls
            self._encoders[key] = load_text_encoder(self.text_encoder, devices, self.model, self.text_encoder_dtype)
        texts = prompts + ([negative] if reference else [])
        contexts = encode_with(self._encoders[key], texts, batch_size, self.model)
        return Job(
            prompts,
            settings,
            sampler,
            negative,
            replace_gt,
            preprocess,
            bucket,
            latent_shape,
            cond,
            seed,
            batch_size,
            devices,
            contexts,
            time.perf_counter() - t,
        )

    def batches(self, job: Job) -> Iterator[Batch]:
        """Samples and decodes the job's prompts, one batch at a time (the last one padded)."""
        model = self.model
        mesh = sharding.make_mesh({"data": -1}, job.devices)
        repl, split = sharding.replicated(mesh), NamedSharding(mesh, P("data"))
        params = jax.device_put(model.params, repl)
        if job.settings.solver == "unipc":  # NVIDIA's unconditional branch: the negative prompt, encoded like any
            uncond = jax.device_put(job.contexts[-1:], repl)
        else:  # the projection of all-zero text (§7), what the DMD2 teacher and the students were trained with
            shape = (1, 1, model.net_config.crossattn_emb_channels)
            uncond = jax.device_put(cosmos_dit.unconditional_context(model.text_proj, shape), repl)
        cond = job.cond
        gt, mask, padding = (jax.device_put(x, repl) for x in (cond.gt_1cthw, cond.mask_11thw, cond.padding_11hw))
        n, b = len(job.prompts), job.batch_size
        for start in range(0, n, b):
            idx = list(range(start, min(start + b, n)))
            pad_idx = idx + [idx[-1]] * (b - len(idx))
            context = jax.device_put(job.contexts[pad_idx], split)
            eps = np.stack([np.asarray(initial_noise(job.seed, i, job.latent_shape)) for i in pad_idx])
            eps = jax.device_put(eps, split)
            t = time.perf_counter()
            latents = _sample_jit(
                job.settings,
                model.net_config,
                params,
                context,
                uncond,
                gt,
                mask,
                eps,
                scaling=model.defaults["scaling"],
                padding_mask_b1hw=padding,
                replace_gt_timesteps=job.replace_gt,
            ).block_until_ready()
            t_sample = time.perf_counter() - t
            t = time.perf_counter()
            pixels = np.asarray(wan_vae.decode(self.vae_cfg, self.vae_params, latents, dtype=self.vae_dtype))
            t_decode = time.perf_counter() - t
            yield Batch(idx, np.asarray(latents)[: len(idx)], pixels[: len(idx)], t_sample, t_decode)

    def generate(self, prompts: str | Sequence[str], *, output: str = "uint8", **options) -> np.ndarray:
        """Videos of the prompts (a string or a list), in prompt order: (N, T, H, W, 3) uint8 (`output="uint8"`),
        float32 in [-1, 1] (`"float"`) or the latents (N, C, T, h, w) (`"latent"`). `options` are `prepare`'s."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: use one of {', '.join(OUTPUTS)}")
        out = []
        for batch in self.batches(self.prepare(prompts, **options)):
            if output == "latent":
                out.extend(batch.latents)
            elif output == "float":
                out.extend(np.moveaxis(np.clip(batch.pixels, -1.0, 1.0), 1, -1).astype(np.float32))
            else:
                out.extend(video_lib.to_uint8(p) for p in batch.pixels)
        return np.stack(out)
