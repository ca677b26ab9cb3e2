"""Multi-host start-up: `jax.distributed.initialize` driven by flags or the environment.

TPU VM slices and SLURM jobs are detected by JAX itself; other clusters pass the coordinator address,
process count and id explicitly (main.py flags or TRIGFLOW_COORDINATOR / TRIGFLOW_NUM_PROCESSES /
TRIGFLOW_PROCESS_ID). A single process on one machine needs nothing.

Several processes on one machine (the loopback tests) work on CPU too: give each process its devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N; cross-process CPU collectives use gloo (JAX's default).

A lost process stops the others: JAX's coordination service notices its missing heartbeats within
`heartbeat_timeout_s` (TRIGFLOW_HEARTBEAT_TIMEOUT_S) and terminates every other process (SIGABRT) with
"Terminating process because the JAX distributed service detected fatal errors ... another task died" and the
id of the lost task; a lost process 0 (the coordinator) is noticed at once ("Socket closed"). Restarting all
processes resumes from the last complete checkpoint.
"""

import os

import jax
from absl import logging

DEFAULT_HEARTBEAT_TIMEOUT_S = 60


def _cluster_detected() -> bool:
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_multi = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm_multi or tpu_multi


def _env_int(name: str):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


def initialize(
    coordinator_address=None, num_processes=None, process_id=None, timeout_s: int = 300, heartbeat_timeout_s=None
):
    """Joins the process group if this run spans several processes; a no-op for a single process.

    Call it before anything touches the JAX backend (jax.devices(), any computation). `heartbeat_timeout_s`
    (default TRIGFLOW_HEARTBEAT_TIMEOUT_S, else 60): how long a silent process may stay silent before all
    others are stopped.
    """
    coordinator_address = coordinator_address or os.environ.get("TRIGFLOW_COORDINATOR")
    if num_processes is None:
        num_processes = _env_int("TRIGFLOW_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("TRIGFLOW_PROCESS_ID")
    if heartbeat_timeout_s is None:
        env = _env_int("TRIGFLOW_HEARTBEAT_TIMEOUT_S")
        heartbeat_timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S if env is None else env
    if heartbeat_timeout_s < 1:
        raise ValueError(f"heartbeat timeout must be >= 1 s, got {heartbeat_timeout_s}.")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "Multi-host needs all of --coordinator_address, --num_processes and --process_id "
                f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})."
            )
        if num_processes == 1:
            return
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    elif _cluster_detected():
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
        return
    logging.info(
        "process %d of %d joined (%d of %d devices local); a process silent for %d s stops all others.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        heartbeat_timeout_s,
    )


def is_main_process() -> bool:
    """Logging, metrics and pictures come from process 0 only."""
    return jax.process_index() == 0


def is_single_process() -> bool:
    return jax.process_count() == 1
