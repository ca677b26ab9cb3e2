"""Native Cosmos (PyTorch) and diffusers parameter names <-> the JAX param tree of `cosmos_dit` (numpy only).

Native names are those of docs/algorithm.md §8 without the `net.` prefix; torch Linear weights are (out, in), our
kernels (in, out). Diffusers `CosmosTransformer3DModel` uses the same tensors and layouts under other names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from trigflow_distill.models.cosmos_dit.network import _MODULATED, GUIDANCE_EMBEDDER, DiTConfig, param_shapes

GUIDANCE_WEIGHT = f"{GUIDANCE_EMBEDDER}.linear.weight"  # native name of the §15 guidance projection, torch (out, in)

# native name -> param path (torch weight transposed into a kernel when the path ends in "kernel")
_GLOBAL = {
    "x_embedder.proj.1.weight": ("x_embedder", "kernel"),
    "t_embedder.1.linear_1.weight": ("t_embedder", "linear_1", "kernel"),
    "t_embedder.1.linear_2.weight": ("t_embedder", "linear_2", "kernel"),
    "t_embedding_norm.weight": ("t_embedding_norm", "scale"),
    "crossattn_proj.0.weight": ("crossattn_proj", "kernel"),
    "crossattn_proj.0.bias": ("crossattn_proj", "bias"),
    "final_layer.adaln_modulation.1.weight": ("final_layer", "adaln_modulation", "linear_1", "kernel"),
    "final_layer.adaln_modulation.2.weight": ("final_layer", "adaln_modulation", "linear_2", "kernel"),
    "final_layer.linear.weight": ("final_layer", "linear", "kernel"),
    # Ours, not Cosmos': the CFG-scale projection of a guidance-conditioned student (docs/algorithm.md §15).
    GUIDANCE_WEIGHT: (GUIDANCE_EMBEDDER, "linear", "kernel"),
}
_PER_BLOCK = {
    **{
        f"{a}.{p}_proj.weight": (a, f"{p}_proj", "kernel")
        for a in ("self_attn", "cross_attn")
        for p in ("q", "k", "v", "output")
    },
    **{f"{a}.{p}_norm.weight": (a, f"{p}_norm", "scale") for a in ("self_attn", "cross_attn") for p in ("q", "k")},
    "mlp.layer1.weight": ("mlp", "layer1", "kernel"),
    "mlp.layer2.weight": ("mlp", "layer2", "kernel"),
    **{
        f"adaln_modulation_{m}.{j}.weight": (f"adaln_modulation_{m}", f"linear_{j}", "kernel")
        for m in _MODULATED
        for j in (1, 2)
    },
}
_DIFFUSERS_GLOBAL = {
    "x_embedder.proj.1.weight": "patch_embed.proj.weight",
    "t_embedder.1.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "t_embedder.1.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
    "t_embedding_norm.weight": "time_embed.norm.weight",
    "crossattn_proj.0.weight": "crossattn_proj.0.weight",
    "crossattn_proj.0.bias": "crossattn_proj.0.bias",
    "final_layer.adaln_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaln_modulation.2.weight": "norm_out.linear_2.weight",
    "final_layer.linear.weight": "proj_out.weight",
}
_DIFFUSERS_BLOCK = {
    **{
        f"{a}.{p}_proj.weight": f"{d}.to_{p}.weight"
        for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for p in ("q", "k", "v")
    },
    **{f"{a}.output_proj.weight": f"{d}.to_out.0.weight" for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))},
    **{
        f"{a}.{p}_norm.weight": f"{d}.norm_{p}.weight"
        for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for p in ("q", "k")
    },
    "mlp.layer1.weight": "ff.net.0.proj.weight",
    "mlp.layer2.weight": "ff.net.2.weight",
    **{
        f"adaln_modulation_{m}.{j}.weight": f"norm{i + 1}.linear_{j}.weight"
        for i, m in enumerate(_MODULATED)
        for j in (1, 2)
    },
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def is_ignored(name: str) -> bool:
    """Native keys that are not parameters: `*_extra_state`, `pos_embedder.*` buffers, `accum_*` counters."""
    return name.endswith("_extra_state") or name.startswith("pos_embedder.") or name.split(".")[-1].startswith("accum_")


def _fmt(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_family(names) -> None:
    """Raise a clear error when the keys are not a native Cosmos DiT state dict (no prefix)."""
    names = list(names)
    if "x_embedder.proj.1.weight" in names and "blocks.0.self_attn.q_proj.weight" in names:
        return
    if any(n.startswith(("net.", "net_ema.")) for n in names):
        hint = "keys carry a 'net.'/'net_ema.' prefix: strip it first (convert.load_torch_checkpoint does)"
    elif "patch_embed.proj.weight" in names or any(n.startswith("transformer_blocks.") for n in names):
        hint = "this is a diffusers CosmosTransformer3DModel state dict: map it with native_from_diffusers first"
    else:
        hint = "wrong model family: expected a Cosmos Predict2.5 DiT (MinimalV1LVGDiT) with x_embedder.proj.1.weight"
    raise ValueError(f"not a native Cosmos DiT state dict ({hint}); first keys: {_fmt(names, 5)}")


def native_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Native name -> torch tensor shape for `config` (what a release `.pt` holds, without `net.`)."""
    shapes = param_shapes(config)

    def torch_shape(path, shape):
        return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)

    out = {}
    for name, path in _GLOBAL.items():
        if path[0] in shapes:
            out[name] = torch_shape(path, _get(shapes, path))
    for i in range(config.num_blocks):
        for name, path in _PER_BLOCK.items():
            out[f"blocks.{i}.{name}"] = torch_shape(path, _get(shapes["blocks"], path)[1:])
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def params_from_state_dict(sd: Mapping[str, np.ndarray], config: DiTConfig) -> dict:
    """Param tree (numpy, source dtype kept) from native tensors; `sd` may be a lazy mapping of arrays
    (each tensor is read once; peak memory ~ the output tree plus one stacked parameter in flight).

    Ignored keys (see `is_ignored`) are skipped; missing/unexpected keys and shape mismatches raise ValueError.
    """
    names = [k for k in sd.keys() if not is_ignored(k)]
    _check_family(names)
    expected = native_shapes(config)
    missing, unexpected = set(expected) - set(names), set(names) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config: missing keys [{_fmt(missing)}]; unexpected keys "
            f"[{_fmt(unexpected)}] (config: {config})"
        )

    def leaf(name, path):  # each tensor is accessed exactly once (lazy sources count reads)
        a = np.asarray(sd[name])
        if a.shape != expected[name]:
            raise ValueError(f"shape mismatch: {name}: {a.shape} != expected {expected[name]} (config: {config})")
        return np.ascontiguousarray(a.T) if path[-1] == "kernel" else a

    params: dict = {}
    for name, path in _GLOBAL.items():
        if name in expected:
            _set(params, path, leaf(name, path))
    for name, path in _PER_BLOCK.items():
        stacked = np.stack([leaf(f"blocks.{i}.{name}", path) for i in range(config.num_blocks)])
        _set(params, ("blocks",) + path, stacked)
    return params


def leaf_sources(config: DiTConfig, names=None) -> dict[tuple[str, ...], tuple[list[str], bool]]:
    """Param path -> (native names, transpose): one name for a global leaf, `num_blocks` names stacked along a new
    leading axis for a per-block leaf; transpose when a torch weight becomes a kernel. Lets a converter build or
    write the tree one leaf at a time (same result as `params_from_state_dict`). With `names` (a source's
    non-ignored native keys) first checks them as `params_from_state_dict` does (family, missing, unexpected)."""
    expected = native_shapes(config)
    if names is not None:
        names = list(names)
        _check_family(names)
        missing, unexpected = set(expected) - set(names), set(names) - set(expected)
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the config: missing keys [{_fmt(missing)}]; unexpected keys "
                f"[{_fmt(unexpected)}] (config: {config})"
            )
    out = {path: ([name], path[-1] == "kernel") for name, path in _GLOBAL.items() if name in expected}
    for name, path in _PER_BLOCK.items():
        out[("blocks",) + path] = ([f"blocks.{i}.{name}" for i in range(config.num_blocks)], path[-1] == "kernel")
    return out


def state_dict_from_params(params: Mapping, config: DiTConfig) -> dict[str, np.ndarray]:
    """Native name -> contiguous numpy tensor (torch layout, dtype of the params) for the whole tree."""
    shapes = param_shapes(config)
    flat_expected = _flatten(shapes)
    flat = _flatten(params)
    missing, unexpected = set(flat_expected) - set(flat), set(flat) - set(flat_expected)
    if missing or unexpected:
        raise ValueError(
            f"params do not match the config: missing [{_fmt('/'.join(p) for p in missing)}]; unexpected "
            f"[{_fmt('/'.join(p) for p in unexpected)}]"
        )
    bad = [
        f"{'/'.join(p)}: {tuple(np.shape(v))} != {flat_expected[p]}"
        for p, v in flat.items()
        if tuple(np.shape(v)) != tuple(flat_expected[p])
    ]
    if bad:
        raise ValueError(f"param shape mismatch: {'; '.join(bad[:8])}")

    def torch_layout(path, a):
        return np.ascontiguousarray(np.asarray(a).T if path[-1] == "kernel" else np.asarray(a))

    sd = {}
    for name, path in _GLOBAL.items():
        if path in flat:
            sd[name] = torch_layout(path, flat[path])
    for i in range(config.num_blocks):
        for name, path in _PER_BLOCK.items():
            sd[f"blocks.{i}.{name}"] = torch_layout(path, np.asarray(flat[("blocks",) + path][i]))
    return sd


def _flatten(tree, prefix=()):
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)))
    return out


# Sane limits of the sizes a checkpoint implies, checked before anything is built from them: the block count comes
# from the tensor names alone, so one damaged name ("blocks.999999999.") would otherwise make the loader list a
# billion blocks' tensors (an out-of-memory kill). Predict2.5-14B: 36 blocks, width 5120, text 100352 (Reason1's
# 28 x 3584); the limits leave room for 10x larger models.
CONFIG_LIMITS = {
    "num_blocks": 512,
    "model_channels": 1 << 16,
    "num_heads": 1024,
    "in_channels": 4096,
    "out_channels": 4096,
    "patch_spatial": 64,
    "patch_temporal": 64,
    "adaln_lora_dim": 1 << 16,
    "crossattn_emb_channels": 1 << 20,
    "crossattn_proj_in_channels": 1 << 20,
}


def _check_limits(values: Mapping) -> None:
    for name, limit in CONFIG_LIMITS.items():
        value = values.get(name)
        if value is None and name == "crossattn_proj_in_channels":
            continue
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= limit
        if not ok:
            raise ValueError(
                f"{name} = {value!r} (from the checkpoint's tensors or config.json) is out of range (1..{limit}); "
                "the file is damaged or not a Cosmos DiT"
            )


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> DiTConfig:
    """DiTConfig from native tensor shapes (docs/algorithm.md §8): width, blocks, head_dim (q_norm size), MLP width,
    LoRA dim, context dims. Patch sizes, RoPE ratios, concat_padding_mask and compute options come from `overrides`
    or the DiTConfig defaults (Predict2.5)."""
    names = [k for k in shapes if not is_ignored(k)]
    _check_family(names)
    needed = [
        "x_embedder.proj.1.weight",
        "final_layer.linear.weight",
        "blocks.0.self_attn.q_norm.weight",
        "blocks.0.mlp.layer1.weight",
        "blocks.0.adaln_modulation_self_attn.1.weight",
        "blocks.0.cross_attn.k_proj.weight",
    ]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the architecture: missing keys [{_fmt(missing)}]")
    defaults = {f.name: f.default for f in DiTConfig.__dataclass_fields__.values()}
    pt = overrides.get("patch_temporal", defaults["patch_temporal"])
    ps = overrides.get("patch_spatial", defaults["patch_spatial"])
    pad = overrides.get("concat_padding_mask", defaults["concat_padding_mask"])
    d, k_in = shapes["x_embedder.proj.1.weight"]
    k_out = shapes["final_layer.linear.weight"][0]
    vol = pt * ps * ps
    if k_in % vol or k_out % vol:
        raise ValueError(
            f"x_embedder input {k_in} / final_layer output {k_out} not divisible by the patch volume {vol} "
            f"(patch_temporal={pt}, patch_spatial={ps}); pass the right patch sizes as overrides"
        )
    head_dim = shapes["blocks.0.self_attn.q_norm.weight"][0]
    if d % head_dim:
        raise ValueError(f"model width {d} not divisible by head_dim {head_dim} (size of q_norm.weight)")
    block_ids = {int(m.group(1)) for m in map(_BLOCK_KEY.match, names) if m}
    inferred = dict(
        model_channels=d,
        num_blocks=max(block_ids) + 1,
        num_heads=d // head_dim,
        mlp_ratio=shapes["blocks.0.mlp.layer1.weight"][0] / d,
        in_channels=k_in // vol - 1 - int(pad),
        out_channels=k_out // vol,
        adaln_lora_dim=shapes["blocks.0.adaln_modulation_self_attn.1.weight"][0],
        crossattn_emb_channels=shapes["blocks.0.cross_attn.k_proj.weight"][1],
        crossattn_proj_in_channels=shapes["crossattn_proj.0.weight"][1]
        if "crossattn_proj.0.weight" in shapes
        else None,
        guidance_embedder=GUIDANCE_WEIGHT in shapes,
    )
    values = {**inferred, **overrides}
    _check_limits({**defaults, **values})
    return DiTConfig(**values)


def _rename(sd, global_map, block_map, block_re, new_block_prefix, drop_ignored, direction):
    out, unexpected = {}, []
    for name, value in sd.items():
        if drop_ignored and is_ignored(name):
            continue
        if name in global_map:
            out[global_map[name]] = value
            continue
        m = block_re.match(name)
        if m and m.group(2) in block_map:
            out[f"{new_block_prefix}.{m.group(1)}.{block_map[m.group(2)]}"] = value
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected keys for {direction}: [{_fmt(unexpected)}]")
    return out


def diffusers_from_native(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename native Cosmos keys (no prefix) to diffusers CosmosTransformer3DModel keys; same tensors."""
    _check_family([k for k in sd if not is_ignored(k)])
    if GUIDANCE_WEIGHT in sd:
        raise ValueError(
            f"this is a guidance-conditioned student ({GUIDANCE_WEIGHT}, docs/algorithm.md §15) and diffusers' "
            "CosmosTransformer3DModel has no guidance input: export it in the native format (--format=torch)."
        )
    return _rename(
        sd, _DIFFUSERS_GLOBAL, _DIFFUSERS_BLOCK, _BLOCK_KEY, "transformer_blocks", True, "native -> diffusers"
    )


def native_from_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename diffusers CosmosTransformer3DModel keys to native Cosmos keys (no prefix); same tensors."""
    if "patch_embed.proj.weight" not in sd or "transformer_blocks.0.attn1.to_q.weight" not in sd:
        raise ValueError(
            "wrong model family: expected a diffusers CosmosTransformer3DModel state dict with "
            f"patch_embed.proj.weight and transformer_blocks.*; first keys: {_fmt(list(sd), 5)}"
        )
    inv_global = {v: k for k, v in _DIFFUSERS_GLOBAL.items()}
    inv_block = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    return _rename(sd, inv_global, inv_block, _DIFFUSERS_BLOCK_KEY, "blocks", False, "diffusers -> native")


def diffusers_config(config: DiTConfig) -> dict:
    """config.json kwargs of diffusers' CosmosTransformer3DModel equal to `config` (Predict2.5 settings).

    Diffusers has no config field for the q/k RMSNorm epsilon: it hard-codes 1e-5 where Cosmos uses 1e-6
    (~1e-3 relative output difference); to match exactly, set `attn{1,2}.norm_{q,k}.eps = 1e-6` after loading.
    """
    if config.mlp_hidden != int(config.model_channels * config.mlp_ratio):
        raise ValueError(f"diffusers computes the MLP width as int(D * mlp_ratio) != {config.mlp_hidden}")
    return {
        "_class_name": "CosmosTransformer3DModel",
        "in_channels": config.in_channels + 1,  # + condition mask; diffusers adds the padding channel itself
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.num_blocks,
        "mlp_ratio": config.mlp_ratio,
        "text_embed_dim": config.crossattn_emb_channels,
        "adaln_lora_dim": config.adaln_lora_dim,
        "max_size": [128, 240, 240],
        "patch_size": [config.patch_temporal, config.patch_spatial, config.patch_spatial],
        "rope_scale": [
            config.rope_t_extrapolation_ratio,
            config.rope_h_extrapolation_ratio,
            config.rope_w_extrapolation_ratio,
        ],
        "concat_padding_mask": config.concat_padding_mask,
        "extra_pos_embed_type": None,
        "use_crossattn_projection": config.crossattn_proj_in_channels is not None,
        "crossattn_proj_in_channels": config.crossattn_proj_in_channels or config.crossattn_emb_channels,
        "encoder_hidden_states_channels": config.crossattn_emb_channels,
    }
