"""Device mesh, parameter / optimizer-state / batch shardings, and host->global array helpers.

Mesh axes (data, fsdp, seq) come from a config dict such as {"data": 1, "fsdp": -1, "seq": 1} (one -1 fills the
remaining devices; a 0 in a run's config.mesh leaves the size to `memplan.run_mesh`, see `mesh_request`).
Parameters and optimizer states are sharded over `fsdp` and `seq` together (large tensors; the `seq` devices of one
sample would otherwise each hold a full copy) or replicated (small ones);
a batch is sharded along its leading axis over ("data", "fsdp") and replicated over every other axis (e.g. `seq`).
Everything here works in single- and multi-process runs: arrays that span processes are only built with
`jax.make_array_from_callback` / `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"
PARAM_AXES = ("fsdp", "seq")  # mesh axes that shard parameters and optimizer states (ZeRO-3 style)
MESH_AXES = ("data", "fsdp", "seq")
MESH_OPTIONS = ("device_memory_gib",)  # config.mesh fields that are not axis sizes (see memplan.run_mesh)
BATCH_AXES = ("data", "fsdp")
# Tensors with fewer elements stay replicated: sharding them saves little memory and costs a collective each.
DEFAULT_MIN_SIZE = 1 << 14


def _check_axis_names(names, where: str) -> None:
    unknown = [a for a in names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r} in {where}; the axes are {', '.join(MESH_AXES)}.")


def mesh_request(mesh_section: Mapping[str, Any], where: str = "config.mesh") -> dict[str, int]:
    """Axis sizes of a run's config.mesh (its MESH_OPTIONS left out), validated; `where` names it in errors.

    Sizes: positive, -1 (fills the devices the others leave) or 0 (chosen at start by `memplan.run_mesh` from the
    device count and memory; the sizes given are kept). An axis left out is 1. -1 and 0 do not mix.
    """
    sizes = {a: int(v) for a, v in dict(mesh_section).items() if a not in MESH_OPTIONS}
    _check_axis_names(sizes, where)
    if any(v < -1 for v in sizes.values()) or (-1 in sizes.values() and 0 in sizes.values()):
        raise ValueError(
            f"{where} sizes {sizes}: use positive sizes, -1 (fill the remaining devices) or 0 "
            "(chosen automatically), without mixing -1 and 0."
        )
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def is_auto(request: Mapping[str, int]) -> bool:
    """Whether a `mesh_request` leaves some size to the automatic choice."""
    return 0 in request.values()


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over `devices` (default: all, across processes) with the axes and sizes of `mesh_config`, in order.

    Axis names: MESH_AXES. One size may be -1: it takes whatever devices the others leave. Axes are laid out in
    the order data, fsdp, seq (so ConfigDict's key sorting does not matter; `seq`, the most communication-heavy,
    is innermost). All axes are `AxisType.Auto` (jit decides intermediate shardings).
    """
    devices = list(jax.devices() if devices is None else devices)
    config = dict(mesh_config)
    if not config:
        raise ValueError("mesh config is empty; give axis sizes, e.g. {'data': 1, 'fsdp': -1, 'seq': 1}.")
    _check_axis_names(config, f"mesh {config}")
    names = tuple(a for a in MESH_AXES if a in config)
    sizes = [int(config[a]) for a in names]
    if 0 in sizes:
        raise ValueError(
            f"mesh {config}: size 0 (chosen automatically) is resolved by memplan.run_mesh at the "
            "start of a run; give positive sizes or -1 here."
        )
    if any(s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1 (fill), got {config}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill the remaining devices), got {config}.")
    n = len(devices)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh {config}: the fixed axes need a multiple of {known} devices, but there are {n} devices."
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {config} has {math.prod(sizes)} devices (product {' x '.join(map(str, sizes))}), but there are "
            f"{n} devices; make the product equal {n} or set one axis to -1."
        )
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _axis_size(mesh: Mesh, name: str) -> int:
    return mesh.shape[name] if name in mesh.shape else 1


def param_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_MIN_SIZE, axis: Any = FSDP) -> P:
    """PartitionSpec of one parameter: `axis` (a mesh axis name or a tuple of names, `fsdp_size` devices in all)
    on its largest dim divisible by `fsdp_size`, or replicated.

    Tensors with >= 3 dims are stacked block tensors (N, in, out): their leading (layer) dim is used only when
    no other dim divides, so that scanning over blocks gathers one layer at a time, not the whole stack.
    """
    shape = tuple(shape)
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if len(shape) >= 3 and any(d > 0 for d in dims):
        dims = [d for d in dims if d > 0]
    if not dims:
        return P()
    best = max(dims, key=lambda d: (shape[d], -d))  # largest; ties -> the earlier dim
    spec = [None] * len(shape)
    spec[best] = axis
    return P(*spec)


def param_sharding(params: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """Tree of NamedSharding matching `params` (arrays or ShapeDtypeStructs); see `param_spec` for the rule.

    Parameters are split over the PARAM_AXES of size > 1 in `mesh` (fsdp, seq: "fsdp" alone when seq is 1)."""
    axes = tuple(a for a in PARAM_AXES if _axis_size(mesh, a) > 1) or (FSDP,)
    size = math.prod(_axis_size(mesh, a) for a in axes)
    axis = axes[0] if len(axes) == 1 else axes
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), size, min_size, axis)), params)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value every device holds entirely (scalars, PRNG keys, step counters)."""
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: those of ("data", "fsdp") present in the mesh."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of any array whose leading axis is the batch: split over ("data", "fsdp"), replicated elsewhere."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless `batch_size` splits evenly over the batch axes of `mesh`."""
    n = math.prod(_axis_size(mesh, a) for a in batch_axes(mesh))
    if batch_size <= 0 or batch_size % n:
        sizes = {a: _axis_size(mesh, a) for a in batch_axes(mesh)}
        raise ValueError(
            f"batch size {batch_size} does not divide over the batch mesh axes {sizes} (= {n} shards); "
            f"use a positive multiple of {n}."
        )


def opt_state_sharding(optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of `optimizer.init(params)`: each per-parameter leaf (mu, nu, ...) like its parameter,
    everything else (counts, scalars) replicated. `params` may be abstract (ShapeDtypeStructs)."""
    abstract_state = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state, param_shardings, transform_non_params=lambda _: replicated(mesh)
    )


def init_opt_state(
    optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> tuple[Any, Any]:
    """(opt_state, its shardings), created directly in the sharded layout (a plain `optimizer.init` or
    `jax.jit(optimizer.init)` would put parts of it on one device)."""
    shardings = opt_state_sharding(optimizer, params, param_shardings, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params), shardings


def put_global(tree: Any, shardings: Any) -> Any:
    """Host values (numpy / fully addressable, identical on every process) -> global arrays with `shardings`.

    Each process only materialises the shards its own devices hold.
    """

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def local_batch_slice(batch_size: int, mesh: Mesh) -> slice:
    """Rows of the global batch that this process's devices hold under `batch_sharding(mesh)`.

    The data pipeline of each process loads exactly these rows (see `data.make_dataset(process_slice=...)`).
    """
    check_batch(batch_size, mesh)
    sharding = batch_sharding(mesh)
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    rows = sorted({i for idx in index_map.values() for i in range(*idx[0].indices(batch_size))})
    lo, hi = rows[0], rows[-1] + 1
    if rows != list(range(lo, hi)):
        raise ValueError(
            f"this process's devices hold non-contiguous batch rows {rows}; build the mesh so that "
            "each process's devices are adjacent along the batch axes."
        )
    return slice(lo, hi)


def global_batch(local_batch: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process host batch (rows `local_batch_slice(batch_size, mesh)`) -> dict of global arrays with leading
    dim `batch_size`, sharded by `batch_sharding(mesh)`."""
    rows = local_batch_slice(batch_size, mesh)
    sharding = batch_sharding(mesh)
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"batch entry {name!r} has shape {x.shape}; this process expects "
                f"{rows.stop - rows.start} rows (global batch {batch_size})."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:])
    return out
