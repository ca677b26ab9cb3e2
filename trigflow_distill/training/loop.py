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
import json
import math
import sys
import time
from typing import Callable

import jax
import numpy as np
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils

from trigflow_distill import data
from trigflow_distill.common import cli, distributed, lock, paths, sharding
from trigflow_distill.common.errors import CheckpointError, TrainingStopped
from trigflow_distill.methods import dmd2, train_state
from trigflow_distill.training import builder, checkpoint, metrics, plan, run_config

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
        dataset = run_config.dataset_record(source)  # its fingerprint: another dataset is refused on resume
        note = run_config.resume_config(config, workdir, write=main_process, dataset=dataset)
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
    builder.check_projection(source, teacher["text_proj"], str(config.teacher.path))
    for line in check_batches(source, batch_size, _batch_fits(config, net_config)):
        say(line)
    sample_records = check_sample_records(source, tuple(config.sample.records))
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
        say(f"Resumed from {workdir} at step {start}")

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
    sample_batch = sample_meta = None
    if write_samples is not None and config.sample_every:
        # One fixed validation batch (fixed records, conditioning and noise): samples of different steps and of
        # resumed runs show the same prompts and conditioning.
        sample_batch, sample_meta = validation_batch(config, source, sample_records, mesh, algo.cond_frame_probs)

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
                    sample_meta,
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
    meta: dict | None = None,
):
    """The EMA student's samples for `batch` (the run's fixed validation batch), handed to `write_samples` (every
    process computes, process 0 writes). `sample_fn` is jit(partial(dmd2.student_samples, algo)), built once per run.
    `meta` (from `validation_batch`): the noise seed, how many rows are samples (the rest pad the batch to the mesh)
    and what each sample is, written as <step>.json beside the pictures."""
    seed = 0 if meta is None else int(meta["seed"])
    x = multihost_utils.process_allgather(
        sample_fn(state.student_ema, teacher, batch, jax.random.PRNGKey(seed)), tiled=True
    )
    host_batch = {
        k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in batch.items() if k != "text"
    }
    count = len(x) if meta is None else int(meta["count"])
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        described = ""
        if meta is not None:
            step = int(path.stem)
            record = {"step": step, "seed": seed, "samples": meta["samples"]}
            paths.write_text_atomic(path.with_suffix(".json"), json.dumps(record, indent=1))
            described = f"; {path.stem}.json says what each is"
        cli.say(f"writing samples -> {path} ({count} samples{described})")
        write_samples(np.asarray(x)[:count], {k: v[:count] for k, v in host_batch.items()}, str(path), writer)


def check_batches(source, batch_size: int, fits: Callable[[int], bool] = lambda b: True) -> list[str]:
    """Records and buckets against the batch size, from the source's metadata alone (seconds, before the mesh
    plan): a ValueError naming config.data.batch_size and the largest value that works (`fits(b)`: a mesh can
    split b), or notes for the log (buckets smaller than a batch, whose records are never trained on)."""
    sizes = {name: len(source) if idx is None else len(idx) for name, _, idx in data.format.source_buckets(source)}
    n, largest = len(source), max(sizes.values())

    def fix(limit: int) -> str:
        b = next((b for b in range(min(limit, batch_size - 1), 0, -1) if fits(b)), None)
        return f"set --config.data.batch_size={b}" if b else "no smaller batch splits over the devices (config.mesh)"

    if n < batch_size:
        raise ValueError(
            f"the dataset has {n} records, fewer than one batch of {batch_size} (config.data.batch_size): "
            f"{fix(n)}, or add records."
        )
    if largest < batch_size:
        raise ValueError(
            f"no bucket holds a whole batch of {batch_size} (config.data.batch_size; every batch is one bucket, "
            f"bucket sizes {sizes}); the largest holds {largest}: {fix(largest)}, or prepare more clips of one "
            "aspect ratio."
        )
    small = {name: k for name, k in sizes.items() if k < batch_size}
    if small:
        return [f"note: buckets {small} hold fewer records than a batch of {batch_size}: they are never trained on."]
    return []


def _batch_fits(config, net_config) -> Callable[[int], bool]:
    """Whether a global batch of b splits over a mesh of config.mesh on this run's devices."""
    devices = jax.devices()
    request = sharding.mesh_request(config.mesh)
    if sharding.is_auto(request):
        return lambda b: bool(plan.candidates(len(devices), b, net_config.num_heads, request))
    try:
        mesh = sharding.make_mesh(request, devices=devices)
    except ValueError:  # a mesh that cannot be built fails with its own message once the run builds it
        return lambda b: True

    def fits(b: int) -> bool:
        try:
            sharding.check_batch(b, mesh)
        except ValueError:
            return False
        return True

    return fits


def check_sample_records(source, records: tuple) -> tuple[int, ...]:
    """config.sample.records as ints, checked at start: in range and all of one bucket (the samples are one batch)."""
    n = len(source)
    if not all(isinstance(r, (int, np.integer)) and 0 <= r < n for r in records):
        raise ValueError(
            f"config.sample.records={tuple(records)}: give record indices in [0, {n}), e.g. "
            "--config.sample.records='(0, 1)'."
        )
    bucket_of = {}
    for name, _, idx in data.format.source_buckets(source):
        for r in records if idx is None else set(records) & {int(i) for i in idx}:
            bucket_of[int(r)] = name
    if len(set(bucket_of.values())) > 1:
        raise ValueError(
            f"config.sample.records={tuple(records)} come from several buckets {bucket_of}; the samples are one "
            "batch: pick records of one bucket."
        )
    return tuple(int(r) for r in records)


class _IndexLog:
    """A record source that notes the indices read (to name the records of the data order's first batch)."""

    def __init__(self, source):
        self._source, self.read = source, []

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self._source[index]

    def __getattr__(self, name):  # buckets, spec, record_name, text_kind, ...
        return getattr(self._source, name)


def validation_batch(config, source, records: tuple[int, ...], mesh, cond_frame_probs) -> tuple[dict, dict]:
    """(global batch, meta) of the run's validation samples: the records `records` (() = the first batch of the
    data order at data.seed), repeated to a multiple of the mesh's batch shards, with num_cond_frames fixed here
    (config.sample.num_cond_frames, else the record's, else drawn once with config.sample.seed), so that every
    sample call and `meta` (what `save_samples` writes as <step>.json) agree."""
    batch_size = int(config.data.batch_size)
    if not records:
        log = _IndexLog(source)
        first = data.make_dataset(log, batch_size, int(config.data.seed), process_slice=slice(0, batch_size))
        log.read.clear()  # building it may read a record for its shapes
        first[0]
        records = tuple(log.read)
    specs = {}
    for _, spec, idx in data.format.source_buckets(source):
        for r in records if idx is None else set(records) & {int(i) for i in idx}:
            specs[r] = spec
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape)
    size = -(-len(records) // shards) * shards
    rows = [records[k % len(records)] for k in range(size)]
    loaded = {r: data.validate_record(source[r], specs[r], data.format.record_name(source, r)) for r in records}
    host = {k: np.stack([loaded[r][k] for r in rows]) for k in loaded[records[0]]}
    frames, seed, fixed = host["latents"].shape[2], int(config.sample.seed), int(config.sample.num_cond_frames)
    if fixed >= frames:
        raise ValueError(f"config.sample.num_cond_frames={fixed} must be below the data's {frames} latent frames.")
    drawn = np.random.default_rng(seed).choice(len(cond_frame_probs), size=len(records), p=cond_frame_probs)
    given = host.get("num_cond_frames", np.full(size, -1))
    cond, how = [], []
    for k in range(len(records)):
        if fixed >= 0:
            cond.append(fixed), how.append("config.sample.num_cond_frames")
        elif given[k] >= 0:
            cond.append(int(given[k])), how.append("the record")
        else:
            cond.append(int(drawn[k])), how.append(f"drawn from distill.cond_frame_probs with sample.seed {seed}")
    host["num_cond_frames"] = np.asarray([cond[k % len(records)] for k in range(size)], np.int32)
    info = getattr(source, "info", None)
    samples = []
    for k, r in enumerate(records):
        about = {"sample": k, "record": r}
        if info is not None:
            about.update(info(r))  # caption, source video, frames, bucket
        if "prompt" in loaded[r]:
            about["prompt"] = int(loaded[r]["prompt"])
        about.update(num_cond_frames=cond[k], num_cond_frames_from=how[k], latent_frames=int(frames))
        samples.append(about)
    local = sharding.local_batch_slice(size, mesh)
    batch = sharding.global_batch({k: v[local] for k, v in host.items()}, size, mesh)
    return batch, {"seed": seed, "count": len(records), "samples": samples}
