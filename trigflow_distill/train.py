"""The DMD2 distillation host loop: batches in, jitted updates, metrics, checkpoints, sample pictures.

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run

The method itself (state, updates, sampling) is `dmd2.py`; opening the teacher and a run is `run.py`. The record
source and the optional sample writer come in as arguments (main.py picks them from config.data.kind), so the
loop knows nothing of any particular data set.
"""
import functools
import os
from typing import Callable

import jax
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from trigflow_distill import checkpoint, data, distributed, dmd2, metrics, optim, run, sharding

# write_samples(samples_bcthw, batch, path): pictures of the EMA student's samples; batch holds the gathered host
# arrays of the current batch (every field but "text").
SampleWriter = Callable[[np.ndarray, dict, str], None]


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite updates in a row)."""


def train(config, workdir: str, source, write_samples: SampleWriter | None = None) -> dmd2.TrainState:
    """Runs (or resumes) the distillation in `workdir` up to config.total_steps; returns the final state.

    source: random-access records (see trigflow_distill/data/__init__.py). write_samples: called every
    config.sample_every steps (None: no pictures).
    """
    run.validate_config(config)
    main_process = distributed.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(dict(config.mesh))
    batch_size = int(config.data.batch_size)
    sharding.check_batch(batch_size, mesh)

    algo, (student_tx, critic_tx), teacher, (state_sh, teacher_sh), abstract, init = run.setup(config, workdir, mesh)
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    critic_step, student_step = dmd2.make_update_fns(algo, student_tx, critic_tx,
                                                     optim.ema_gamma(config.distill.ema_rate),
                                                     (state_sh, teacher_sh, batch_sh, repl))

    data_iter = data.make_iterator(source, batch_size, int(config.data.seed),
                                   process_slice=sharding.local_batch_slice(batch_size, mesh))
    manager = checkpoint.make_manager(workdir, int(config.keep_checkpoints), int(config.checkpoint_every))
    state, start = checkpoint.restore_latest(manager, abstract, data_iter)
    if state is None:
        state = init(teacher)
        if main_process:
            print(parameter_overview.get_parameter_overview(jax.device_get(state.student), include_stats=False,
                                                            max_lines=40), flush=True)
    elif main_process:
        print(f"Resumed from {workdir} at step {start}.", flush=True)

    total = int(config.total_steps)
    first = source[0]["latents"]  # (16,T,H,W): tokens per sample for the speed line
    c = algo.net_config
    tokens = batch_size * (first.shape[1] // c.patch_temporal) * (first.shape[2] // c.patch_spatial) * (
        first.shape[3] // c.patch_spatial)
    writer = metrics.Writer(workdir, total, tokens, enabled=main_process)
    agg = metrics.Aggregator()
    pending = []
    d = config.distill
    sample_fn = jax.jit(functools.partial(dmd2.student_samples, algo))
    try:
        for step in range(start, total):
            batch = sharding.global_batch(next(data_iter), batch_size, mesh)
            fn = student_step if dmd2.is_student_step(step, d.student_update_freq, d.tangent_warmup) else critic_step
            state, step_metrics = fn(state, teacher, batch)
            pending.append(step_metrics)
            done = step + 1
            if done % config.log_every == 0 or done == total:
                for m in jax.device_get(pending):
                    agg.add(m)
                pending = []
                scalars = agg.compute_and_reset()
                skips = int(state.consecutive_skips)
                writer.write(done, {**scalars, "total_skips": float(state.total_skips)})
                if skips >= config.max_consecutive_skips:
                    raise TrainingStopped(
                        f"{skips} consecutive updates had a non-finite loss or gradient (step {done}); stopping. "
                        f"The last good checkpoint is in {manager.directory}. Lower the learning rates or check the "
                        "data for non-finite values.")
            if checkpoint.save(manager, done, state, data_iter, force=done == total) and main_process:
                print(f"checkpoint saved at step {done}", flush=True)
            if write_samples is not None and config.sample_every and done % config.sample_every == 0:
                save_samples(sample_fn, state, teacher, batch, write_samples,
                             os.path.join(workdir, "samples", f"{done:07d}.png"))
    finally:
        checkpoint.wait_until_finished(manager)
        writer.close()
    return state


def save_samples(sample_fn, state: dmd2.TrainState, teacher, batch, write_samples: SampleWriter, path: str):
    """The EMA student's samples on the current batch, handed to `write_samples` (every process computes, process
    0 writes). `sample_fn` is jit(partial(dmd2.student_samples, algo)), built once per run."""
    x = multihost_utils.process_allgather(sample_fn(state.student_ema, teacher, batch, jax.random.PRNGKey(0)),
                                          tiled=True)
    host_batch = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                  for k, v in batch.items() if k != "text"}
    if distributed.is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_samples(np.asarray(x), host_batch, path)
