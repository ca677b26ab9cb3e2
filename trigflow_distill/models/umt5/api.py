"""The umT5-XXL text encoder of Wan2.1 in JAX, without torch.

  python -m trigflow_distill.models.umt5 --text-encoder hf://Wan-AI/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
      --tokenizer hf://Wan-AI/Wan2.1-T2V-1.3B/google/umt5-xxl --prompt "a red car" --out context.npz

Public API:
- `load(src, dtype, mesh)` -> (cfg, params): a transformers / diffusers `text_encoder/` folder (config.json optional,
  safetensors single or sharded with an index), a single .safetensors file, or Wan's own torch `.pth`
  (`models_t5_umt5-xxl-enc-bf16.pth`, read by the torch-free `torchfile`); either naming. Tensors are read lazily;
  with a mesh they are FSDP-sharded as they load. The config comes from the shapes.
- `load_tokenizer(src)` / `tokenize(tok, prompts)` -> (ids, mask) int32 (B, 512): Wan's text cleaning, then the
  tokens, `</s>`, padding with `<pad>` (truncated to 511 tokens + `</s>`), as Wan's HuggingfaceTokenizer does.
- `embed(cfg, params, ids, mask)` -> (context (B, 512, d_model) float32, lengths (B,) int32): Wan's context rule,
  the last hidden state trimmed to each prompt's true length and zero-padded back (wan/text2video.py, the DiT's
  text_len padding; diffusers' `_get_t5_prompt_embeds`).
- `save(path, cfg, params)` (a transformers folder), `save_wan(path, cfg, params)` (Wan's .pth names),
  `write_tiny(path)`: tiny random folders for tests and toy runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from tokenizers import decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from trigflow_distill.common import cli
from trigflow_distill.common.sharding import param_sharding
from trigflow_distill.models import hub, torchfile
from trigflow_distill.models.umt5 import names, network
from trigflow_distill.models.umt5.network import UMT5Config

TEXT_LEN = 512  # wan/configs/shared_config.py text_len
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
# wan/configs/shared_config.py sample_neg_prompt: the default negative prompt of every Wan2.1 sampler.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------------------- weights
@dataclasses.dataclass
class _Tensor:
    shape: tuple[int, ...]
    read: Callable[[tuple], np.ndarray]  # index (tuple of slices) -> that part of the tensor


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(folder: epath.Path) -> list[str]:
    """The weight files of a transformers folder: those of model.safetensors.index.json, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        return sorted({os.fspath(folder / f) for f in weight_map.values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [os.fspath(single)]
    raise FileNotFoundError(
        f"{folder}: no model.safetensors.index.json or model.safetensors (expected a transformers umT5 encoder folder)"
    )


def _open_tensors(path: epath.Path, stack: contextlib.ExitStack) -> dict[str, _Tensor]:
    """Every tensor of `path` (folder, .safetensors or torch .pth) under its own name, not read yet."""
    files = _safetensors_files(path) if path.is_dir() else [os.fspath(path)]
    out = {}
    for file in files:
        if file.endswith(".safetensors"):
            torchfile.safetensors_header(file)  # a damaged file: an error naming it, before safetensors maps it
            handle = stack.enter_context(safe_open(file, framework="np"))
            for key in handle.keys():
                sl = handle.get_slice(key)
                out[key] = _Tensor(tuple(sl.get_shape()), lambda index, sl=sl: np.asarray(sl[index]))
        else:
            lazy = torchfile.LazyStateDict(file)
            for key, shape in lazy.shapes.items():
                out[key] = _Tensor(shape, lambda index, key=key: np.asarray(lazy[key][index]))
    return out


# transformers config.json field -> names.CONFIG_LIMITS name.
_CONFIG_SIZES = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "num_layers": "num_layers",
    "num_heads": "num_heads",
    "d_ff": "d_ff",
    "relative_attention_num_buckets": "num_buckets",
    "relative_attention_max_distance": "max_distance",
}


def _folder_settings(path: epath.Path) -> dict:
    """max_distance / eps of a transformers config.json beside the weights (defaults otherwise); other FFN kinds
    are refused."""
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return {}
    raw = _read_json(config)
    ffn = raw.get("feed_forward_proj", "gated-gelu")
    act = raw.get("dense_act_fn", "gelu_new")
    if ffn != "gated-gelu" or act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{config}: feed_forward_proj {ffn!r} / dense_act_fn {act!r}; umT5 uses gated-gelu, gelu_new")
    # The sizes it states (the shapes decide them) must be sane too: a damaged file is refused, naming the field.
    stated = {ours: raw[theirs] for theirs, ours in _CONFIG_SIZES.items() if raw.get(theirs) is not None}
    stated.setdefault("max_distance", 128)
    try:
        names.check_limits(stated, where="config.json")
    except ValueError as e:
        raise ValueError(f"{config}: {e}") from None
    return {"max_distance": int(stated["max_distance"]), "eps": float(raw.get("layer_norm_epsilon", 1e-6))}


def load(src: str | os.PathLike, dtype: str = "bfloat16", mesh: Mesh | None = None) -> tuple[UMT5Config, dict]:
    """(cfg, params) of a umT5 encoder checkpoint, local or hf:// (see the module docstring for the forms).

    Tensors are read lazily (safetensors slices, memory-mapped .pth): each device gets only its shard (with
    `mesh`, parameters are sharded over its fsdp axis by `sharding.param_sharding`); without a mesh everything
    goes to the default device. Raises FileNotFoundError / ValueError (listing missing, unknown, mis-shaped tensors).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    path = hub.resolve_local(src, "the umT5 text encoder")
    if not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{src}: no such umT5 checkpoint (a text_encoder folder, .safetensors or .pth)")
    with contextlib.ExitStack() as stack:
        tensors = _open_tensors(path, stack)
        if "token_embedding.weight" in tensors:  # Wan's names
            try:
                tensors = names.hf_from_wan(tensors)
            except ValueError as e:
                raise ValueError(f"{src}: {e}") from None
        try:
            cfg = names.infer_config({k: t.shape for k, t in tensors.items()}, **_folder_settings(path))
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        if names.TOP_NAMES["embed"] not in tensors:
            tensors[names.TOP_NAMES["embed"]] = tensors[names.EMBED_ALIAS]
        jdtype = _DTYPES[dtype]
        shapes = network.param_shapes(cfg, jdtype)
        if mesh is None:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
        else:
            shardings = param_sharding(shapes, mesh)

        def read(name: str, transpose: bool, index: tuple) -> np.ndarray:
            x = tensors[name].read(index[::-1]) if transpose else tensors[name].read(index)
            return np.ascontiguousarray(x.T if transpose else x).astype(jdtype)

        leaves, treedef = jax.tree.flatten_with_path(shapes)
        arrays = []
        for (path_, sds), sharding in zip(tqdm(leaves, desc="umT5", unit="tensor"), jax.tree.leaves(shardings)):
            keys = [p.key for p in path_]
            if keys[0] == "layers":
                suffix, transpose = names.LAYER_NAMES[keys[1]]

                def callback(index, suffix=suffix, transpose=transpose):
                    layers = range(cfg.num_layers)[index[0]]
                    return np.stack([read(f"encoder.block.{i}.{suffix}", transpose, index[1:]) for i in layers])
            else:

                def callback(index, name=names.TOP_NAMES[keys[0]]):
                    return read(name, False, index)

            arrays.append(jax.make_array_from_callback(sds.shape, sharding, callback))
    return cfg, jax.tree.unflatten(treedef, arrays)


def state_dict(cfg: UMT5Config, params: dict) -> dict[str, np.ndarray]:
    """transformers-named host arrays (PyTorch layouts) of a parameter tree."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    out = {name: host[leaf] for leaf, name in names.TOP_NAMES.items()}
    for leaf, (suffix, transpose) in names.LAYER_NAMES.items():
        for i in range(cfg.num_layers):
            x = host["layers"][leaf][i]
            out[f"encoder.block.{i}.{suffix}"] = np.ascontiguousarray(x.T if transpose else x)
    return out


def save(path: str | os.PathLike, cfg: UMT5Config, params: dict) -> None:
    """A transformers `UMT5EncoderModel` folder: config.json and model.safetensors."""
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["UMT5EncoderModel"],
        "model_type": "umt5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.num_buckets,
        "relative_attention_max_distance": cfg.max_distance,
        "layer_norm_epsilon": cfg.eps,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "model.safetensors").write_bytes(safetensors_bytes(state_dict(cfg, params), metadata={"format": "pt"}))


def save_wan(path: str | os.PathLike, cfg: UMT5Config, params: dict) -> None:
    """Wan's `models_t5_umt5-xxl-enc-*.pth` layout: a torch.save zip with Wan's names (no torch needed)."""
    torchfile.save(os.fspath(path), names.wan_from_hf(state_dict(cfg, params)))


# --------------------------------------------------------------------------------------------------------- tokenizer
@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A umT5 `tokenizers.Tokenizer` with its pad and end-of-sequence ids."""

    tokenizer: tokenizers.Tokenizer
    pad_id: int
    eos_id: int


def _special(folder: epath.Path, field: str, default: str) -> str:
    """The token named `field` by tokenizer_config.json or special_tokens_map.json, else `default`."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            token = _read_json(file).get(field)
            token = token.get("content") if isinstance(token, dict) else token
            if token:
                return token
    return default


def load_tokenizer(src: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a folder with tokenizer.json (Wan's `google/umt5-xxl/`, diffusers' `tokenizer/`) or of a
    tokenizer.json file, local or hf://; pad / eos tokens from the folder's tokenizer_config.json, else
    `<pad>` / `</s>`."""
    path = epath.Path(hub.resolve(os.fspath(src)))
    file, folder = (path / "tokenizer.json", path) if path.is_dir() else (path, path.parent)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected google/umt5-xxl's tokenizer folder)")
    tok = tokenizers.Tokenizer.from_str(file.read_text())
    ids = {}
    for field, default in (("pad_token", PAD_TOKEN), ("eos_token", EOS_TOKEN)):
        token = _special(folder, field, default)
        ids[field] = tok.token_to_id(token)
        if ids[field] is None:
            raise ValueError(f"{file}: {field} {token!r} is not in the vocabulary")
    return Tokenizer(tok, ids["pad_token"], ids["eos_token"])


def clean(text: str) -> str:
    """Wan's `clean='whitespace'`: HTML entities unescaped (twice), whitespace runs collapsed to one space, stripped.
    Wan also runs ftfy.fix_text (mojibake repair) first; diffusers skips it when ftfy is absent, so do we."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def tokenize(
    src_or_tokenizer: str | os.PathLike | Tokenizer, prompts: str | Sequence[str], max_length: int = TEXT_LEN
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 (B, max_length) of the cleaned prompts: tokens (at most max_length - 1), `</s>`, then pad
    tokens with mask 0, as transformers' T5 tokenizer with padding="max_length", truncation=True."""
    tok = src_or_tokenizer if isinstance(src_or_tokenizer, Tokenizer) else load_tokenizer(src_or_tokenizer)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = np.full((len(prompts), max_length), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    encodings = tok.tokenizer.encode_batch([clean(p) for p in prompts], add_special_tokens=False)
    for row, row_mask, enc in zip(ids, mask, encodings):
        tokens = [*enc.ids[: max_length - 1], tok.eos_id]
        row[: len(tokens)] = tokens
        row_mask[: len(tokens)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------- context
def embed(cfg: UMT5Config, params: dict, ids_bl: jax.Array, mask_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(context (B, L, d_model) float32, lengths (B,) int32); jit-able.

    Wan's rule: each prompt's last hidden state kept for its true length (the mask's sum) and zero after it, the
    zero padding the DiT sees (wan/text2video.py trims to the length; the DiT pads back to text_len with zeros).
    """
    mask_bl = jnp.asarray(mask_bl)
    hidden = network.encode(cfg, params, ids_bl, mask_bl).astype(jnp.float32)
    lengths = jnp.sum(mask_bl > 0, axis=1).astype(jnp.int32)
    keep = jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[..., None], hidden, 0.0), lengths


# -------------------------------------------------------------------------------------------------------- tiny files
def tiny_tokenizer(words: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """A small Unigram tokenizer in google/umt5-xxl's layout (`<pad>` 0, `</s>` 1, `<unk>` 2, Metaspace pieces,
    `$A </s>` post-processor): each word of `words` is a piece, and single letters cover any other word."""
    pieces = [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,"]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )
    tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    return tok


def write_tiny(
    path: str | os.PathLike, seed: int = 0, cfg: UMT5Config = network.UMT5_TINY, words: Sequence[str] = ()
) -> UMT5Config:
    """A tiny random text-encoder folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
    for tests and toy runs; the vocabulary is widened to the tokenizer's if needed. Returns its config."""
    tok = tiny_tokenizer(words)
    cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
    save(path, cfg, network.init_params(cfg, jax.random.key(seed)))
    path = epath.Path(path)
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN})
    )
    return cfg


# --------------------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trigflow_distill.models.umt5",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--text-encoder", required=True, help="text_encoder folder, .safetensors or Wan .pth")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the --text-encoder folder)")
    parser.add_argument("--prompt", required=True, action="append", help="prompt (repeat for a batch)")
    parser.add_argument("--out", required=True, help="output .npz: context float32 (B, L, d_model), lengths (B,)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--max-length", type=int, default=TEXT_LEN)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg, params = load(args.text_encoder, args.dtype)
        ids, mask = tokenize(args.tokenizer or args.text_encoder, args.prompt, args.max_length)
        context, lengths = jax.jit(embed, static_argnums=0)(cfg, params, ids, mask)
        np.savez(args.out, context=np.asarray(context), lengths=np.asarray(lengths))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: context {context.shape}, lengths {np.asarray(lengths).tolist()} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())
