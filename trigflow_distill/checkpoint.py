"""Orbax checkpoints of the train state and the data iterator: periodic, keep-last-K, async, atomic.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items written together: `state` (the TrainState
pytree, StandardSave: every host writes its own shards) and `data` (the grain iterator state as JSON; it is the
same on every process, see `data.pipeline`, so a checkpoint resumes on any process count). Orbax writes into a
temporary directory and renames it when complete, so a save interrupted by a crash is never picked up.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, max_to_keep: int = 3, save_interval_steps: int = 1,
                 enable_async: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager over `<workdir>/checkpoints` (created). `save` writes exactly the steps divisible by
    `save_interval_steps` (and any step when JAX reports a preemption, or when forced); leftovers of interrupted
    saves are deleted at start."""
    if max_to_keep < 1 or save_interval_steps < 1:
        raise ValueError(f"max_to_keep ({max_to_keep}) and save_interval_steps ({save_interval_steps}) must be >= 1.")
    policies = ocp.checkpoint_managers
    # Orbax's default policy also saves the first step it sees; saving on the interval only keeps runs regular.
    when = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                   policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_decision_policy=when, create=True,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=enable_async)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None,
         force: bool = False) -> bool:
    """Save `state` (pytree of jax arrays) and `data_iterator.get_state()` (its position now) as `step`.

    Returns whether a save was started (False between `save_interval_steps`). With async checkpointing the
    arrays are copied off the devices before this returns, so `state` may be donated right after.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`, the target of `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any = None) -> tuple[Any, int]:
    """(state, step) of the latest complete checkpoint, or (None, 0) when there is none.

    `abstract_state`: the TrainState tree of jax.ShapeDtypeStruct with the shardings to restore into (any mesh,
    not necessarily the one that saved it; see `abstract_like`). `data_iterator`, if given, is moved to the
    saved position.
    """
    step = manager.latest_step()
    if step is None:
        return None, 0
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
        if restored["data"] is None:
            raise ValueError(f"checkpoint {step} in {manager.directory} has no data iterator state.")
        data_iterator.set_state(restored["data"])
    return restored["state"], int(step)


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Block until pending async saves are written (call before exiting and before reading checkpoints)."""
    manager.wait_until_finished()
