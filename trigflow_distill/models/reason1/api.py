"""The Reason1 text embedding of Cosmos Predict2.5 in JAX (docs/algorithm.md §11).

  python -m trigflow_distill.models.reason1 --text-encoder hf://nvidia/Cosmos-Reason1-7B@REV --prompt "a red car" \\
      --out emb.npy

Public API:
- `load(path, dtype, mesh)` -> (cfg, params): the language model of a transformers Qwen2.5-VL folder
  (config.json + safetensors), read lazily shard by shard; with a mesh the parameters are FSDP-sharded.
- `tokenize(path_or_tokenizer, captions)` -> int32 ids (B, 512): the §11 chat template, right-padded with the pad
  token or truncated (`load_tokenizer(path)` once, then pass the tokenizer, for many batches).
- `embed(cfg, params, ids)` -> (B, L, num_layers * hidden) float32: FULL_CONCAT, the outputs of layers 1..N (the
  last after the final norm), each normalised per token (h - mean) / (unbiased std + 1e-8), in layer order.
- `save(path, cfg, params)` / `write_tiny(path)`: a folder in the same format (tiny random ones for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from einops import rearrange
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from tokenizers import models, pre_tokenizers
from tqdm import tqdm

from trigflow_distill.common import cli
from trigflow_distill.common.sharding import param_sharding
from trigflow_distill.models import hub, torchfile
from trigflow_distill.models.reason1 import qwen2
from trigflow_distill.models.reason1.qwen2 import LAYER_TORCH_NAMES, TOP_TORCH_NAMES, Qwen2Config

MAX_LENGTH = 512
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
# The Qwen2.5 chat format of a system and a user turn, no generation prompt (docs/algorithm.md §11).
TEMPLATE = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n{caption}<|im_end|>\n"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_PAD_TOKEN = "<|endoftext|>"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NORM_EPS = 1e-8
# Keys of the checkpoint that are not the language model.
_IGNORED_PREFIXES = ("visual.", "model.visual.", "lm_head.")
# Sane limits of the config's sizes, checked before anything is built from them: a damaged or hostile config.json
# (num_hidden_layers: 1e9) must be an error naming the field, not an out-of-memory kill while building the list of
# expected tensors. Reason1-7B's sizes: vocabulary 152064, hidden 3584, 28 layers, 28 heads, MLP 18944; the limits
# leave room for a 10x larger model of the family.
CONFIG_LIMITS = {
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 15,
    "num_hidden_layers": 512,
    "num_attention_heads": 512,
    "num_key_value_heads": 512,
    "intermediate_size": 1 << 18,
}
# transformers 5.x's in-memory layout; its save_pretrained writes the released `model.*` names, but accept both.
_LANGUAGE_MODEL_PREFIX = "model.language_model."


def _local_dir(path: str | os.PathLike) -> epath.Path:
    """The local folder of `path` (hf:// sources are fetched; remote URLs refused: safetensors are memory-mapped)."""
    local = hub.resolve_local(path, "the text encoder")
    if not local.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a transformers Qwen2.5-VL folder with config.json)")
    return local


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_from_json(raw: dict, where: str = "config.json") -> Qwen2Config:
    """Qwen2Config of a (Qwen2.5-VL or Qwen2) config.json: the text settings at the top level (released files) or
    under "text_config" (transformers 5.x), RoPE θ under rope_theta or rope_parameters."""
    text = raw.get("text_config") or {}
    if "hidden_size" not in text:
        text = {}

    def get(name, default=None):
        for d in (text, raw):
            if d.get(name) is not None:
                return d[name]
        if default is None:
            raise ValueError(
                f"{where}: no {name!r} (expected a Qwen2.5-VL config, text settings at the top or under 'text_config')"
            )
        return default

    def size(name, default=None):
        value = get(name, default)
        # bool is an int in Python; 1e9 (a float in JSON) is accepted like transformers does only if whole.
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or not 1 <= value <= CONFIG_LIMITS[name]:
            raise ValueError(
                f"{where}: {name} = {value!r} is out of range (a whole number in 1..{CONFIG_LIMITS[name]}); "
                "the file is damaged or not a Qwen2.5-VL config"
            )
        return int(value)

    rope = get("rope_parameters", {}) or get("rope_scaling", {}) or {}
    theta = get("rope_theta", 0) or rope.get("rope_theta") or 1e6
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"{where}: RoPE type {kind!r} is not supported (only the plain/mrope RoPE of Qwen2.5-VL)")
    if get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (Reason1 uses full attention)")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {get('hidden_act')!r} is not supported (expected 'silu')")
    try:
        eps, theta = float(get("rms_norm_eps", 1e-6)), float(theta)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rms_norm_eps / rope_theta are not numbers") from None
    cfg = Qwen2Config(
        vocab_size=size("vocab_size"),
        hidden_size=size("hidden_size"),
        num_layers=size("num_hidden_layers"),
        num_heads=size("num_attention_heads"),
        num_kv_heads=size("num_key_value_heads", get("num_attention_heads")),
        intermediate_size=size("intermediate_size"),
        rms_norm_eps=eps,
        rope_theta=theta,
    )
    head_dim = text.get("head_dim", raw.get("head_dim"))
    if head_dim is not None and int(head_dim) != cfg.head_dim:
        raise ValueError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads = {cfg.head_dim}")
    return cfg


def _weight_files(folder: epath.Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file, from model.safetensors.index.json or a single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        files = {k: os.fspath(folder / f) for k, f in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index}: lists {file}, which does not exist (an incomplete download?)")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(torchfile.safetensors_header(single), os.fspath(single))
    raise FileNotFoundError(
        f"{folder}: no model.safetensors.index.json or model.safetensors (only safetensors weights are supported)"
    )


def _language_model_keys(files: dict[str, str], cfg: Qwen2Config, folder: str) -> dict[str, tuple[str, str]]:
    """Released name (`model.*`) -> (file, name in the file) for every language-model tensor; a clear error on
    missing or unknown keys."""
    found = {}
    for key, file in files.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        name = "model." + key[len(_LANGUAGE_MODEL_PREFIX) :] if key.startswith(_LANGUAGE_MODEL_PREFIX) else key
        found[name] = (file, key)
    expected = set(TOP_TORCH_NAMES.values()) | {
        f"model.layers.{i}.{name}" for i in range(cfg.num_layers) for name, _ in LAYER_TORCH_NAMES.values()
    }
    missing, unknown = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or unknown:

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = ([f"missing {show(missing)}"] if missing else []) + ([f"unknown {show(unknown)}"] if unknown else [])
        raise ValueError(
            f"{folder}: the weights do not match config.json's Qwen2.5-VL language model "
            f"({cfg.num_layers} layers): {'; '.join(parts)}"
        )
    return found


def load(path: str | os.PathLike, dtype: str = "bfloat16", mesh: Mesh | None = None) -> tuple[Qwen2Config, dict]:
    """(cfg, params) of the language model of a transformers Qwen2.5-VL folder (local or hf://OWNER/NAME[@REV]).

    `visual.*` and `lm_head` are ignored. Tensors are read lazily from the safetensors files: each device gets
    only its shard (with `mesh`, parameters are sharded over its fsdp axis by `sharding.param_sharding`, which
    also makes this multi-host safe); without a mesh everything goes to the default device.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    folder = _local_dir(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers Qwen2.5-VL folder)")
    cfg = config_from_json(_read_json(config_path), config_path)
    keys = _language_model_keys(_weight_files(folder), cfg, folder)
    shapes = qwen2.param_shapes(cfg, _DTYPES[dtype])
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
    else:
        shardings = param_sharding(shapes, mesh)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    flat_shardings = jax.tree.leaves(shardings)
    files = sorted({f for f, _ in keys.values()})
    for file in files:  # a damaged header is a one-line error naming the file, before anything is allocated
        torchfile.safetensors_header(file)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="np")) for f in files}

        def read(name: str, transpose: bool, index: tuple, expected: tuple) -> np.ndarray:
            file, key = keys[name]
            tensor = handles[file].get_slice(key)
            shape = tuple(tensor.get_shape())
            want = expected[::-1] if transpose else expected
            if shape != want:
                raise ValueError(f"{folder}: {key} has shape {shape}, config.json implies {want}")
            x = tensor[index[::-1]].T if transpose else tensor[index]
            return np.asarray(x).astype(_DTYPES[dtype])

        arrays = []
        for (path_, sds), sharding in zip(tqdm(leaves, desc="text encoder", unit="tensor"), flat_shardings):
            names = [p.key for p in path_]
            if names[0] == "layers":
                torch_name, transpose = LAYER_TORCH_NAMES[names[1]]

                def callback(index, torch_name=torch_name, transpose=transpose, shape=sds.shape):
                    layers = range(cfg.num_layers)[index[0]]
                    return np.stack(
                        [read(f"model.layers.{i}.{torch_name}", transpose, index[1:], shape[1:]) for i in layers]
                    )
            else:

                def callback(index, name=TOP_TORCH_NAMES[names[0]], shape=sds.shape):
                    return read(name, False, index, shape)

            arrays.append(jax.make_array_from_callback(sds.shape, sharding, callback))
    return cfg, jax.tree.unflatten(treedef, arrays)


def save(path: str | os.PathLike, cfg: Qwen2Config, params: dict) -> None:
    """Writes config.json (Qwen2.5-VL, text settings at the top) and model.safetensors with the released names."""
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "use_sliding_window": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    tensors = {name: host[leaf] for leaf, name in TOP_TORCH_NAMES.items()}
    for leaf, (name, transpose) in LAYER_TORCH_NAMES.items():
        for i in range(cfg.num_layers):
            x = host["layers"][leaf][i]
            tensors[f"model.layers.{i}.{name}"] = np.ascontiguousarray(x.T if transpose else x)
    (path / "model.safetensors").write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def _pad_token(folder: epath.Path) -> str:
    """The pad token named by tokenizer_config.json or special_tokens_map.json, else `<|endoftext|>`."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            pad = _read_json(file).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return DEFAULT_PAD_TOKEN


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The folder's tokenizer.json, with the folder's pad token recorded in its padding settings (so that a
    loaded tokenizer can be passed to `tokenize` many times without rereading the folder)."""
    folder = _local_dir(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (expected the text encoder's folder)")
    try:
        tok = tokenizers.Tokenizer.from_file(os.fspath(file))
    except Exception as e:  # the Rust library raises a bare Exception ("expected value at line 1 column 1")
        raise ValueError(f"{file}: not a valid tokenizer.json ({e}); re-download the text encoder's folder") from None
    pad = _pad_token(folder)
    if tok.token_to_id(pad) is None:
        raise ValueError(f"{folder}: pad token {pad!r} is not in tokenizer.json's vocabulary")
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    return tok


def render(caption: str) -> str:
    """The §11 chat-template string of one caption."""
    return TEMPLATE.format(caption=caption)


def tokenize(path_or_tokenizer, captions: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """int32 ids (B, max_length) of the §11 chat template of each caption, right-padded with the pad token or
    truncated (as the reference does). `path_or_tokenizer`: the text encoder's folder (its tokenizer.json and
    pad token) or a `tokenizers.Tokenizer` (e.g. from `load_tokenizer`; pad token from its padding settings, else
    `<|endoftext|>`)."""
    if isinstance(path_or_tokenizer, tokenizers.Tokenizer):
        tok = path_or_tokenizer
    else:
        tok = load_tokenizer(path_or_tokenizer)
    pad_token = (tok.padding or {}).get("pad_token", DEFAULT_PAD_TOKEN)
    for token in (*SPECIAL_TOKENS, pad_token):
        ids = tok.encode(token, add_special_tokens=False).ids
        if tok.token_to_id(token) is None or ids != [tok.token_to_id(token)]:
            raise ValueError(f"tokenizer: {token!r} is not a single special token; expected a Qwen2.5 tokenizer.json")
    captions = [captions] if isinstance(captions, str) else list(captions)
    pad_id = tok.token_to_id(pad_token)
    out = np.full((len(captions), max_length), pad_id, np.int32)
    for row, enc in zip(out, tok.encode_batch([render(c) for c in captions], add_special_tokens=False)):
        ids = enc.ids[:max_length]
        row[: len(ids)] = ids
    return out


def normalize(h: jax.Array) -> jax.Array:
    """(h - mean) / (unbiased std + 1e-8) over the last axis, in float32."""
    h = h.astype(jnp.float32)
    centred = h - jnp.mean(h, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (h.shape[-1] - 1))
    return centred / (std + _NORM_EPS)


def embed(cfg: Qwen2Config, params: dict, ids_bl: jax.Array) -> jax.Array:
    """FULL_CONCAT text embedding (B, L, num_layers * hidden) float32 of token ids (B, L); jit-able.

    Layer outputs 1..N (the last after the final norm), each normalised per token, concatenated in layer order.
    Sharded parameters (`load(..., mesh=mesh)`) and ids (e.g. `sharding.batch_sharding(mesh)`) work as they are.
    """
    hs_nbld = qwen2.hidden_states(cfg, params, ids_bl)
    return rearrange(normalize(hs_nbld), "n b l d -> b l (n d)")


def write_tiny(
    path: str | os.PathLike, seed: int = 0, num_layers: int = 2, hidden_size: int = 32, words: Sequence[str] = ()
) -> Qwen2Config:
    """A tiny random text-encoder folder for tests and toy runs: config.json, model.safetensors and a word-level
    tokenizer.json (space-separated words, "\n" and "." on their own; vocabulary: the Qwen special tokens, the
    template's words, `words` and [UNK]). Returns its config."""
    vocab = [
        DEFAULT_PAD_TOKEN,
        *SPECIAL_TOKENS,
        "[UNK]",
        "\n",
        "system",
        "user",
        *SYSTEM_PROMPT[:-1].split(),
        ".",
        *words,
    ]
    vocab = list(dict.fromkeys(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Split(" ", "removed"),
            pre_tokenizers.Split(".", "isolated"),
        ]
    )
    tok.add_special_tokens([DEFAULT_PAD_TOKEN, *SPECIAL_TOKENS])
    cfg = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=2 * hidden_size,
    )
    save(path, cfg, qwen2.init_params(cfg, jax.random.key(seed)))
    path = epath.Path(path)
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": DEFAULT_PAD_TOKEN}))
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-text-encoder",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--text-encoder", required=True, help="Qwen2.5-VL folder or hf://OWNER/NAME[@REV]")
    parser.add_argument("--prompt", required=True, action="append", help="caption (repeat for a batch)")
    parser.add_argument("--out", required=True, help="output .npy: float32 (B, 512, layers*hidden)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg, params = load(args.text_encoder, args.dtype)
        ids = tokenize(args.text_encoder, args.prompt, args.max_length)
        emb = np.asarray(jax.jit(embed, static_argnums=0)(cfg, params, ids))
        np.save(args.out, emb)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {emb.shape} float32 ({len(args.prompt)} prompt(s)) in {time.perf_counter() - start:.1f}s")
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
