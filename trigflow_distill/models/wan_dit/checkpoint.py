"""Wan2.1 DiT weights from safetensors, without torch: the release layout (`diffusion_pytorch_model.safetensors`,
or the 14B's shards with `diffusion_pytorch_model.safetensors.index.json`, optionally under ComfyUI's
`model.diffusion_model.` prefix) or diffusers' `WanTransformer3DModel` folder (or a pipeline's `transformer/`).

`load(src)` -> (config, params): the layout is told from the keys, the architecture inferred from the shapes, the
heads and text length taken from a config.json next to the weights (else the Wan2.1 defaults, see
`names.infer_config`). `save(dst, config, params, layout=)` writes either layout as one safetensors file plus its
config.json (the way back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from trigflow_distill.models import hub, torchfile
from trigflow_distill.models.wan_dit import names
from trigflow_distill.models.wan_dit.network import WanDiTConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
LAYOUTS = ("native", "diffusers")


class LazyStateDict(Mapping):
    """`{name: array}` over safetensors files, reading a tensor only when it is accessed (memory-mapped reads)."""

    def __init__(self, where: Mapping[str, tuple[str, str]], shapes: Mapping[str, tuple[int, ...]]):
        self.where, self.shapes = dict(where), dict(shapes)  # where: name -> (file, key in file)

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        file, key = self.where[name]
        with safe_open(file, framework="np") as st:
            return st.get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def renamed(self, mapping: Mapping[str, str]) -> LazyStateDict:
        """The same tensors under new names (`mapping`: new name -> old name)."""
        return LazyStateDict(
            {n: self.where[o] for n, o in mapping.items()}, {n: self.shapes[o] for n, o in mapping.items()}
        )


def _weight_files(path: str) -> tuple[list[str], dict]:
    """The safetensors files of `path` (a file, an index json or a folder) and the folder's config.json (or {})."""
    if os.path.isdir(path):
        folder = next((d for d in (path, os.path.join(path, "transformer")) if _has_weights(d)), None)
        if folder is None:
            raise FileNotFoundError(f"{path}: no .safetensors weights (nor in transformer/); .pth is not supported")
        index = [f for f in os.listdir(folder) if f.endswith(".safetensors.index.json")]
        if len(index) > 1:
            raise ValueError(f"{folder}: several index files {sorted(index)}; pass one of them")
        if index:
            return _weight_files(os.path.join(folder, index[0]))
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
        return files, _config_json(folder)
    folder = os.path.dirname(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))], _config_json(folder)
    if path.endswith(".safetensors"):
        return [path], _config_json(folder)
    raise ValueError(f"{path}: expected a .safetensors file, a .safetensors.index.json or a folder holding them")


def _has_weights(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder))


def _config_json(folder: str) -> dict:
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def open_state_dict(src: str | os.PathLike) -> tuple[LazyStateDict, dict]:
    """(lazy native-named state dict, config.json fields) of a release or diffusers checkpoint, local or hf://."""
    from safetensors import safe_open

    path = os.fspath(hub.resolve_local(src, "a Wan2.1 DiT checkpoint"))
    files, cfg_json = _weight_files(path)
    where, shapes = {}, {}
    for file in files:
        torchfile.safetensors_header(file)  # a damaged file: an error naming it, before safetensors maps it
        with safe_open(file, framework="np") as st:
            for key in st.keys():
                if key in where:
                    raise ValueError(f"{path}: tensor {key} is in both {where[key][0]} and {file}")
                where[key], shapes[key] = (file, key), tuple(st.get_slice(key).get_shape())
    sd = LazyStateDict(where, shapes)
    keys = list(sd)
    if names.is_diffusers(keys):
        native = names.native_from_diffusers({k: k for k in keys})
    elif any(k.startswith(names.NATIVE_PREFIX) for k in keys):
        native = {k[len(names.NATIVE_PREFIX) :]: k for k in keys if k.startswith(names.NATIVE_PREFIX)}
    else:
        native = {k: k for k in keys}
    try:
        names.check_family(native)
        return sd.renamed(native), names.config_fields(cfg_json) if cfg_json else {}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load(src: str | os.PathLike, **overrides) -> tuple[WanDiTConfig, dict]:
    """(config, numpy param tree in the checkpoint's dtype) of a Wan2.1 DiT checkpoint; `overrides` replace config
    fields (compute options such as dtype / remat / attention, or what neither shapes nor config.json tell)."""
    sd, fields = open_state_dict(src)
    try:
        config = names.infer_config(sd.shapes, **{**fields, **overrides})
    except ValueError as e:
        raise ValueError(f"{os.fspath(src)}: {e}") from None
    return config, names.params_from_state_dict(sd, config)


def save(dst: str | os.PathLike, config: WanDiTConfig, params: Mapping, layout: str = "native") -> None:
    """`dst`/diffusion_pytorch_model.safetensors + config.json in the release (`native`) or diffusers layout."""
    from safetensors.numpy import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {LAYOUTS}")
    sd = names.state_dict_from_params(params, config)
    if layout == "diffusers":
        sd, cfg_json = names.diffusers_from_native(sd), names.diffusers_config(config)
    else:
        cfg_json = {
            "_class_name": "WanModel",
            "model_type": "t2v" if config.image_dim is None else "i2v",
            "patch_size": list(config.patch_size),
            "text_len": config.text_len,
            "in_dim": config.in_dim,
            "dim": config.dim,
            "ffn_dim": config.ffn_dim,
            "freq_dim": config.freq_dim,
            "text_dim": config.text_dim,
            "out_dim": config.out_dim,
            "num_heads": config.num_heads,
            "num_layers": config.num_layers,
            "eps": config.eps,
        }
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, WEIGHTS))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
