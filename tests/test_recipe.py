"""The real recipe (configs/predict25_4step.py, no variant) against the reference's experiment configs: NVIDIA's
`dmd2_trigflow_distill_cosmos_predict2_2B_bidirectional_T2V` (cosmos-predict2.5 `distill/configs/experiment/
experiments_dmd2.py` and the model's defaults) for DMD2, NVlabs/rcm `wan2pt1_t2v` for `distill.rcm`.

Every value of the real config is classified: equal to the reference (REFERENCE), different with the reason
(DIFFERENCES, the table of docs/algorithm.md "The recipe against the reference"), or ours only (OURS_ONLY). A new
field or a changed default fails here until it is classified."""

import json
import os

import pytest

import predict25_4step  # configs/ is on the pytest pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# our field: (the reference's value, where the reference sets it)
REFERENCE = {
    "total_steps": (30_000, "trainer.max_iter"),
    "log_every": (10, "trainer.logging_iter"),
    "checkpoint_every": (500, "checkpoint.save_iter"),
    "teacher.scaling": ("rectified_flow", "model.config.scaling"),
    "teacher.sigma_data": (1.0, "model.config.sigma_data"),
    "teacher.dtype": ("bfloat16", "the teacher release file, <uuid>_ema_bf16.pt"),
    "net.dtype": ("bfloat16", "precision"),
    "distill.method": ("dmd2", "model.config.dmd=True, loss_scale (sCM) 0"),
    "distill.guidance": (4.0, "teacher_guidance=3 in x0_c + w (x0_c - x0_u), i.e. s = w + 1"),
    "distill.guidance_conditioned": (False, "one student per scale"),
    "distill.student_update_freq": (5, "student_update_freq"),
    "distill.student_warmup": (1, "tangent_warmup"),
    "distill.num_student_steps": (4, "selected_sampling_time (4 times)"),
    "distill.timestep_shift": (5.0, "timestep_shift"),
    "distill.cond_frame_probs": ([0.6, 0.2, 0.2], "conditional_frames_probs {0: .6, 1: .2, 2: .2}"),
    "distill.replace_gt_timesteps": (True, "replace_gt_timesteps"),
    "distill.ema_rate": (0.1, "ema.rate"),
    "distill.ema_start": (0, "ema.iteration_shift"),
    "distill.lambda_frame_chunks": (4, "context_parallel_size=4: lambda per shard of 6 latent frames"),
    "distill.backward_simulation": ("fixed", "backward_simulation on selected_sampling_time, init_noise re-used"),
    "distill.rcm.loss_scale": (100.0, "NVlabs/rcm loss_scale"),
    "distill.rcm.dmd_weight": (1.0, "NVlabs/rcm loss_scale_dmd"),
    "distill.rcm.tangent_warmup": (1000, "NVlabs/rcm tangent_warmup"),
    "distill.rcm.tangent_norm_eps": (0.1, "NVlabs/rcm g / (||g|| + 0.1)"),
    "distill.rcm.p_std": (1.6, "NVlabs/rcm p_G p_std"),
    "student_optim.lr": (1e-6, "optimizer.lr"),
    "student_optim.b1": (0.9, "optimizer.betas"),
    "student_optim.b2": (0.999, "optimizer.betas"),
    "student_optim.eps": (1e-8, "fusedadamw default eps"),
    "student_optim.weight_decay": (0.01, "optimizer.weight_decay"),
    "student_optim.clip_norm": (1.0, "trainer.callbacks.grad_clip.clip_norm"),
    "student_optim.warmup": (100, "scheduler.warm_up_steps"),
    "student_optim.decay_steps": (400_000, "scheduler.cycle_lengths"),
    "critic_optim.lr": (2e-7, "optimizer_fake_score_config.lr"),
    "critic_optim.b1": (0.9, "optimizer_fake_score_config.betas"),
    "critic_optim.b2": (0.999, "optimizer_fake_score_config.betas"),
    "critic_optim.eps": (1e-8, "fusedadamw default eps"),
    "critic_optim.weight_decay": (0.01, "optimizer_fake_score_config.weight_decay"),
    "critic_optim.clip_norm": (1.0, "trainer.callbacks.grad_clip.clip_norm"),
    "critic_optim.warmup": (100, "scheduler.warm_up_steps"),
    "critic_optim.decay_steps": (400_000, "scheduler.cycle_lengths"),
    "data.batch_size": (8, "batch_size 1 per data-parallel rank, 32 GPUs / context parallel 4 = 8 ranks"),
}

# our field: (our value, the reference's value, why they differ)
DIFFERENCES = {
    "sample_every": (500, 250, "sample pictures only; every 250 iterations costs a 4-step sampling on the run's mesh"),
    "keep_checkpoints": (3, "all", "local disks; the reference keeps every checkpoint in its object store"),
    "max_consecutive_skips": (
        10,
        "none",
        "a non-finite update is skipped and the run stops after 10 in a row; the reference zeroes non-finite "
        "gradients and steps on",
    ),
    "net.remat": ("full", "predict2_2b_720_aggressive", "memory only: per-block checkpointing, same numbers"),
    "net.attention": ("blockwise", "flash / TE attention", "memory only: same softmax attention"),
    "distill.rcm.p_mean": (
        -0.8,
        0.7,
        "NVlabs/rcm folds the video noise scale into p_mean for 20 latent frames (-0.8 + ln sqrt 20 = 0.698); "
        "here frame_noise_scale adds ln sqrt T for the data's T",
    ),
    "distill.rcm.frame_noise_scale": (True, False, "see distill.rcm.p_mean"),
}

# ours only: no counterpart in the reference's experiment config (paths, tooling, evaluation, sharding)
OURS_ONLY = {
    "seed",
    "allow_config_change",
    "teacher.path",
    "teacher.cache_dir",
    "net.attention_block_size",
    "distill.guidance_range",
    "distill.rcm.jvp_attention",
    "data.kind",
    "data.path",
    "data.seed",
    "data.latent_shape",
    "data.text_shape",
    "vae.path",
    "sample.records",
    "sample.num_cond_frames",
    "sample.seed",
    "mesh.data",
    "mesh.fsdp",
    "mesh.seq",
    "mesh.device_memory_gib",
    "wandb.enabled",
    "wandb.project",
    "wandb.entity",
    "wandb.name",
    "wandb.mode",
    "eval.at_end",
    "eval.num_samples",
    "eval.student_steps",
    "eval.guidance_values",
}


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def real():
    return _flat(json.loads(predict25_4step.get_config("").to_json_best_effort()))


def test_every_real_config_value_is_classified(real):
    groups = (set(REFERENCE), set(DIFFERENCES), OURS_ONLY)
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    unclassified = set(real) - set().union(*groups)
    assert not unclassified, f"classify these fields against the reference: {sorted(unclassified)}"
    assert not set().union(*groups) - set(real), "fields listed here that the config no longer has"


def test_real_config_equals_the_reference_where_it_says_so(real):
    wrong = {k: (real[k], ref) for k, (ref, _) in REFERENCE.items() if real[k] != pytest.approx(ref)}
    assert not wrong, f"real config != reference (ours, reference): {wrong}"
    changed = {k: (real[k], ours) for k, (ours, _, _) in DIFFERENCES.items() if real[k] != ours}
    assert not changed, f"a listed difference changed value (config, listed): {changed}"


def test_tiny_variant_keeps_one_lambda_per_sample():
    """The toy world has 4 latent frames; the real recipe's 4 chunks of 6 frames apply to 93-frame data."""
    assert predict25_4step.get_config("tiny").distill.lambda_frame_chunks == 1


def test_the_differences_table_in_the_docs_lists_every_difference():
    with open(os.path.join(ROOT, "docs", "algorithm.md"), encoding="utf-8") as f:
        doc = f.read()
    section = doc[doc.index("## The recipe against the reference") :]
    missing = [k for k in DIFFERENCES if f"`{k}`" not in section]
    assert not missing, f"docs/algorithm.md's recipe table lacks {missing}"
