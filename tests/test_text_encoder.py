"""Reason1 text encoder (docs/algorithm.md §11): parity with transformers' Qwen2.5-VL, checkpoint layouts, the chat
template's token layout, and the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trigflow_distill.common import sharding
from trigflow_distill.models import reason1
from trigflow_distill.models.reason1 import qwen2

# Qwen2.5-VL's chat template (chat_template.json of the Qwen2.5-VL / Reason1 folders).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_WORDS = "You are a helpful assistant who will provide prompts to an image generator".split()


def full_concat_reference(hidden_states):
    """FULL_CONCAT from transformers' output_hidden_states, written with torch as the reference does."""
    import torch

    return torch.cat(
        [(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hidden_states[1:]], dim=-1
    ).numpy()


@pytest.mark.torch
def test_embed_matches_transformers_qwen2_5_vl(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=300,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
        ),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # the init has zero biases and unit norm weights: perturb them all
        for name, p in model.named_parameters():
            if not name.startswith(("model.visual", "visual")):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)

    ids = torch.randint(0, 300, (2, 96))
    ids[1, 40:] = 7  # a run of "pad" tokens, attended causally (no mask) like any other
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    ref = full_concat_reference(out.hidden_states)

    cfg, params = reason1.load(tmp_path, dtype="float32")
    assert cfg == qwen2.Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
    )
    got = np.asarray(jax.jit(reason1.embed, static_argnums=0)(cfg, params, ids.numpy()))
    assert got.shape == (2, 96, 3 * 64) and got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err <= 2e-5, err

    # bf16 weights and compute stay close to the fp32 reference (normalised features are O(1)).
    cfg16, params16 = reason1.load(tmp_path, dtype="bfloat16")
    assert params16["layers"]["q_w"].dtype == jnp.bfloat16
    got16 = np.asarray(jax.jit(reason1.embed, static_argnums=0)(cfg16, params16, ids.numpy()))
    assert np.abs(got16 - ref).mean() < 0.05


def _rewrite(src, dst, rename, shards=1, config=None):
    """Copy the weights of folder `src` to `dst` with renamed keys in `shards` files (+ index when > 1)."""
    tensors = {rename(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config(cfg) if config else cfg, f)
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(dst, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(dst, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _nest_text_config(cfg):
    """transformers 5.x layout: text settings under text_config, RoPE θ under rope_parameters."""
    text = {k: cfg.pop(k) for k in list(cfg) if k not in ("architectures", "model_type")}
    text["rope_parameters"] = {"rope_type": "default", "type": "mrope", "rope_theta": text.pop("rope_theta")}
    return {**cfg, "text_config": text, "vision_config": {"depth": 1}}


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_load_layouts_sharding_and_errors(tmp_path):
    src = tmp_path / "tiny"
    cfg = reason1.write_tiny(src, hidden_size=64, num_layers=2)
    ref_cfg, ref = reason1.load(src, dtype="float32")
    assert ref_cfg == cfg
    _assert_trees_equal(ref, qwen2.init_params(cfg, jax.random.key(0)))  # save -> load round trip

    # transformers 5.x in-memory names, sharded files with an index, nested text_config, ignored vision/lm_head.
    extra = {"visual.blocks.0.attn.qkv.weight": np.zeros((3, 3), np.float32), "lm_head.weight": np.zeros((2, 2))}
    other = tmp_path / "lm_prefix"
    _rewrite(src, other, lambda k: k.replace("model.", "model.language_model.", 1), shards=3, config=_nest_text_config)
    save_file(extra, os.path.join(other, "extra.safetensors"))
    index = json.loads((other / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "extra.safetensors"))
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg2, params2 = reason1.load(other, dtype="float32")
    assert cfg2 == cfg
    _assert_trees_equal(params2, ref)

    # FSDP over 8 devices: same values, large tensors split over fsdp.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    _, sharded = reason1.load(other, dtype="bfloat16", mesh=mesh)
    _assert_trees_equal(sharded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref))
    assert sharded["layers"]["gate_w"].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert sharded["layers"]["gate_w"].addressable_shards[0].data.shape == (2, 64, 16)

    # Missing and unknown keys are listed.
    bad = tmp_path / "bad"
    _rewrite(src, bad, lambda k: k.replace("layers.1.mlp.up_proj", "layers.1.mlp.upper_proj"))
    with pytest.raises(
        ValueError,
        match=r"missing model\.layers\.1\.mlp\.up_proj\.weight; unknown "
        r"model\.layers\.1\.mlp\.upper_proj\.weight",
    ):
        reason1.load(bad, dtype="float32")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        reason1.load(tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        reason1.load(src, dtype="float16")


def test_tokenize_template_layout_padding_and_truncation(tmp_path):
    words = ("a", "red", "car")
    reason1.write_tiny(tmp_path, words=words)
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tid = tok.token_to_id
    expected = (
        [tid("<|im_start|>"), tid("system"), tid("\n")]
        + [tid(w) for w in SYSTEM_WORDS]
        + [tid("."), tid("<|im_end|>"), tid("\n"), tid("<|im_start|>"), tid("user"), tid("\n")]
        + [tid(w) for w in words]
        + [tid("<|im_end|>"), tid("\n")]
    )
    assert None not in expected and len(set(expected)) > 10
    ids = reason1.tokenize(tmp_path, ["a red car", "a car"])
    assert ids.shape == (2, 512) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, : len(expected)], expected)
    assert (ids[0, len(expected) :] == tid("<|endoftext|>")).all()
    assert (ids[1, len(expected) - 1 :] == tid("<|endoftext|>")).all()  # one word shorter
    # A Tokenizer object works too (default pad token).
    np.testing.assert_array_equal(reason1.tokenize(tok, "a red car")[0], ids[0])

    # Truncation: a caption longer than 512 tokens is cut at 512, the template's start kept.
    long = reason1.tokenize(tmp_path, " ".join(["red"] * 600))
    assert long.shape == (1, 512)
    np.testing.assert_array_equal(long[0, : len(expected) - 5], expected[:-5])
    assert (long[0, len(expected) - 5 :] == tid("red")).all()

    # The pad token comes from tokenizer_config.json, also through a loaded tokenizer.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    assert (reason1.tokenize(tmp_path, "a car")[0, len(expected) :] == tid("<|im_end|>")).all()
    loaded = reason1.load_tokenizer(tmp_path)
    np.testing.assert_array_equal(reason1.tokenize(loaded, "a car"), reason1.tokenize(tmp_path, "a car"))

    # A tokenizer without the Qwen special tokens is refused.
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="not a single special token"):
        reason1.tokenize(plain, "a")


@pytest.mark.torch
def test_template_matches_transformers_chat_template(tmp_path):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    reason1.write_tiny(tmp_path, words=("a", "red", "car"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<|endoftext|>")
    hf.chat_template = QWEN25VL_CHAT_TEMPLATE
    caption = "a red car"
    conversation = [  # as the reference builds it
        {"role": "system", "content": [{"type": "text", "text": reason1.SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": caption}]},
    ]
    rendered = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False, add_vision_id=False)
    assert rendered == reason1.render(caption)
    ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False, add_vision_id=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    ours = reason1.tokenize(tmp_path, caption)[0]
    np.testing.assert_array_equal(ours[: len(ids)], ids)
    assert (ours[len(ids) :] == hf.pad_token_id).all()


def test_cli_writes_embedding_and_reports_errors(tmp_path, capsys):
    cfg = reason1.write_tiny(tmp_path / "te", num_layers=2, hidden_size=16)
    out = tmp_path / "emb.npy"
    rc = reason1.main(
        [
            "--text-encoder",
            str(tmp_path / "te"),
            "--prompt",
            "a red car",
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--max-length",
            "32",
        ]
    )
    assert rc == 0
    emb = np.load(out)
    assert emb.shape == (1, 32, cfg.num_layers * cfg.hidden_size)
    # Each layer's slice is normalised per token: mean 0, unbiased std 1.
    per_layer = emb.reshape(1, 32, cfg.num_layers, cfg.hidden_size)
    np.testing.assert_allclose(per_layer.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(per_layer.std(-1, ddof=1), 1, atol=1e-4)
    assert reason1.main(["--text-encoder", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 1
    assert "error:" in capsys.readouterr().err


def test_config_of_released_and_nested_layouts():
    released = {  # the fields of Cosmos-Reason1-7B's config.json (transformers 4.x layout: text settings at the top)
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "sliding_window": 32768,
        "vision_config": {"depth": 32, "hidden_size": 1280},
    }
    assert reason1.config_from_json(released) == qwen2.REASON1_7B
    nested = _nest_text_config({k: v for k, v in released.items() if k != "rope_scaling"})
    assert reason1.config_from_json(nested) == qwen2.REASON1_7B
    with pytest.raises(ValueError, match="use_sliding_window"):
        reason1.config_from_json({**released, "use_sliding_window": True})
    with pytest.raises(ValueError, match="no 'num_hidden_layers'"):
        reason1.config_from_json({k: v for k, v in released.items() if k != "num_hidden_layers"})


@pytest.mark.parametrize(
    "field, value",
    [("num_hidden_layers", 1e9), ("hidden_size", 10**7), ("vocab_size", -1), ("intermediate_size", "big")],
)
def test_oversized_config_is_refused_before_anything_is_allocated(tmp_path, field, value):
    """A damaged config.json (1e9 layers: an 18 GB OOM kill while listing the expected tensors) is a one-line
    error naming the file and the field, raised before the weights are looked at."""
    src = tmp_path / "tiny"
    reason1.write_tiny(src)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        reason1.api.config_from_json(config, src / "config.json")
    message = str(e.value)
    assert str(src / "config.json") in message and field in message and "out of range" in message
    assert "\n" not in message
    if field != "num_hidden_layers":  # 1e9 layers would be the OOM kill on a wrong implementation
        with pytest.raises(ValueError, match=f"config.json: {field} = .* out of range"):
            reason1.load(src, dtype="float32")


def _safetensors_damage(path, kind):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "bad json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    elif kind == "header length past the end":
        path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    elif kind == "offsets outside the file":
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + len(data), end + len(data)]
        raw = json.dumps(header).encode()  # offsets count from the end of the header: the data stays valid
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "kind", ["truncated", "bad json", "header length past the end", "offsets outside the file", "empty"]
)
def test_broken_safetensors_is_a_one_line_error_naming_the_file(tmp_path, kind):
    """The safetensors library's own error is a `SafetensorError` without the file's name (a traceback in the CLI)."""
    src = tmp_path / "tiny"
    reason1.write_tiny(src)
    _safetensors_damage(src / "model.safetensors", kind)
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        reason1.load(src, dtype="float32")
    assert str(src / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["{", "", '{"version": "1.0"}', "\xff"])
def test_broken_tokenizer_json_is_a_one_line_error_naming_the_file(tmp_path, content):
    src = tmp_path / "tiny"
    reason1.write_tiny(src)
    (src / "tokenizer.json").write_text(content, encoding="latin1")
    with pytest.raises(ValueError, match="not a valid tokenizer.json") as e:
        reason1.tokenize(src, ["a red car"])
    assert str(src / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
