r"""DMD2 distillation of Cosmos Predict2.5 Video2World into a 4-step student (TrigFlow).

Real scale (2B teacher, docs/algorithm.md §6 recipe; needs the teacher checkpoint and precomputed latents):

    python main.py --config=configs/predict25_4step.py --workdir=/path/to/run \
            --config.teacher.path=/ckpts/Cosmos-Predict2.5-2B/base/pre-trained/<uuid>_ema_bf16.pt \
            --config.data.path=/data/predict25_latents

Tiny CPU demo (the shipped toy teacher, synthetic toy-world data, ends with an evaluation table):

    python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run

Any field can be overridden with --config.<field>=<value>; unknown fields are rejected.
"""

import os

import ml_collections

from trigflow_distill.core.recipe import COND_FRAME_PROBS

# The shipped toy teacher (`python -m trigflow_distill.toy.pretrain --out=assets/toy_teacher.pt` reproduces it).
TINY_TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_teacher.pt")


def get_config(arg: str = ""):
    """Returns the config; `arg` is "" (real 2B recipe) or "tiny" (CPU demo)."""
    if arg not in ("", "tiny"):
        raise ValueError(
            f"Unknown config variant {arg!r}: use configs/predict25_4step.py or configs/predict25_4step.py:tiny"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0  # initial noise and per-step randomness of the updates
    c.total_steps = 30_000  # training iterations (critic and student updates together)
    c.log_every = 10  # iterations between metric lines (stdout, metrics.jsonl, TensorBoard)
    c.checkpoint_every = 500  # iterations between checkpoints (<workdir>/checkpoints; the last step always)
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.sample_every = 500  # iterations between validation samples (<workdir>/samples, see `sample`); 0 = none
    c.max_consecutive_skips = 10  # stop after this many updates in a row with a non-finite loss or gradient
    # A resume must use the saved config (<workdir>/config.json) up to total_steps, intervals, eval and mesh; True
    # goes on with a changed one (the old is kept as config.<time>.json). See docs/reliability.md.
    c.allow_config_change = False

    # Teacher: a native Cosmos .pt (net. / net_ema. prefix) or a diffusers folder, converted once at start-up.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # local .pt / diffusers folder or hf://OWNER/NAME/PATH[@REV]; required
    c.teacher.cache_dir = ""  # "" = <workdir>/teacher_cache
    c.teacher.scaling = "rectified_flow"  # the teacher's preconditioning: rectified_flow (Predict2.5) | edm
    c.teacher.sigma_data = 1.0  # data standard deviation of that preconditioning
    c.teacher.dtype = "bfloat16"  # storage dtype of the frozen teacher params

    # Network options (architecture is inferred from the teacher checkpoint).
    c.net = ml_collections.ConfigDict()
    c.net.dtype = "bfloat16"  # compute dtype; master weights and optimizer states stay fp32
    c.net.remat = "full"  # per-block jax.checkpoint: none | full | dots_saveable | save_attention_out
    c.net.attention = "blockwise"
    c.net.attention_block_size = 512  # keys per step of the blockwise attention

    # DMD2 (docs/algorithm.md §3-7).
    c.distill = ml_collections.ConfigDict()
    c.distill.guidance = 4.0  # standard CFG: x0_u + s (x0_c - x0_u); reference w=3 is s=4
    # A guidance-conditioned student (docs/algorithm.md §15): student and critic take s as an input, each sample of
    # an update draws s ~ U[guidance_range]; `guidance` is then the scale of training samples and the default of
    # generate / evaluation. False = the reference: one student per scale.
    c.distill.guidance_conditioned = False
    c.distill.guidance_range = (1.0, 6.0)  # the scales a guidance-conditioned student trains on
    # Iteration i updates the student iff i % student_update_freq == 0; every i < student_warmup does (§6).
    c.distill.student_update_freq = 5
    c.distill.student_warmup = 1  # see student_update_freq
    c.distill.num_student_steps = 4  # sampling steps of the student
    c.distill.timestep_shift = 5.0  # shift of the student's time grid and of the training noise levels (§2)
    c.distill.cond_frame_probs = COND_FRAME_PROBS  # P(N=0), P(N=1), P(N=2) conditional latent frames
    c.distill.replace_gt_timesteps = True  # conditional frames enter the net at sigma 1e-4 (§7)
    c.distill.ema_rate = 0.1  # power-EMA rate of the student that is exported (§6)
    c.distill.ema_start = 0  # student updates before the power EMA starts averaging (reference: 0)
    # DMD lambda per (sample, chunk of T/K latent frames). The released 2B student was trained with 4 context-
    # parallel shards of 6 frames, each computing its own lambda: 4 reproduces that; 1 = per sample (§4, §13).
    # K must divide the dataset's latent frames (93 video frames = 24 latent frames).
    c.distill.lambda_frame_chunks = 4
    # Backward simulation (§3): "fixed" = the student's sampling schedule with one noise (the Cosmos recipe as
    # this project reads it); "random" = NVlabs/rcm's random decreasing times with fresh noise at each re-noise.
    c.distill.backward_simulation = "fixed"

    # The method (docs/algorithm.md §14): "dmd2" (§4-6) or "rcm" (sCM on the batch's real latents, regularised by
    # DMD2; same critic). distill.rcm holds the reference's rCM constants (NVlabs/rcm, Wan2.1 1.3B run); its CFG
    # scale is distill.guidance (NVlabs/rcm writes the same x0_u + s (x0_c - x0_u), s = teacher_guidance).
    c.distill.method = "dmd2"
    c.distill.rcm = ml_collections.ConfigDict(
        dict(
            loss_scale=100.0,  # weight of the per-sample sum of the sCM loss (reference `loss_scale`)
            dmd_weight=1.0,  # weight of the per-sample sum of the DMD2 loss (reference `loss_scale_dmd`)
            # Iterations i < tangent_warmup are all sCM-only student steps while the tangent ramps in; the DMD2
            # term and the critic start at i = tangent_warmup (then 1 student step in student_update_freq).
            tangent_warmup=1000,
            tangent_norm_eps=0.1,  # g / (||g|| + eps)
            p_mean=-0.8,  # sCM time: mean of ln(sigma) ...
            p_std=1.6,  # sCM time: ln(sigma) ~ N(p_mean, p_std^2) ...
            frame_noise_scale=True,  # ... times sqrt(latent frames) (reference `adjust_video_noise`)
            jvp_attention="einsum",  # JVP-pass attention of blockwise / splash nets (no forward mode); or blockwise_jvp
        )
    )

    # The student's optimizer: AdamW at lr with linear warm-up over `warmup` updates and decay over `decay_steps`,
    # gradients clipped to global norm clip_norm (§6).
    c.student_optim = ml_collections.ConfigDict(
        dict(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0, warmup=100, decay_steps=400_000)
    )
    # The critic's (fake score's) optimizer, fields as student_optim.
    c.critic_optim = ml_collections.ConfigDict(
        dict(lr=2e-7, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0, warmup=100, decay_steps=400_000)
    )

    # Training data: latents + text records (`trigflow-prepare` or `trigflow-data` write them).
    c.data = ml_collections.ConfigDict()
    c.data.kind = "dir"  # "dir" (data.py on-disk format) | "toy" | "synthetic"
    c.data.path = ""  # kind="dir": the dataset directory (prepare's --out)
    c.data.batch_size = 8  # global batch
    c.data.seed = 0  # order of the shuffled batches
    c.data.latent_shape = (16, 4, 8, 8)  # only for kind="synthetic"
    c.data.text_shape = (8, 96)  # only for kind="synthetic"

    # kind="dir": every sample_every steps the EMA student's samples decoded by this Wan2.1 VAE (local or
    # hf://nvidia/Cosmos-Predict2.5-2B/tokenizer.pth) into samples/*.mp4, *.gif and TensorBoard; "" = none.
    c.vae = ml_collections.ConfigDict(dict(path=""))

    # Validation samples (every sample_every steps): the EMA student samples fixed records of the dataset, with their
    # stored text and first latent frames as conditioning (prompts would need the 7B text encoder in training);
    # samples/<step>.json says what each sample is (caption, source video, record, conditioning frames, seed).
    c.sample = ml_collections.ConfigDict()
    c.sample.records = ()  # record indices, all of one bucket; () = the first batch of the data order
    c.sample.num_cond_frames = -1  # conditional latent frames of every sample; -1 = the record's, else drawn
    c.sample.seed = 0  # noise of the samples and of drawn conditioning frames

    # Mesh axis sizes; 0 = chosen at start from the device count and per-device memory by the compile-only plan
    # (fewest seq shards, then the most data parallelism that fits; printed, cached in <workdir>/mesh_auto.json).
    # Fixed sizes are kept, -1 fills the devices left. device_memory_gib: per-device memory for that choice,
    # 0 = the backend's (simulated CPU devices report none: set it).
    c.mesh = ml_collections.ConfigDict(
        dict(
            data=0,
            fsdp=0,
            seq=0,
            device_memory_gib=0.0,  # GiB per device for the automatic choice; 0 = the backend's (needed only on CPU)
        )
    )

    # Weights & Biases, next to TensorBoard and metrics.jsonl (off by default; needs `pip install wandb` when on).
    c.wandb = ml_collections.ConfigDict(
        dict(
            enabled=False,
            project="trigflow-distill",
            entity="",  # "" = your default W&B entity
            name="",  # "" = a name W&B draws
            mode="online",  # online | offline
        )
    )

    # The evaluation of a finished run (data.kind="toy": the toy world's scores in eval.json).
    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = False  # evaluate when training ends
    c.eval.num_samples = 1024  # samples per evaluated sampler
    c.eval.student_steps = (1, 2, 4)  # student sampler step counts evaluated (toy world)
    c.eval.guidance_values = (2.0, 4.0, 6.0)  # scales a guidance-conditioned student is also scored at (toy world)

    if arg == "tiny":
        c.total_steps = 1500
        c.log_every = 50
        c.checkpoint_every = 250
        c.sample_every = 500
        c.teacher.path = TINY_TEACHER
        c.teacher.dtype = "float32"
        c.net.dtype = "float32"
        c.net.remat = "none"
        c.net.attention = "auto"
        # Tiny nets learn far faster than 2B ones. Measured on the toy world (1500 iterations, 1024 samples):
        # student 1e-4 / critic 2e-4 with Adam b1 0 gives the raw 4-step student fd_hand 8.2 (critic 1e-4: 10.1;
        # b1 0.9: 28.9; student 5e-5: 11.7). The critic must keep up with the student.
        c.student_optim.update(lr=1e-4, b1=0.0, warmup=10)
        c.critic_optim.update(lr=2e-4, b1=0.0, warmup=10)
        # EMA, measured on the toy world (issue 16; 512 samples, 1000-2500 iterations, three runs): every power EMA
        # tried (rate 0.05-0.3, start 0 to 60 % of the student updates) scored worse than the raw student it
        # averages (fd_hand 14-21 vs 6.8, amplitude 1.20 vs 1.12): at lr 1e-4 consecutive students differ so much
        # that even the mean of the last ~3 updates shifts the samples, and a lower student lr (5e-5) only left
        # both worse (fd_hand 26-29). So here the EMA starts at the last student update, i.e. the exported EMA is
        # the final student; the real recipe keeps the reference's EMA (rate 0.1, start 0).
        # (rCM's warm-up makes 380 student updates of 1500 iterations, so its EMA averages the last 80; kept so that
        # tiny runs saved before can resume.)
        c.distill.ema_start = c.total_steps // c.distill.student_update_freq
        c.distill.lambda_frame_chunks = 1  # the toy world's 4 latent frames: one lambda per sample
        c.distill.rcm.tangent_warmup = 100  # the reference's 1000 is ~3% of its run; 1500 iterations here
        c.data.kind = "toy"
        c.data.batch_size = 32
        c.mesh.update(data=-1, fsdp=1, seq=1)  # plain data parallelism
        c.eval.at_end = True
    return c
