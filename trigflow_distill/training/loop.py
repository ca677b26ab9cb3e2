"""The DMD2 distillation host loop: batches in, jitted updates, metrics, checkpoints, sample pictures.

  python main.py --config=configs/predict25_4step.py:tiny --workdir=/tmp/run

The method itself (state, updates, sampling) is `dmd2.py`; opening the teacher and a run is `run_config.py`. The record
source and the optional sample writer come in as arguments (main.py picks them from config.data.kind), so the
loop knows nothing of any particular data set.

Reliability (docs/reliability.md): one run per workdir (`lock.WorkdirLock`); the config is checked against the
saved one before anything is written; checkpoints are saved only when finite and reported only once committed
(`checkpoint.Saver`); a resume restores the newest checkpoint that reads back completely.
"""

import functools
import sys
import time
from typing import Callable

import jax
import numpy as np
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill import data
from trigflow_distill.common import cli, distributed, sharding
from trigflow_distill.common.errors import CheckpointError, TrainingStopped
from trigflow_distill.methods import dmd2, train_state
from trigflow_distill.training import builder, checkpoint, lock, metrics, plan, run_config

# write_samples(samples_bcthw, batch, path, writer): pictures of the EMA student's samples; batch holds the gathered
# host arrays of the current batch (every field but "text"); writer is the run's metrics.Writer, whose
# write_images / write_videos send pictures to TensorBoard (and W&B).
SampleWriter = Callable[[np.ndarray, dict, str, "metrics.Writer"], None]


def train(config, workdir: str, source, write_samples: SampleWriter | None = None) -> train_state.TrainState:
    """Runs (or resumes) the distillation in `workdir` up to config.total_steps; returns the final state.

    source: random-access records (see trigflow_distill/data/__init__.py). write_samples: called every
    config.sample_every steps (None: no pictures).
    """
    run_config.validate_config(config)
    main_process = distributed.is_main_process()
    workdir = lock.open_workdir(workdir)
    workdir_lock = lock.acquire_lock(workdir)
    try:
        note = run_config.resume_config(config, workdir, write=main_process)
        if note and main_process:
            print(note, flush=True)
        return _train(config, workdir, source, write_samples, workdir_lock)
    finally:
        if workdir_lock is not None:
            workdir_lock.release()


def _train(config, workdir: epath.Path, source, write_samples, workdir_lock) -> train_state.TrainState:
    main_process = distributed.is_main_process()
    say = cli.say if main_process else lambda line: None  # phase lines: start-up is minutes of silence otherwise
    batch_size = int(config.data.batch_size)
    say(f"loading the teacher {config.teacher.path} (converted once, then cached) ...")
    net_config, teacher = builder.load_teacher(config, str(workdir))
    # Before the mesh plan: bad data fails in seconds.
    text_kind = builder.check_source(source, net_config, int(config.distill.lambda_frame_chunks))
    # The mesh (config.mesh sizes at 0: chosen by the compile-only plan) for the largest records of the data.
    largest = max(
        (spec for _, spec, _ in data.format.source_buckets(source)), key=lambda spec: int(np.prod(spec.latent_shape))
    )
    say("planning the mesh ...")
    mesh = plan.run_mesh(
        config, net_config, largest.latent_shape, largest.text_shape[0], batch_size, str(workdir), log=say
    )
    sharding.check_batch(batch_size, mesh)
    say("building the run (student, critic, optimizers) ...")
    run = builder.build(config, net_config, teacher, mesh, text_kind)
    algo, teacher = run.algo, run.teacher

    data_iter = data.make_iterator(
        source, batch_size, int(config.data.seed), process_slice=sharding.local_batch_slice(batch_size, mesh)
    )
    manager = checkpoint.make_manager(workdir, int(config.keep_checkpoints), int(config.checkpoint_every))
    latest = manager.latest_step()
    if latest is not None:
        say(f"restoring step {latest} from {workdir} ...")
    state, start = checkpoint.restore_latest(manager, run.abstract_state, data_iter, set_aside=True)
    saver = checkpoint.Saver(manager, last_committed=start if state is not None else None)
    if state is None:
        say("initialising the student and critic from the teacher ...")
        state = run.init(teacher)
        if main_process:
            print(
                parameter_overview.get_parameter_overview(
                    jax.device_get(state.student), include_stats=False, max_lines=40
                ),
                flush=True,
            )
    else:
        say(f"resumed from {workdir} at step {start}")

    total = int(config.total_steps)
    first = source[0]["latents"]  # (16,T,H,W): tokens per sample for the speed line
    c = algo.net_config
    tokens = (
        batch_size
        * (first.shape[1] // c.patch_temporal)
        * (first.shape[2] // c.patch_spatial)
        * (first.shape[3] // c.patch_spatial)
    )
    writer = metrics.Writer(
        str(workdir), total, tokens, enabled=main_process, wandb_config=config.wandb, run_config=config.to_dict()
    )
    agg = metrics.Aggregator()
    pending = []
    sample_fn = jax.jit(functools.partial(dmd2.student_samples, algo))
    sample_batch = None
    if write_samples is not None and config.sample_every:
        # One fixed validation batch (the dataset's first, fixed noise): samples of different steps and of resumed
        # runs show the same prompts and conditioning.
        first_batch = next(
            data.make_iterator(
                source, batch_size, int(config.data.seed), process_slice=sharding.local_batch_slice(batch_size, mesh)
            )
        )
        sample_batch = sharding.global_batch(first_batch, batch_size, mesh)

    def check_lock():
        if workdir_lock is not None:
            workdir_lock.check()

    sampler_compiled = False
    compiled = set()  # (update, latent shape) pairs already compiled: their first step is left out of it/s and ETA
    writer.start(start)
    try:
        for step in range(start, total):
            batch = sharding.global_batch(next(data_iter), batch_size, mesh)
            student = algo.is_student_step(step)
            fn = run.student_step if student else run.critic_step
            key = (student, tuple(batch["latents"].shape))
            if key in compiled:
                state, step_metrics = fn(state, teacher, batch)
            else:
                _, _, frames, height, width = key[1]
                say(
                    f"compiling the {'student' if student else 'critic'} update for bucket {width}x{height} "
                    f"({frames} latent frames) ..."
                )
                jax.block_until_ready(state)  # earlier steps still running are not compile time
                t0 = time.perf_counter()
                state, step_metrics = jax.block_until_ready(fn(state, teacher, batch))
                writer.exclude(time.perf_counter() - t0)
                compiled.add(key)
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
                    saver.confirm()  # so that the message names the newest committed checkpoint
                    raise TrainingStopped(
                        f"{skips} consecutive updates had a non-finite loss or gradient (step {done}); stopping. "
                        f"{saver.last_good()} Lower the learning rates or check the data for non-finite values."
                    )
                saver.poll()
                check_lock()
            check_lock()
            saver.save(done, state, data_iter, force=done == total)
            if write_samples is not None and config.sample_every and done % config.sample_every == 0:
                t0 = time.perf_counter()
                save_samples(
                    sample_fn,
                    state,
                    teacher,
                    sample_batch,
                    write_samples,
                    workdir / "samples" / f"{done:07d}.png",
                    writer,
                )
                if not sampler_compiled:  # the first compiles the sampler; later ones are part of the run's pace
                    writer.exclude(time.perf_counter() - t0, steps=0)
                    sampler_compiled = True
        saver.close()
    except BaseException:
        try:  # let a save in flight finish, so the last good checkpoint is the newest one
            saver.close()
        except CheckpointError as e:
            if main_process:
                print(f"warning: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        writer.close()
    return state


def save_samples(
    sample_fn,
    state: train_state.TrainState,
    teacher,
    batch,
    write_samples: SampleWriter,
    path: epath.Path,
    writer: metrics.Writer | None = None,
):
    """The EMA student's samples for `batch` (the run's fixed validation batch), handed to `write_samples` (every
    process computes, process 0 writes). `sample_fn` is jit(partial(dmd2.student_samples, algo)), built once per run."""
    x = multihost_utils.process_allgather(
        sample_fn(state.student_ema, teacher, batch, jax.random.PRNGKey(0)), tiled=True
    )
    host_batch = {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items() if k != "text"
    }
    if distributed.is_main_process():
        cli.say(f"writing samples -> {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_samples(np.asarray(x), host_batch, str(path), writer)
