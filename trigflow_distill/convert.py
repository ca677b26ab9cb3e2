"""Cosmos Predict2.5 DiT weights: PyTorch `.pt` / diffusers folder <-> Flax params (numpy trees) <-> Orbax.

A converted checkpoint (the CLI's output and `load_teacher`'s cache entries) is a folder with `params/` (Orbax
StandardCheckpointer) and `source.json` (native tensor shapes and config fields stated by the source), so the
architecture is re-inferred exactly as on the direct path and compute options can be overridden at load time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from trigflow_distill import torchfile
from trigflow_distill.networks import DiTConfig
from trigflow_distill.networks import state_dict as sdmap

_PREFIXES = ("net_ema.", "net.")  # auto: the EMA weights (the distillation teacher) when both are present
_DIFFUSERS_CLASS = "CosmosTransformer3DModel"
_SOURCE_JSON = "source.json"
_HASH_BYTES = 1 << 20
_PROGRESS_MIN_BYTES = 64 << 20  # smaller sources convert in a blink: no bar


def _select_prefix(path: str, keys, prefix: str) -> str:
    present = [p for p in _PREFIXES if any(k.startswith(p) for k in keys)]
    if prefix == "auto":
        return present[0] if present else ""
    if prefix and prefix not in present:
        raise ValueError(f"{path}: no keys with prefix {prefix!r}; prefixes present: {present or 'none'}")
    return prefix


class _Progress:
    """Byte progress bar on stderr (for sources of at least 64 MiB). A key seen again starts a new pass (a
    consumer may touch every tensor once to check shapes before reading them), so the bar restarts."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.seen, self.shown = max(total, 1), label, 0, set(), -1

    def __call__(self, key: str, nbytes: int) -> None:
        if self.total < _PROGRESS_MIN_BYTES:
            return
        if key in self.seen:
            self.seen, self.done, self.shown = set(), 0, -1
        self.seen.add(key)
        self.done += nbytes
        pct = min(100, 100 * self.done // self.total)
        if pct != self.shown:
            self.shown = pct
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            end = "\n" if pct == 100 else ""
            print(f"\r{self.label} [{bar}] {pct:3d}% {self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB",
                  end=end, file=sys.stderr, flush=True)


def _torch_source(path: str, prefix: str, progress: bool) -> tuple[Mapping, dict]:
    """Lazy native state dict (prefix stripped, ignored keys dropped) of a `.pt` file, and no config fields."""
    lazy = torchfile.LazyStateDict(path)
    chosen = _select_prefix(path, lazy.refs, prefix)
    names = {k[len(chosen):]: k for k in lazy.refs if k.startswith(chosen) and not sdmap.is_ignored(k[len(chosen):])}
    if not names:
        raise ValueError(f"{path}: no tensors under prefix {chosen!r}")
    sub = lazy.subset(names)
    if progress:
        sub.on_read = _Progress(sum(r.nbytes for r in sub.refs.values()), os.path.basename(path))
    return sub, {}


def _diffusers_dir(path: str) -> str:
    """The model folder itself or a pipeline's `transformer/` subfolder."""
    for d in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"{path}: no config.json (expected a diffusers {_DIFFUSERS_CLASS} folder)")


def _diffusers_source(path: str, progress: bool) -> tuple[Mapping, dict]:
    """Native state dict and config fields of a diffusers CosmosTransformer3DModel folder."""
    from safetensors import safe_open

    folder = _diffusers_dir(path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("_class_name") != _DIFFUSERS_CLASS:
        raise ValueError(f"{folder}: wrong model family: config.json _class_name is {cfg.get('_class_name')!r}, "
                         f"expected {_DIFFUSERS_CLASS!r}")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (bin weights are not supported)")
    sd = {}
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    bar = _Progress(total, os.path.basename(os.path.normpath(path))) if progress else None
    for name in files:
        with safe_open(os.path.join(folder, name), framework="np") as st:
            for k in st.keys():
                sd[k] = st.get_tensor(k)
                if bar:
                    bar(k, sd[k].nbytes)
    pt, ps, ps_w = cfg.get("patch_size", (1, 2, 2))
    rope = cfg.get("rope_scale", (1.0, 3.0, 3.0))
    if ps != ps_w:
        raise ValueError(f"{folder}: non-square patch_size {cfg['patch_size']} is not supported")
    if cfg.get("extra_pos_embed_type") not in (None, "none"):
        raise ValueError(f"{folder}: extra_pos_embed_type={cfg['extra_pos_embed_type']!r} (Cosmos 1.0 style) is not "
                         "a Predict2.5 DiT")
    fields = dict(patch_temporal=pt, patch_spatial=ps, rope_t_extrapolation_ratio=rope[0],
                  rope_h_extrapolation_ratio=rope[1], rope_w_extrapolation_ratio=rope[2],
                  concat_padding_mask=cfg.get("concat_padding_mask", True))
    try:
        return sdmap.native_from_diffusers(sd), fields
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None


def _source(path: str | os.PathLike, prefix: str = "auto", progress: bool = False) -> tuple[Mapping, dict]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if os.path.isdir(path):
        return _diffusers_source(path, progress)
    return _torch_source(path, prefix, progress)


def _shapes(sd: Mapping) -> dict[str, tuple[int, ...]]:
    if isinstance(sd, torchfile.LazyStateDict):
        return sd.shapes
    return {k: tuple(v.shape) for k, v in sd.items()}


def _build(path: str, sd: Mapping, fields: dict, overrides: dict) -> tuple[DiTConfig, dict]:
    try:
        config = sdmap.infer_config(_shapes(sd), **{**fields, **overrides})
        return config, sdmap.params_from_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_torch_checkpoint(path: str | os.PathLike, prefix: str = "auto", progress: bool = False,
                          **config_overrides) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a native Cosmos `.pt` (no torch needed); params are numpy in the file's dtype.

    `prefix`: "auto" takes `net_ema.` when present (the teacher in training checkpoints), else `net.`, else
    unprefixed keys; or name one ("net.", "net_ema.", ""). `config_overrides`: DiTConfig fields that cannot be
    inferred (patch sizes, RoPE ratios) or compute options (dtype, remat, attention).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; use load_diffusers_folder for diffusers weights")
    sd, fields = _torch_source(path, prefix, progress)
    return _build(path, sd, fields, config_overrides)


def load_diffusers_folder(path: str | os.PathLike, progress: bool = False, **config_overrides
                          ) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a diffusers CosmosTransformer3DModel folder (config.json + safetensors)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder (expected a diffusers {_DIFFUSERS_CLASS} folder)")
    sd, fields = _diffusers_source(path, progress)
    return _build(path, sd, fields, config_overrides)


def _cast_tree(params, dtype) -> dict:
    return jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), params)


def export_torch(params, config: DiTConfig, path: str | os.PathLike, dtype=ml_dtypes.bfloat16) -> None:
    """Writes a native Cosmos `.pt` (`net.`-prefixed, bf16 by default, text projection included) that
    `torch.load(path, weights_only=True)` reads and the Cosmos network loads with `load_state_dict`."""
    sd = sdmap.state_dict_from_params(_cast_tree(params, dtype), config)
    torchfile.save(path, {f"net.{k}": v for k, v in sd.items()})


def export_diffusers(params, config: DiTConfig, out_dir: str | os.PathLike, dtype=ml_dtypes.bfloat16) -> None:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` for
    `diffusers.CosmosTransformer3DModel.from_pretrained(out_dir)` (see `state_dict.diffusers_config` about the
    q/k RMSNorm epsilon diffusers hard-codes)."""
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sd = sdmap.diffusers_from_native(sdmap.state_dict_from_params(_cast_tree(params, dtype), config))
    save_file(sd, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    cfg = {**sdmap.diffusers_config(config), "_diffusers_version": "0.42.1"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def save_converted(out_dir: str | os.PathLike, params, shapes: Mapping, fields: Mapping) -> None:
    """Writes a converted checkpoint folder (`params/` Orbax + `source.json`) atomically (tmp folder, rename)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another destination")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(tmp, "params"), params)
    with open(os.path.join(tmp, _SOURCE_JSON), "w") as f:
        json.dump({"shapes": {k: list(v) for k, v in shapes.items()}, "fields": dict(fields)}, f)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
        if not os.path.isdir(out_dir):
            raise


def load_converted(ckpt_dir: str | os.PathLike, **config_overrides) -> tuple[DiTConfig, dict]:
    """(net_config, params) from a folder written by `save_converted` (the CLI's output)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    meta_path = os.path.join(ckpt_dir, _SOURCE_JSON)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{ckpt_dir}: no {_SOURCE_JSON}; not a converted checkpoint (run "
                                "`python -m trigflow_distill.convert SRC DST` first)")
    with open(meta_path) as f:
        meta = json.load(f)
    config = sdmap.infer_config({k: tuple(v) for k, v in meta["shapes"].items()},
                                **{**meta["fields"], **config_overrides})
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(ckpt_dir, "params"))
    return config, params


def source_key(path: str | os.PathLike) -> str:
    """Cache key of a `.pt` file or diffusers folder: sizes, mtimes and a hash of each file's first MiB."""
    path = os.path.abspath(os.fspath(path))
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".json", ".safetensors")))
    h = hashlib.sha256()
    for name in files:
        st = os.stat(name)
        h.update(f"{os.path.relpath(name, path)}:{st.st_size}:{st.st_mtime_ns}:".encode())
        with open(name, "rb") as f:
            h.update(f.read(_HASH_BYTES))
    return h.hexdigest()[:20]


def load_teacher(path: str | os.PathLike, cache_dir: str | os.PathLike, prefix: str = "auto",
                 progress: bool = False, **config_overrides) -> tuple[DiTConfig, dict]:
    """(net_config, params) of a `.pt` or diffusers teacher, converted once into `cache_dir` and re-used by
    later calls while the source's size, mtime and header hash are unchanged."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    name = os.path.basename(os.path.normpath(path))
    entry = os.path.join(os.fspath(cache_dir), f"{name}-{prefix.strip('.') or 'noprefix'}-{source_key(path)}")
    if not os.path.isdir(entry):
        sd, fields = _source(path, prefix, progress)
        config, params = _build(path, sd, fields, config_overrides)
        os.makedirs(os.fspath(cache_dir), exist_ok=True)
        save_converted(entry, params, _shapes(sd), fields)
        return config, params
    return load_converted(entry, **config_overrides)


def _summary(what: str, params, seconds: float) -> str:
    leaves = jax.tree.leaves(params)
    count = sum(int(np.prod(np.shape(a))) for a in leaves)
    dtypes = "/".join(sorted({str(np.asarray(a).dtype) for a in leaves}))
    return f"{what}: {count:,} params ({count / 1e9:.3f} B), dtype {dtypes}, {seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trigflow_distill.convert",
        description="Convert a Cosmos Predict2.5 DiT between PyTorch (.pt or diffusers folder) and an Orbax "
                    "checkpoint folder of Flax params. Without flags: SRC (.pt / diffusers folder) -> DST Orbax.")
    parser.add_argument("src", help="source: .pt file or diffusers folder; with --export-*: a converted folder")
    parser.add_argument("dst", help="destination folder (Orbax), .pt file or diffusers folder")
    way = parser.add_mutually_exclusive_group()
    way.add_argument("--export-torch", action="store_true", help="SRC converted folder -> DST native .pt (bf16)")
    way.add_argument("--export-diffusers", action="store_true", help="SRC converted folder -> DST diffusers folder")
    parser.add_argument("--prefix", default="auto", help="key prefix of a .pt: auto (net_ema. > net. > none), "
                                                         "'net.', 'net_ema.' or ''")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="tensor dtype written by --export-* (default bfloat16)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.export_torch or args.export_diffusers:
        config, params = load_converted(args.src)
        dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
        (export_torch if args.export_torch else export_diffusers)(params, config, args.dst, dtype=dtype)
        params = _cast_tree(params, dtype)
    else:
        sd, fields = _source(args.src, args.prefix, progress=True)
        config, params = _build(args.src, sd, fields, {})
        save_converted(args.dst, params, _shapes(sd), fields)
    print(_summary(f"{args.src} -> {args.dst}", params, time.perf_counter() - start), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
