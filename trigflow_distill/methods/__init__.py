"""Distillation methods (docs/algorithm.md §4-6, §14): a method is a module here plus one line in `METHODS`.

A method module provides `algo_from_config(config, net_config, mesh, text_kind) -> Algo`, a frozen dataclass that
the jitted updates close over (its `student_update_fn` when the student loss is not DMD2's). The pieces every
method shares: `train_state` (the TrainState, skip and EMA machinery) and `video2world` (the Video2World
conditioning and the one x0 builder / sampling path).
"""

from trigflow_distill.methods import dmd2, rcm

METHODS = {
    "dmd2": dmd2.algo_from_config,
    "rcm": rcm.algo_from_config,
}


def algo_from_config(config, net_config, mesh=None, text_kind=None):
    """The algorithm of config.distill.method (one of `METHODS`) for the network `net_config` on `mesh`."""
    method = config.distill.method
    if method not in METHODS:
        raise ValueError(f"distill.method={method!r}: use one of {sorted(METHODS)}.")
    return METHODS[method](config, net_config, mesh, text_kind)
