"""A Cosmos DiT loaded for sampling (docs/algorithm.md §1, §3, §11): its parameters without the text projection,
the frozen projection `crossattn_proj`, and the schedule settings it was trained with.

- `load_checkpoint(src)`: a native Cosmos `.pt` (`net.` / `net_ema.` keys) or diffusers folder, local or hf://;
  the settings are the Predict2.5 ones (`PREDICT25`);
- `load_workdir(workdir)`: the EMA student of a training run's latest checkpoint, with the run's settings.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np

from trigflow_distill.models import hub
from trigflow_distill.models.cosmos_dit import DiTConfig, convert
from trigflow_distill.training import restore

# Predict2.5 constants for checkpoints that carry no run config (docs/algorithm.md §1, §3).
# The 2B reference distillation gives conditional frames their own timestep (replace_gt_timesteps).
PREDICT25 = dict(
    scaling="rectified_flow", sigma_data=1.0, shift=5.0, train_steps=4, guidance=4.0, replace_gt_timesteps=True
)


class Model(NamedTuple):
    """A loaded network: params without the text projection, the frozen projection, and what it came from."""

    net_config: DiTConfig
    params: dict
    text_proj: dict  # {"kernel": (Cin, D), "bias": (D,)}
    # scaling, sigma_data, shift, train_steps, guidance (CFG scale; §15 students take it as input),
    # replace_gt_timesteps (how the student saw conditional frames in training)
    defaults: dict
    description: str


def _params_and_proj(params: dict, where: str) -> tuple[dict, dict]:
    if "crossattn_proj" not in params:
        raise ValueError(
            f"{where}: the checkpoint has no crossattn_proj (text projection); generate needs a complete "
            "Cosmos DiT (export students with `python -m trigflow_distill.inference.export`)"
        )
    return {k: v for k, v in params.items() if k != "crossattn_proj"}, params["crossattn_proj"]


def load_checkpoint(src: str, **net_options) -> Model:
    """A native Cosmos `.pt` (`net.` / `net_ema.` keys) or diffusers folder, local or hf://."""
    local = hub.resolve(src)
    if os.path.isdir(local):
        net_config, params = convert.load_diffusers_folder(local, progress=True, **net_options)
    else:
        net_config, params = convert.load_torch_checkpoint(local, progress=True, **net_options)
    params, proj = _params_and_proj(params, src)
    return Model(net_config, params, proj, dict(PREDICT25), src)


def load_workdir(workdir: str, **net_options) -> Model:
    """The EMA student of a training run's latest checkpoint (only those weights are read), with the teacher's
    frozen text projection."""
    config, net_config, student = restore.load_student(workdir, which="ema", **net_options)
    if student["text_proj"] is None:
        raise ValueError(f"{workdir}: the run's teacher has no text projection; generate needs one")
    params, proj = jax.tree.map(np.asarray, jax.device_get((student["net"], student["text_proj"])))
    defaults = dict(
        scaling=config.teacher.scaling,
        sigma_data=float(config.teacher.sigma_data),
        shift=float(config.distill.timestep_shift),
        train_steps=int(config.distill.num_student_steps),
        guidance=float(config.distill.guidance),
        # Runs written before the option existed trained with it on (the default then and now).
        replace_gt_timesteps=bool(config.distill.get("replace_gt_timesteps", True)),
    )
    return Model(net_config, params, proj, defaults, f"{workdir} (EMA student)")
