"""Wan2.1 DiT tensor names: the release's `WanModel` ("native") and diffusers' `WanTransformer3DModel` layouts <->
the JAX param tree of `wan_dit.network` (numpy only).

Torch Linear weights are (out, in), our kernels (in, out); the patch embedding's Conv3d weight (D, in_dim, pt, ph,
pw) is our (in_dim * pt * ph * pw, D) kernel; the (1, k, D) modulation tables lose their leading 1. Diffusers holds
the same tensors under other names (its single-file conversion, `convert_wan_transformer_to_diffusers`); note that
its block `norm2` is the release's `norm3` (the cross-attention LayerNorm) and its `norm3` the FFN's (no weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from trigflow_distill.models.wan_dit.network import WanDiTConfig, param_shapes

# What the shapes cannot tell: all Wan2.1 releases use 128-channel heads (1.3B: 1536 / 12, 14B: 5120 / 40).
DEFAULT_HEAD_DIM = 128
# ComfyUI-style single files keep the release names under this prefix.
NATIVE_PREFIX = "model.diffusion_model."


def _linear(native, path):
    return {f"{native}.weight": (path + ("kernel",), "linear"), f"{native}.bias": (path + ("bias",), "copy")}


def _norm(native, path, bias=True):
    out = {f"{native}.weight": (path + ("scale",), "copy")}
    if bias:
        out[f"{native}.bias"] = (path + ("bias",), "copy")
    return out


# native name -> (param path, layout kind); kinds: "linear" (transpose), "conv" (patch embedding), "table" (drop
# the leading 1), "copy". Entries whose path the config's tree lacks (I2V parts, norm3) are left out per config.
_GLOBAL = {
    "patch_embedding.weight": (("patch_embedding", "kernel"), "conv"),
    "patch_embedding.bias": (("patch_embedding", "bias"), "copy"),
    **_linear("text_embedding.0", ("text_embedding", "linear_1")),
    **_linear("text_embedding.2", ("text_embedding", "linear_2")),
    **_linear("time_embedding.0", ("time_embedding", "linear_1")),
    **_linear("time_embedding.2", ("time_embedding", "linear_2")),
    **_linear("time_projection.1", ("time_projection",)),
    **_linear("head.head", ("head", "linear")),
    "head.modulation": (("head", "modulation"), "table"),
    **_norm("img_emb.proj.0", ("img_emb", "norm_1")),
    **_linear("img_emb.proj.1", ("img_emb", "linear_1")),
    **_linear("img_emb.proj.3", ("img_emb", "linear_2")),
    **_norm("img_emb.proj.4", ("img_emb", "norm_2")),
}
_PER_BLOCK = {
    **{k: v for a in ("q", "k", "v", "o") for k, v in _linear(f"self_attn.{a}", ("self_attn", a)).items()},
    **_norm("self_attn.norm_q", ("self_attn", "norm_q"), bias=False),
    **_norm("self_attn.norm_k", ("self_attn", "norm_k"), bias=False),
    **{
        k: v
        for a in ("q", "k", "v", "o", "k_img", "v_img")
        for k, v in _linear(f"cross_attn.{a}", ("cross_attn", a)).items()
    },
    **{
        k: v
        for a in ("q", "k", "k_img")
        for k, v in _norm(f"cross_attn.norm_{a}", ("cross_attn", f"norm_{a}"), False).items()
    },
    **_norm("norm3", ("norm3",)),
    **_linear("ffn.0", ("ffn", "linear_1")),
    **_linear("ffn.2", ("ffn", "linear_2")),
    "modulation": (("modulation",), "table"),
}

# native module -> diffusers module (the ".weight" / ".bias" suffix is kept)
_DIFFUSERS_GLOBAL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_DIFFUSERS_BLOCK = {
    **{f"self_attn.{a}": f"attn1.{d}" for a, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    **{
        f"cross_attn.{a}": f"attn2.{d}"
        for a, d in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("k_img", "add_k_proj"),
            ("v_img", "add_v_proj"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
            ("norm_k_img", "norm_added_k"),
        )
    },
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# whole-tensor renames (no module suffix)
_DIFFUSERS_TABLES = {"head.modulation": "scale_shift_table"}
_DIFFUSERS_BLOCK_TABLES = {"modulation": "scale_shift_table"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _fmt(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def is_native(names) -> bool:
    names = set(names)
    return "time_projection.1.weight" in names and "patch_embedding.weight" in names


def is_diffusers(names) -> bool:
    names = set(names)
    return "condition_embedder.time_proj.weight" in names and "patch_embedding.weight" in names


def check_family(names) -> None:
    """A clear error when the keys are not a native Wan2.1 DiT state dict (no prefix)."""
    names = list(names)
    if is_native(names):
        return
    if any(n.startswith(NATIVE_PREFIX) for n in names):
        hint = f"keys carry a {NATIVE_PREFIX!r} prefix: strip it first (checkpoint.open_state_dict does)"
    elif is_diffusers(names):
        hint = "this is a diffusers WanTransformer3DModel state dict: map it with native_from_diffusers first"
    else:
        hint = "wrong model family: expected a Wan2.1 WanModel with patch_embedding.weight and time_projection.1.weight"
    raise ValueError(f"not a native Wan2.1 DiT state dict ({hint}); first keys: {_fmt(names, 5)}")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
    except KeyError:
        return False
    return True


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _torch_shape(kind, shape):
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "table":
        return (1, *shape)
    return tuple(shape)


def leaf_names(config: WanDiTConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Native name -> (param path, kind) of every tensor of `config` (blocks expanded, path without the block
    index: the block leaves are stacked on the tree's leading axis)."""
    shapes = param_shapes(config)
    out = {name: (path, kind) for name, (path, kind) in _GLOBAL.items() if _has(shapes, path)}
    block = {name: (path, kind) for name, (path, kind) in _PER_BLOCK.items() if _has(shapes["blocks"], path)}
    for i in range(config.num_layers):
        out.update({f"blocks.{i}.{name}": (("blocks",) + path, kind) for name, (path, kind) in block.items()})
    return out


def native_shapes(config: WanDiTConfig) -> dict[str, tuple[int, ...]]:
    """Native name -> torch tensor shape for `config` (what a release checkpoint holds)."""
    shapes = param_shapes(config)
    pt, ph, pw = config.patch_size
    out = {}
    for name, (path, kind) in leaf_names(config).items():
        shape = _get(shapes, path)
        if path[0] == "blocks":
            shape = shape[1:]
        out[name] = (config.dim, config.in_dim, pt, ph, pw) if kind == "conv" else _torch_shape(kind, shape)
    return out


def _to_tree(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
    if kind == "table":
        return a[0]
    return a


def _to_torch(a: np.ndarray, kind: str, config: WanDiTConfig) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.T.reshape(config.dim, config.in_dim, *config.patch_size))
    if kind == "table":
        return np.ascontiguousarray(a[None])
    return np.ascontiguousarray(a)


def _check_keys(names, expected, config) -> None:
    missing, unexpected = set(expected) - set(names), set(names) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config: missing keys [{_fmt(missing)}]; unexpected keys "
            f"[{_fmt(unexpected)}] (config: {config})"
        )


def params_from_state_dict(sd: Mapping[str, np.ndarray], config: WanDiTConfig) -> dict:
    """Param tree (numpy, source dtype kept) from native tensors; `sd` may be a lazy mapping (each tensor is read
    once). Missing / unexpected keys and shape mismatches raise ValueError."""
    check_family(sd.keys())
    expected = native_shapes(config)
    _check_keys(sd.keys(), expected, config)
    names = leaf_names(config)
    params: dict = {}
    stacked: dict = {}
    for name, (path, kind) in names.items():
        a = np.asarray(sd[name])
        if a.shape != expected[name]:
            raise ValueError(f"shape mismatch: {name}: {a.shape} != expected {expected[name]} (config: {config})")
        if path[0] == "blocks":
            stacked.setdefault(path, []).append(_to_tree(a, kind))
        else:
            _set(params, path, _to_tree(a, kind))
    for path, leaves in stacked.items():  # blocks.0, blocks.1, ... in order: leaf_names lists them so
        _set(params, path, np.stack(leaves))
    return params


def state_dict_from_params(params: Mapping, config: WanDiTConfig) -> dict[str, np.ndarray]:
    """Native name -> contiguous numpy tensor (torch layout, the params' dtype) for the whole tree."""
    shapes = param_shapes(config)
    bad = []

    def check(path, shape):
        if not _has(params, path) or tuple(np.shape(_get(params, path))) != tuple(shape):
            bad.append(f"{'/'.join(path)}: {np.shape(_get(params, path)) if _has(params, path) else 'missing'}")

    jax_paths = []
    _walk(shapes, (), jax_paths)
    for path, shape in jax_paths:
        check(path, shape)
    if bad:
        raise ValueError(f"params do not match the config: {'; '.join(bad[:8])}")
    sd = {}
    for name, (path, kind) in leaf_names(config).items():
        a = np.asarray(_get(params, path))
        if path[0] == "blocks":
            a = a[int(_BLOCK_KEY.match(name).group(1))]
        sd[name] = _to_torch(a, kind, config)
    return sd


def _walk(tree, prefix, out):
    if isinstance(tree, tuple):
        out.append((prefix, tree))
        return
    for k, v in tree.items():
        _walk(v, prefix + (k,), out)


# Sane limits of the sizes a checkpoint (its tensor shapes and names, its config.json) implies, checked before
# anything is built from them: the layer count comes from the tensor names alone, so one damaged name
# ("blocks.999999999.") would otherwise make the loader list a billion blocks' tensors (an out-of-memory kill).
# Wan2.1-14B: 40 layers, dim 5120, 40 heads, FFN 13824, text 4096 x 512 tokens; room for 10x larger models.
CONFIG_LIMITS = {
    "num_layers": 512,
    "dim": 1 << 16,
    "num_heads": 1024,
    "ffn_dim": 1 << 18,
    "in_dim": 4096,
    "out_dim": 4096,
    "freq_dim": 1 << 16,
    "text_dim": 1 << 20,
    "text_len": 1 << 16,
    "image_dim": 1 << 20,
}


def check_limits(values: Mapping, where: str = "the checkpoint's tensors or config.json") -> None:
    """ValueError naming the first CONFIG_LIMITS size of `values` that is not a whole number in range (absent or
    None ones skipped: image_dim of a T2V network)."""
    for name, limit in CONFIG_LIMITS.items():
        value = values.get(name)
        if value is None:
            continue
        whole = isinstance(value, (int, float, np.integer)) and not isinstance(value, bool)
        if not whole or not float(value).is_integer() or not 1 <= value <= limit:
            raise ValueError(
                f"{name} = {value!r} (from {where}) is out of range (a whole number in 1..{limit}); "
                "the file is damaged or not a Wan2.1 DiT"
            )


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> WanDiTConfig:
    """WanDiTConfig from native tensor shapes: width, input / output channels, patch size, layers, FFN width,
    time-frequency and text widths, the I2V image width (img_emb present) and cross_attn_norm (norm3 present).

    The heads are not in the shapes (q/k norms span all heads): num_heads defaults to dim / 128, as in every
    Wan2.1 release; text_len and the compute options come from `overrides` or the defaults.
    """
    names = list(shapes)
    check_family(names)
    needed = ["head.head.weight", "blocks.0.ffn.0.weight", "time_embedding.0.weight", "text_embedding.0.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the architecture: missing keys [{_fmt(missing)}]")
    d, in_dim, *patch = shapes["patch_embedding.weight"]
    patch = tuple(int(p) for p in patch)
    out = shapes["head.head.weight"][0]
    if out % int(np.prod(patch)):
        raise ValueError(f"head.head output {out} is not a multiple of the patch volume {patch}")
    layers = {int(m.group(1)) for m in map(_BLOCK_KEY.match, names) if m}
    check_limits({"dim": d, "num_layers": max(layers) + 1, **overrides})
    if "num_heads" not in overrides and d % DEFAULT_HEAD_DIM:
        raise ValueError(f"width {d} is not a multiple of {DEFAULT_HEAD_DIM}: pass num_heads")
    inferred = dict(
        dim=d,
        num_layers=max(layers) + 1,
        num_heads=d // DEFAULT_HEAD_DIM,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        in_dim=in_dim,
        out_dim=out // int(np.prod(patch)),
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        image_dim=shapes["img_emb.proj.1.weight"][1] if "img_emb.proj.1.weight" in shapes else None,
        patch_size=patch,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )
    merged = {**inferred, **overrides}
    check_limits(merged)
    return WanDiTConfig(**merged)


def _diffusers_name(name: str) -> str | None:
    """The diffusers name of a native name, or None when it has none."""
    m = _BLOCK_KEY.match(name)
    modules, tables, prefix, rest = (
        (_DIFFUSERS_BLOCK, _DIFFUSERS_BLOCK_TABLES, f"blocks.{m.group(1)}.", m.group(2))
        if m
        else (_DIFFUSERS_GLOBAL, _DIFFUSERS_TABLES, "", name)
    )
    if rest in tables:
        return prefix + tables[rest]
    module, _, suffix = rest.rpartition(".")
    if module in modules and suffix in ("weight", "bias"):
        return f"{prefix}{modules[module]}.{suffix}"
    return None


def _native_name(name: str) -> str | None:
    """The native name of a diffusers name, or None when it has none."""
    m = _BLOCK_KEY.match(name)
    modules, tables, prefix, rest = (
        (_DIFFUSERS_BLOCK, _DIFFUSERS_BLOCK_TABLES, f"blocks.{m.group(1)}.", m.group(2))
        if m
        else (_DIFFUSERS_GLOBAL, _DIFFUSERS_TABLES, "", name)
    )
    inv_tables = {v: k for k, v in tables.items()}
    if rest in inv_tables:
        return prefix + inv_tables[rest]
    inv_modules = {v: k for k, v in modules.items()}
    module, _, suffix = rest.rpartition(".")
    if module in inv_modules and suffix in ("weight", "bias"):
        return f"{prefix}{inv_modules[module]}.{suffix}"
    return None


def _rename(sd, rename, direction):
    out, unexpected = {}, []
    for name, value in sd.items():
        new = rename(name)
        if new is None:
            unexpected.append(name)
        else:
            out[new] = value
    if unexpected:
        raise ValueError(f"unexpected keys for {direction}: [{_fmt(unexpected)}]")
    return out


def diffusers_from_native(sd: Mapping) -> dict:
    """Rename native Wan2.1 keys to diffusers WanTransformer3DModel keys; same tensors (the mapping may be lazy:
    values are passed through untouched)."""
    check_family(sd.keys())
    return _rename(sd, _diffusers_name, "native -> diffusers")


def native_from_diffusers(sd: Mapping) -> dict:
    """Rename diffusers WanTransformer3DModel keys to native Wan2.1 keys; same tensors. Diffusers' unused
    `norm_added_q` keys (it ignores them on load too) are dropped."""
    if not is_diffusers(sd.keys()):
        raise ValueError(
            "wrong model family: expected a diffusers WanTransformer3DModel state dict with patch_embedding.weight "
            f"and condition_embedder.time_proj.weight; first keys: {_fmt(list(sd), 5)}"
        )
    return _rename({k: v for k, v in sd.items() if ".norm_added_q." not in k}, _native_name, "diffusers -> native")


def diffusers_config(config: WanDiTConfig) -> dict:
    """config.json kwargs of diffusers' WanTransformer3DModel equal to `config`."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
        "image_dim": config.image_dim,
        "added_kv_proj_dim": None if config.image_dim is None else config.dim,
        "rope_max_seq_len": 1024,
    }


def config_fields(cfg_json: Mapping) -> dict:
    """WanDiTConfig fields stated by a config.json, diffusers' (`WanTransformer3DModel`) or the release's
    (`WanModel`): the heads (which the shapes cannot tell) and text_len; refuses what this network does not run."""
    if cfg_json.get("_class_name") == "WanTransformer3DModel":
        if cfg_json.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={cfg_json['qk_norm']!r}: only 'rms_norm_across_heads' (Wan2.1) is supported")
        if cfg_json.get("pos_embed_seq_len") is not None:
            raise ValueError("pos_embed_seq_len is set: an FLF2V network, not supported yet")
        fields = {"num_heads": cfg_json.get("num_attention_heads")}
    else:
        if cfg_json.get("model_type", "t2v") not in ("t2v", "i2v"):
            raise ValueError(f"model_type={cfg_json['model_type']!r}: only t2v and i2v are supported")
        if not cfg_json.get("qk_norm", True) or tuple(cfg_json.get("window_size", (-1, -1))) != (-1, -1):
            raise ValueError("qk_norm off or a local window_size: not a Wan2.1 network this code runs")
        fields = {"num_heads": cfg_json.get("num_heads"), "text_len": cfg_json.get("text_len")}
    if cfg_json.get("eps") is not None:
        fields["eps"] = float(cfg_json["eps"])
    return {k: v for k, v in fields.items() if v is not None}
