"""Multi-host start-up: `jax.distributed.initialize` driven by flags or the environment.

TPU VM slices and SLURM jobs are detected by JAX itself; other clusters pass the coordinator address,
process count and id explicitly (main.py flags or TRIGFLOW_COORDINATOR / TRIGFLOW_NUM_PROCESSES /
TRIGFLOW_PROCESS_ID). A single process on one machine needs nothing.
"""
import os

import jax


def _cluster_detected() -> bool:
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_multi = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm_multi or tpu_multi


def initialize(coordinator_address=None, num_processes=None, process_id=None, timeout_s: int = 300):
    """Joins the process group if this run spans several processes; a no-op for a single process."""
    coordinator_address = coordinator_address or os.environ.get("TRIGFLOW_COORDINATOR")
    if num_processes is None and "TRIGFLOW_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["TRIGFLOW_NUM_PROCESSES"])
    if process_id is None and "TRIGFLOW_PROCESS_ID" in os.environ:
        process_id = int(os.environ["TRIGFLOW_PROCESS_ID"])
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("Multi-host needs all of --coordinator_address, --num_processes and --process_id "
                             f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}).")
        if num_processes == 1:
            return
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    elif _cluster_detected():
        jax.distributed.initialize(initialization_timeout=timeout_s)


def is_main_process() -> bool:
    """Logging, metrics and pictures come from process 0 only."""
    return jax.process_index() == 0
