"""umT5 text encoder of Wan2.1: parity with transformers' UMT5EncoderModel (masked, padded prompts), Wan's context
rule, the transformers <-> Wan name map, loading every checkpoint layout, and the tokenizer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trigflow_distill.models import torchfile, umt5
from trigflow_distill.models.umt5 import names, network

TINY_HF = dict(
    vocab_size=300,
    d_model=64,
    d_kv=8,
    d_ff=96,
    num_layers=3,
    num_heads=6,  # inner width 48 != d_model
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
# Prompt lengths of the parity batch: one past the last bucket boundary (64) and shorter ones, in 96 tokens.
LENGTHS = (90, 37, 5)


def _hf_model(seed=0):
    """A tiny random transformers UMT5EncoderModel whose every weight matters: non-unit norm weights, position
    biases large enough to shape attention, matrices scaled to keep activations O(1)."""
    import torch
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(HFConfig(**TINY_HF)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(2.0 * torch.randn_like(p))
            elif name in ("shared.weight", "encoder.embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY_HF["vocab_size"], (len(LENGTHS), 96)).astype(np.int32)
    mask = (np.arange(96)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    ids[mask == 0] = 0  # <pad>
    return ids, mask


@pytest.mark.torch
def test_encode_matches_transformers_umt5_and_wan_context_rule(tmp_path):
    pytest.importorskip("transformers")
    import torch

    model = _hf_model()
    model.save_pretrained(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    ref = ref.numpy()

    cfg, params = umt5.load(tmp_path, dtype="float32")
    assert cfg == network.UMT5Config(vocab_size=300, d_model=64, num_layers=3, num_heads=6, d_kv=8, d_ff=96)
    encode = jax.jit(network.encode, static_argnums=0)  # each compiled once per dtype, re-used below
    embed = jax.jit(umt5.embed, static_argnums=0)
    hidden = np.asarray(encode(cfg, params, ids, mask))
    context, lengths = embed(cfg, params, ids, mask)
    context, lengths = np.asarray(context), np.asarray(lengths)
    assert context.shape == (3, 96, 64) and context.dtype == np.float32
    np.testing.assert_array_equal(lengths, LENGTHS)
    for b, n in enumerate(LENGTHS):
        err = np.abs(hidden[b, :n] - ref[b, :n]).max()
        assert err <= 2e-5, (b, err)
        np.testing.assert_array_equal(context[b, :n], hidden[b, :n])
        assert (context[b, n:] == 0).all()  # Wan's rule: trimmed to the length, zero-padded back
    # The position biases and every layer matter: the outputs are far from those of a model without them.
    no_bias = jax.tree.map(lambda x: x, params)
    no_bias["layers"]["rel_bias"] = jnp.zeros_like(params["layers"]["rel_bias"])
    assert np.abs(np.asarray(encode(cfg, no_bias, ids, mask)) - hidden).max() > 0.1
    # Padding only reaches the kept positions through the mask: other pad ids give the same context.
    other = np.where(mask == 1, ids, 7)
    np.testing.assert_allclose(np.asarray(embed(cfg, params, other, mask)[0]), context, atol=1e-6)

    # bf16 weights and compute stay close to the fp32 reference.
    _, params16 = umt5.load(tmp_path, dtype="bfloat16")
    assert params16["layers"]["q"].dtype == jnp.bfloat16
    hidden16 = np.asarray(encode(cfg, params16, ids, mask), np.float32)
    rel = np.abs(hidden16[0, :90] - ref[0, :90]).mean() / np.abs(ref[0, :90]).mean()
    assert rel < 0.03, rel


@pytest.mark.torch
def test_relative_position_buckets_match_transformers():
    pytest.importorskip("transformers")
    import torch
    from transformers import UMT5Config as HFConfig
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(HFConfig(**TINY_HF), has_relative_attention_bias=True)
    length = 700  # past max_distance both ways
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(network.relative_position_buckets(network.UMT5_XXL, length), ref)


def test_wan_name_map_round_trip_and_wan_names():
    cfg = network.UMT5Config(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_kv=4, d_ff=24)
    state = umt5.state_dict(cfg, network.init_params(cfg, jax.random.key(1)))
    wan = names.wan_from_hf(state)
    # Wan's T5Encoder(shared_pos=False) names (wan/modules/t5.py), written out independently of the map.
    block = [
        "norm1.weight",
        "attn.q.weight",
        "attn.k.weight",
        "attn.v.weight",
        "attn.o.weight",
        "pos_embedding.embedding.weight",
        "norm2.weight",
        "ffn.gate.0.weight",
        "ffn.fc1.weight",
        "ffn.fc2.weight",
    ]
    expected = {"token_embedding.weight", "norm.weight"} | {f"blocks.{i}.{n}" for i in range(2) for n in block}
    assert set(wan) == expected
    back = names.hf_from_wan(wan)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k] is v  # same arrays: the round trip is bit-exact
    assert wan["blocks.1.ffn.gate.0.weight"] is state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    # The tied duplicate and a full model's decoder are dropped.
    extra = {**state, "encoder.embed_tokens.weight": state["shared.weight"], "decoder.block.0.x": np.zeros(1)}
    assert set(names.wan_from_hf(extra)) == expected
    with pytest.raises(ValueError, match="not a Wan umT5"):
        names.hf_from_wan({"blocks.0.attn.qkv.weight": np.zeros(1)})


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_load_layouts_and_errors(tmp_path):
    cfg = network.UMT5Config(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_kv=4, d_ff=24)
    params = network.init_params(cfg, jax.random.key(0))
    umt5.save(tmp_path / "hf", cfg, params)
    got_cfg, got = umt5.load(tmp_path / "hf", dtype="float32")
    assert got_cfg == cfg
    _assert_trees_equal(got, params)

    # Sharded with an index, the embedding under its tied name only, plus a full model's decoder (ignored).
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    state["decoder.final_layer_norm.weight"] = np.ones(16, np.float32)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys, weight_map = sorted(state), {}
    for s in range(3):
        name = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in keys[s::3]}, sharded / name)
        weight_map.update(dict.fromkeys(keys[s::3], name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_trees_equal(umt5.load(sharded, dtype="float32")[1], params)

    # Wan's .pth (bf16 as released) and a single .safetensors file with Wan's names.
    umt5.save_wan(tmp_path / "enc.pth", cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert "token_embedding.weight" in torchfile.LazyStateDict(tmp_path / "enc.pth")
    cfg16, got16 = umt5.load(tmp_path / "enc.pth", dtype="bfloat16")
    assert cfg16 == cfg
    _assert_trees_equal(got16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    save_file(names.wan_from_hf(umt5.state_dict(cfg, params)), tmp_path / "wan.safetensors")
    _assert_trees_equal(umt5.load(tmp_path / "wan.safetensors", dtype="float32")[1], params)

    # config.json settings that are not in the shapes are read; other FFN kinds refused.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "relative_attention_max_distance": 64}))
    assert umt5.load(tmp_path / "hf", dtype="float32")[0].max_distance == 64
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="gated-gelu"):
        umt5.load(tmp_path / "hf")

    # One error lists missing, unknown and mis-shaped tensors.
    bad = dict(state)
    del bad["encoder.block.1.layer.0.SelfAttention.k.weight"]
    bad["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((16, 7), np.float32)
    bad["encoder.block.0.layer.0.SelfAttention.extra"] = np.zeros(2, np.float32)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing .*SelfAttention\.k.*; unknown .*extra.*; mis-shaped .*wo\.weight"):
        umt5.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        umt5.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        umt5.load(tmp_path / "hf", dtype="float16")


@pytest.mark.torch
def test_load_pth_written_by_torch_save(tmp_path):
    pytest.importorskip("transformers")
    import torch

    model = _hf_model(seed=1)
    wan = names.wan_from_hf({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    torch.save(wan, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    cfg, params = umt5.load(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", dtype="float32")
    assert cfg.num_layers == 3 and cfg.num_heads == 6
    ref = model.state_dict()
    q = ref["encoder.block.2.layer.0.SelfAttention.q.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"]["q"][2]), q.T)
    emb = ref["shared.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]), emb)


def test_tokenize_like_wan(tmp_path):
    words = ("a", "red", "car", "in", "the", "rain")
    umt5.tiny_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    tok = umt5.load_tokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    vocab = tok.tokenizer.get_vocab()
    ids, mask = umt5.tokenize(tok, ["a red car", "  a red\n\tcar  in &amp;amp; rain"], max_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int32
    expected = [vocab["▁a"], vocab["▁red"], vocab["▁car"], 1]
    np.testing.assert_array_equal(ids[0], expected + [0] * 12)
    np.testing.assert_array_equal(mask[0], [1] * 4 + [0] * 12)
    # Cleaning: whitespace runs collapse, entities unescaped twice ("&amp;amp;" -> "&" -> unknown piece).
    assert umt5.clean("  a red\n\tcar  in &amp;amp; rain") == "a red car in & rain"
    assert mask[1].sum() == len(tok.tokenizer.encode("a red car in & rain", add_special_tokens=False).ids) + 1
    # Truncation keeps max_length - 1 tokens and the end-of-sequence token.
    long_ids, long_mask = umt5.tokenize(tok, " ".join(["red"] * 40), max_length=16)
    np.testing.assert_array_equal(long_ids[0], [vocab["▁red"]] * 15 + [1])
    assert long_mask.all()
    # Through a path (the folder), with the default 512.
    ids512, _ = umt5.tokenize(tmp_path, "a red car")
    assert ids512.shape == (1, 512)
    np.testing.assert_array_equal(ids512[0, :16], ids[0])
    # A tokenizer without the pad token is refused.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    with pytest.raises(ValueError, match="pad_token"):
        umt5.load_tokenizer(tmp_path)


@pytest.mark.torch
def test_tokenize_matches_transformers_t5_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    words = ("a", "red", "car", "in", "the", "rain")
    umt5.tiny_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    prompts = ["a red car", "the car in the rain xyz", " ".join(["rain"] * 30), ""]
    # As Wan's HuggingfaceTokenizer calls it (text already cleaned).
    ref = hf(prompts, padding="max_length", truncation=True, max_length=20, add_special_tokens=True)
    ids, mask = umt5.tokenize(umt5.load_tokenizer(tmp_path), prompts, max_length=20)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))


def test_write_tiny_and_cli(tmp_path, capsys):
    cfg = umt5.write_tiny(tmp_path / "te", words=("a", "red", "car"))
    out = tmp_path / "context.npz"
    argv = ["--text-encoder", str(tmp_path / "te"), "--prompt", "a red car", "--prompt", "a car"]
    rc = umt5.main([*argv, "--out", str(out), "--dtype", "float32", "--max-length", "32"])
    assert rc == 0
    got = np.load(out)
    assert got["context"].shape == (2, 32, cfg.d_model)
    np.testing.assert_array_equal(got["lengths"], [4, 3])
    assert (got["context"][0, 4:] == 0).all() and (got["context"][1, 3:] == 0).all()
    assert np.abs(got["context"][1, :3]).min() > 0
    assert umt5.main(["--text-encoder", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 1
    assert "error:" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "te" / "tokenizer.json")


def test_load_fsdp_sharded_from_wan_pth(tmp_path):
    from trigflow_distill.common import sharding

    cfg = network.UMT5Config(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128)
    params = network.init_params(cfg, jax.random.key(2))
    umt5.save_wan(tmp_path / "enc.pth", cfg, params)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    _, sharded = umt5.load(tmp_path / "enc.pth", dtype="float32", mesh=mesh)
    _assert_trees_equal(sharded, params)
    # Stacked kernels split on their widest non-layer dim (read as transposed slices of the .pth tensors).
    assert sharded["layers"]["wi_0"].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert sharded["layers"]["wi_0"].addressable_shards[0].data.shape == (2, 64, 16)
    assert sharded["embed"].addressable_shards[0].data.shape == (32, 64)
    ids, mask = np.ones((8, 24), np.int32), (np.arange(24)[None] < np.arange(1, 9)[:, None] * 3).astype(np.int32)
    ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    got, lengths = jax.jit(umt5.embed, static_argnums=0)(cfg, sharded, ids, mask)
    want, _ = jax.jit(umt5.embed, static_argnums=0)(cfg, params, np.asarray(ids), mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lengths), np.arange(1, 9) * 3)


def test_damaged_safetensors_is_named_before_it_is_opened(tmp_path):
    """A truncated model.safetensors: a one-line ValueError naming it (the library's error names no file)."""
    cfg = network.UMT5Config(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_kv=4, d_ff=24)
    umt5.save(tmp_path / "hf", cfg, network.init_params(cfg, jax.random.key(0)))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        umt5.load(tmp_path / "hf", dtype="float32")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_config_limits_before_anything_is_allocated(tmp_path):
    """Sizes from the tensor names / shapes (one damaged block name, zero heads) or config.json out of range are
    refused naming the size (and the file), before the network's tensors are listed."""
    cfg = network.UMT5Config(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_kv=4, d_ff=24)
    shapes = names.hf_shapes(cfg)
    far = f"encoder.block.{names.CONFIG_LIMITS['num_layers']}.layer.0.layer_norm.weight"
    with pytest.raises(ValueError, match=r"num_layers = 513 .*out of range \(a whole number in 1\.\.512\)"):
        names.infer_config({**shapes, far: (16,)})
    rel = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    with pytest.raises(ValueError, match=r"num_heads = 0 .*out of range"):
        names.infer_config({**shapes, rel: (32, 0)})
    umt5.save(tmp_path / "hf", cfg, network.init_params(cfg, jax.random.key(0)))
    config_json = tmp_path / "hf" / "config.json"
    config = json.loads(config_json.read_text())
    for field, value in (("num_layers", 10**9), ("d_model", "16"), ("relative_attention_max_distance", "far")):
        config_json.write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=r"= .*out of range \(a whole number in 1\.\.") as e:
            umt5.load(tmp_path / "hf", dtype="float32")
        assert str(config_json) in str(e.value) and "\n" not in str(e.value)
