"""Tensor names of the umT5 encoder: transformers' `UMT5EncoderModel` names (the diffusers `text_encoder/` folder,
the canonical names here), Wan's own names (`models_t5_umt5-xxl-enc-bf16.pth`, wan/modules/t5.py `T5Encoder`),
the map between them, and the config implied by a checkpoint's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from trigflow_distill.models.umt5.network import UMT5Config

# Per-layer leaves -> (transformers name under `encoder.block.{i}.`, whether the kernel is transposed from (out, in)).
LAYER_NAMES = {
    "attn_norm": ("layer.0.layer_norm.weight", False),
    "q": ("layer.0.SelfAttention.q.weight", True),
    "k": ("layer.0.SelfAttention.k.weight", True),
    "v": ("layer.0.SelfAttention.v.weight", True),
    "o": ("layer.0.SelfAttention.o.weight", True),
    "rel_bias": ("layer.0.SelfAttention.relative_attention_bias.weight", False),
    "ffn_norm": ("layer.1.layer_norm.weight", False),
    "wi_0": ("layer.1.DenseReluDense.wi_0.weight", True),
    "wi_1": ("layer.1.DenseReluDense.wi_1.weight", True),
    "wo": ("layer.1.DenseReluDense.wo.weight", True),
}
# Top-level leaves -> transformers name (never transposed).
TOP_NAMES = {"embed": "shared.weight", "norm": "encoder.final_layer_norm.weight"}
# transformers ties the encoder's input embedding to `shared`; a folder may hold either name, or both.
EMBED_ALIAS = "encoder.embed_tokens.weight"
# Tensors of a full (encoder-decoder) umT5 checkpoint that the encoder does not use.
IGNORED_PREFIXES = ("decoder.", "lm_head.")

# transformers -> Wan, per block (`encoder.block.{i}.X` <-> `blocks.{i}.Y`): the gate of Wan's FFN (GELU applied)
# is wi_0, its fc1 the linear branch wi_1, fc2 the output wo; every block owns its position embedding.
_WAN_LAYER = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_WAN_TOP = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
_HF_LAYER = {w: h for h, w in _WAN_LAYER.items()}
_HF_TOP = {w: h for h, w in _WAN_TOP.items()}
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def wan_name(name: str) -> str:
    """Wan's name of a transformers umT5 encoder tensor (ValueError for a name that has none)."""
    name = TOP_NAMES["embed"] if name == EMBED_ALIAS else name
    if name in _WAN_TOP:
        return _WAN_TOP[name]
    m = _HF_BLOCK.fullmatch(name)
    if m and m[2] in _WAN_LAYER:
        return f"blocks.{m[1]}.{_WAN_LAYER[m[2]]}"
    raise ValueError(f"{name!r} is not a umT5 encoder tensor name")


def hf_name(name: str) -> str:
    """transformers' name of a Wan umT5 encoder tensor (ValueError for a name that has none)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _WAN_BLOCK.fullmatch(name)
    if m and m[2] in _HF_LAYER:
        return f"encoder.block.{m[1]}.{_HF_LAYER[m[2]]}"
    raise ValueError(f"{name!r} is not a Wan umT5 encoder tensor name")


def wan_from_hf(state: Mapping) -> dict:
    """A transformers state dict renamed to Wan's names (same values; the tied duplicate embedding dropped, the
    decoder of a full umT5 ignored)."""
    keys = [k for k in state if not k.startswith(IGNORED_PREFIXES)]
    if TOP_NAMES["embed"] in state:
        keys = [k for k in keys if k != EMBED_ALIAS]
    return {wan_name(k): state[k] for k in keys}


def hf_from_wan(state: Mapping) -> dict:
    """A Wan state dict renamed to transformers' names (same values; the embedding as `shared.weight`)."""
    return {hf_name(k): v for k, v in state.items()}


def hf_shapes(cfg: UMT5Config) -> dict[str, tuple[int, ...]]:
    """transformers name -> PyTorch shape of every encoder tensor of `cfg`."""
    d, f, i = cfg.d_model, cfg.d_ff, cfg.inner_dim
    layer = {
        "attn_norm": (d,),
        "q": (i, d),
        "k": (i, d),
        "v": (i, d),
        "o": (d, i),
        "rel_bias": (cfg.num_buckets, cfg.num_heads),
        "ffn_norm": (d,),
        "wi_0": (f, d),
        "wi_1": (f, d),
        "wo": (d, f),
    }
    out = {TOP_NAMES["embed"]: (cfg.vocab_size, d), TOP_NAMES["norm"]: (d,)}
    for n in range(cfg.num_layers):
        out.update({f"encoder.block.{n}.{LAYER_NAMES[leaf][0]}": s for leaf, s in layer.items()})
    return out


# Sane limits of the sizes a checkpoint implies, checked before anything is built from them: the layer count comes
# from the tensor names alone, so one damaged name ("encoder.block.999999999.") would otherwise make the loader list
# a billion layers' tensors (an out-of-memory kill). umT5-XXL (Wan's text encoder): vocabulary 256384, d_model 4096,
# 24 layers, 64 heads, d_ff 10240; the limits leave room for a 10x larger model of the family.
CONFIG_LIMITS = {
    "vocab_size": 1 << 20,
    "d_model": 1 << 15,
    "num_layers": 512,
    "num_heads": 1024,
    "inner_dim": 1 << 16,
    "d_ff": 1 << 18,
    "num_buckets": 1 << 12,
    "max_distance": 1 << 20,
}


def check_limits(values: Mapping, where: str = "the tensor shapes and names") -> None:
    """ValueError naming the first size of `values` (CONFIG_LIMITS names) that is not a whole number in range."""
    for name, value in values.items():
        limit = CONFIG_LIMITS[name]
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or not 1 <= value <= limit:
            raise ValueError(
                f"{name} = {value!r} (from {where}) is out of range (a whole number in 1..{limit}); "
                "the file is damaged or not a umT5 encoder"
            )


def infer_config(shapes: Mapping[str, tuple], max_distance: int = 128, eps: float = 1e-6) -> UMT5Config:
    """The config of a transformers-named encoder state dict's shapes (heads from the position-bias table), checked
    against every tensor: one ValueError listing the missing, unknown and mis-shaped ones."""
    shapes = {k: tuple(s) for k, s in shapes.items() if not k.startswith(IGNORED_PREFIXES)}
    if TOP_NAMES["embed"] not in shapes and EMBED_ALIAS in shapes:
        shapes[TOP_NAMES["embed"]] = shapes[EMBED_ALIAS]
    shapes.pop(EMBED_ALIAS, None)
    need = (TOP_NAMES["embed"], "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    need += tuple(f"encoder.block.0.{LAYER_NAMES[leaf][0]}" for leaf in ("q", "wi_0"))
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ValueError(f"not a umT5 encoder: no {', '.join(absent)}")
    layers = {int(m[1]) for m in map(_HF_BLOCK.fullmatch, shapes) if m}
    vocab, d = shapes[need[0]]
    buckets, heads = shapes[need[1]]
    inner, ff = shapes[need[2]][0], shapes[need[3]][0]
    num_layers = max(layers) + 1
    check_limits(
        dict(
            vocab_size=vocab,
            d_model=d,
            num_layers=num_layers,
            num_heads=heads,
            inner_dim=inner,
            d_ff=ff,
            num_buckets=buckets,
        )
    )
    if inner % heads:
        raise ValueError(f"not a umT5 encoder: q width {inner} is not a multiple of the {heads} heads")
    cfg = UMT5Config(
        vocab_size=vocab,
        d_model=d,
        num_layers=num_layers,
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=ff,
        num_buckets=buckets,
        max_distance=max_distance,
        eps=eps,
    )
    expected = hf_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{k} {shapes[k]} (expected {expected[k]})" for k in set(shapes) & set(expected) if shapes[k] != expected[k]
    )
    if missing or unknown or wrong:

        def show(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

        parts = [
            f"{what} {show(keys)}"
            for what, keys in (("missing", missing), ("unknown", unknown), ("mis-shaped", wrong))
            if keys
        ]
        raise ValueError(f"not a umT5 encoder of {cfg.num_layers} layers: {'; '.join(parts)}")
    return cfg
