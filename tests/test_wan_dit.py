"""Wan2.1 DiT: parity with diffusers' WanTransformer3DModel (an independent PyTorch implementation) for T2V and
I2V, through both the diffusers and the release ("native") names and safetensors loading; the name maps' round
trips; every parameter matters at the parity tolerance."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trigflow_distill.models import wan_dit
from trigflow_distill.models.wan_dit import checkpoint
from trigflow_distill.models.wan_dit import names as wn

torch = pytest.importorskip("torch")
tw = pytest.importorskip("diffusers.models.transformers.transformer_wan")

pytestmark = pytest.mark.torch

T2V = wan_dit.get_preset("tiny")
I2V = wan_dit.get_preset("tiny_i2v")
TOL = 1e-5
SHAPE = (2, 3, 4, 6)  # B, T, H, W of the latents: 3 x 2 x 3 patches, H' != W' so the RoPE axes cannot swap


def random_params(config, seed):
    """Random weights everywhere, scaled so that every block changes the residual stream by O(1): kernels
    N(0, 1/fan_in), norm scales 1 + 0.2 z, biases 0.1 z, modulation tables 0.3 z."""
    shapes = wan_dit.param_shapes(config)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    rng = np.random.default_rng(seed)
    out = []
    for path, shape in paths:
        z = rng.standard_normal(shape).astype(np.float32)
        kind = path[-1].key
        scaled = {"scale": 1.0 + 0.2 * z, "bias": 0.1 * z, "modulation": 0.3 * z}
        out.append(scaled.get(kind, z / np.sqrt(shape[-2]) if kind == "kernel" else z).astype(np.float32))
    return jax.tree.unflatten(treedef, out)


def make_inputs(config, seed, per_frame=False):
    b, t, h, w = SHAPE
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, config.out_dim, t, h, w)).astype(np.float32)
    ts = rng.uniform(0, 1, (b, t) if per_frame else (b,)).astype(np.float32)
    text = rng.standard_normal((b, 7, config.text_dim)).astype(np.float32)  # zero-padded to text_len by the net
    cond = rng.standard_normal((b, config.cond_dim, t, h, w)).astype(np.float32) if config.cond_dim else None
    image = rng.standard_normal((b, 257, config.image_dim)).astype(np.float32) if config.image_dim else None
    return x, ts, text, cond, image


def torch_model(config, native_sd):
    kwargs = {k: v for k, v in wn.diffusers_config(config).items() if k[0] != "_"}
    model = tw.WanTransformer3DModel(**kwargs)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in wn.diffusers_from_native(native_sd).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(".norm_added_q." in k for k in missing), (missing, unexpected)
    return model.eval()


def torch_velocity(model, config, inputs):
    """diffusers' forward on the same inputs: timestep 1000 t (per token when per frame), text zero-padded to 512
    (diffusers takes the image / text split as 'the last 512 tokens are text')."""
    x, ts, text, cond, image = inputs
    b, t, h, w = SHAPE
    text = np.pad(text, ((0, 0), (0, config.text_len - text.shape[1]), (0, 0)))
    hidden = np.concatenate([x, cond], axis=1) if cond is not None else x
    steps = np.float32(config.num_train_timesteps) * ts
    if ts.ndim == 2:  # one time per latent frame -> one per token, frame-major
        steps = np.repeat(steps, (h // 2) * (w // 2), axis=1)
    with torch.no_grad():
        out = model(
            torch.from_numpy(hidden),
            torch.from_numpy(steps),
            torch.from_numpy(text),
            encoder_hidden_states_image=None if image is None else torch.from_numpy(image),
            return_dict=False,
        )[0]
    return out.numpy()


def jax_velocity(config, params, inputs):
    x, ts, text, cond, image = inputs
    return np.asarray(jax.jit(wan_dit.velocity, static_argnums=0)(config, params, x, ts, text, cond, image))


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def case(request):
    config = {"t2v": T2V, "i2v": I2V}[request.param]
    params = random_params(config, seed=7)
    native = wn.state_dict_from_params(params, config)
    return config, params, native, torch_model(config, native)


@pytest.mark.parametrize("per_frame", [False, True], ids=["per_video_time", "per_frame_time"])
def test_parity_with_diffusers(case, per_frame):
    config, params, _, model = case
    inputs = make_inputs(config, seed=3, per_frame=per_frame)
    ref = torch_velocity(model, config, inputs)
    out = jax_velocity(config, params, inputs)
    assert out.shape == ref.shape == inputs[0].shape
    err = np.max(np.abs(out - ref))
    print(
        f"{'i2v' if config.image_dim else 't2v'} per_frame={per_frame}: max abs {err:.2e}, max |ref| "
        f"{np.max(np.abs(ref)):.2f}"
    )
    assert err <= TOL


@pytest.mark.parametrize("layout", checkpoint.LAYOUTS)
def test_load_from_safetensors_matches_diffusers(case, layout, tmp_path):
    """diffusers' own weights, saved by diffusers (a pipeline folder's transformer/) or renamed to the release's
    names (two shards with an index, under ComfyUI's prefix), load back to the same config and network."""
    config, _, _, model = case
    from safetensors.numpy import save_file

    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if layout == "diffusers":  # diffusers writes its own folder (a pipeline's transformer/)
        model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
        src = tmp_path
    else:
        native = {wn.NATIVE_PREFIX + k: v for k, v in wn.native_from_diffusers(sd).items()}
        keys = sorted(native)
        shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
        for file, part in shards.items():
            save_file({k: native[k] for k in part}, str(tmp_path / file))
        weight_map = {k: f for f, part in shards.items() for k in part}
        (tmp_path / checkpoint.INDEX).write_text(json.dumps({"weight_map": weight_map}))
        src = tmp_path / checkpoint.INDEX  # no config.json: the heads are not in the shapes, so pass them
    overrides = {"num_heads": config.num_heads} if layout == "native" else {}
    loaded_config, params = checkpoint.load(src, **overrides)
    assert loaded_config == config
    inputs = make_inputs(config, seed=3)
    err = np.max(np.abs(jax_velocity(config, params, inputs) - torch_velocity(model, config, inputs)))
    print(f"{layout}: max abs {err:.2e}")
    assert err <= TOL


def test_name_maps_round_trip_bit_exact(case, tmp_path):
    config, params, native, model = case
    diffusers = wn.diffusers_from_native(native)
    assert set(diffusers) == set(model.state_dict())
    back = wn.native_from_diffusers(diffusers)
    assert set(back) == set(native) == set(wn.native_shapes(config))
    assert all(np.array_equal(back[k], native[k]) for k in native)
    again = wn.params_from_state_dict(back, config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)
    assert wn.infer_config({k: v.shape for k, v in native.items()}, num_heads=config.num_heads) == config
    for layout in checkpoint.LAYOUTS:
        checkpoint.save(tmp_path / layout, config, params, layout=layout)
        loaded_config, loaded = checkpoint.load(tmp_path / layout)
        assert loaded_config == config
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, params)


def test_every_parameter_matters(case):
    """Perturbing any one leaf changes the output by over 100x the parity tolerance, so the parity covers it (the
    weakest are the key biases, which softmax nearly cancels: only the RMSNorm after them keeps them)."""
    config, params, _, _ = case
    inputs = make_inputs(config, seed=4, per_frame=True)
    f = jax.jit(wan_dit.velocity, static_argnums=0)
    base = f(config, params, *inputs)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(5)
    weak = []
    for i, leaf in enumerate(leaves):
        bumped = list(leaves)
        bumped[i] = leaf + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        delta = float(jnp.max(jnp.abs(f(config, jax.tree.unflatten(treedef, bumped), *inputs) - base)))
        if delta < 100 * TOL:
            weak.append((jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0][i][0]), delta))
    assert not weak, weak


@pytest.mark.slow  # three compiles, two of them of the gradient: ~30 s on the shared 2-core CPU
def test_remat_block_outputs_and_bf16():
    """Remat changes nothing (values and gradients); bf16 compute stays close to fp32 and returns the residual
    stream after a block. T2V with a short text context, to keep the compiles fast."""
    config = wan_dit.get_preset("tiny", text_len=16)
    params = random_params(config, seed=8)
    inputs = make_inputs(config, seed=6, per_frame=True)
    loss = lambda cfg, p: jnp.sum(wan_dit.velocity(cfg, p, *inputs) ** 2)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    value, grads = value_and_grad(config, params)
    v2, g2 = value_and_grad(dataclasses.replace(config, remat=True), params)
    np.testing.assert_allclose(v2, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()), g2, grads)
    out32 = jax_velocity(config, params, inputs)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    out16, feats = jax.jit(wan_dit.velocity, static_argnums=(0, 7))(bf16, params, *inputs, (0,))
    assert np.max(np.abs(np.asarray(out16) - out32)) < 0.05 * np.max(np.abs(out32))
    b, t, h, w = SHAPE
    assert list(feats) == [0] and feats[0].shape == (b, t * (h // 2) * (w // 2), config.dim)
    assert feats[0].dtype == jnp.float32 and np.all(np.isfinite(feats[0]))


def test_errors():
    params = random_params(I2V, seed=0)
    x, ts, text, cond, image = make_inputs(I2V, seed=0)
    with pytest.raises(ValueError, match="image_bic"):
        wan_dit.velocity(I2V, params, x, ts, text, cond)
    with pytest.raises(ValueError, match="cond_bcthw"):
        wan_dit.velocity(I2V, params, x, ts, text, None, image)
    with pytest.raises(ValueError, match="text_bld"):
        wan_dit.velocity(I2V, params, x, ts, np.zeros((2, 513, 32), np.float32), cond, image)
    native = wn.state_dict_from_params(params, I2V)
    with pytest.raises(ValueError, match="diffusers WanTransformer3DModel state dict"):
        wn.params_from_state_dict(wn.diffusers_from_native(native), I2V)
    with pytest.raises(ValueError, match="missing keys"):
        wn.params_from_state_dict({k: v for k, v in native.items() if "k_img" not in k}, I2V)
    with pytest.raises(ValueError, match="shape mismatch"):
        wn.params_from_state_dict({**native, "head.modulation": np.zeros((1, 3, 64), np.float32)}, I2V)
    with pytest.raises(ValueError, match="not a native Wan2.1"):
        wn.infer_config({"x_embedder.proj.1.weight": (8, 8)})
    with pytest.raises(ValueError, match="pass num_heads"):
        wn.infer_config({k: v.shape for k, v in native.items()})
    assert wn.infer_config({k: v.shape for k, v in native.items()}, num_heads=4) == I2V


@pytest.mark.parametrize("name", ["t2v_1_3b", "t2v_14b", "i2v_14b"])
def test_release_shapes(name):
    """The presets' release tensor shapes give the preset back (heads from the 128-channel default)."""
    config = wan_dit.get_preset(name)
    shapes = wn.native_shapes(config)
    assert shapes["patch_embedding.weight"] == (config.dim, config.in_dim, 1, 2, 2)
    assert shapes["blocks.0.modulation"] == (1, 6, config.dim)
    assert wn.infer_config(shapes) == config
    assert sum(int(np.prod(s)) for s in shapes.values()) / 1e9 == pytest.approx(
        {"t2v_1_3b": 1.42, "t2v_14b": 14.3, "i2v_14b": 16.4}[name], rel=0.03
    )


def _write_native(folder, config, extra=(), cfg_json=None):
    """A release-layout folder of zero weights for `config` (plus `extra` tensors) and optionally a config.json."""
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    sd = {k: np.zeros(s, np.float32) for k, s in wn.native_shapes(config).items()}
    sd.update({k: np.zeros(2, np.float32) for k in extra})
    save_file(sd, str(folder / checkpoint.WEIGHTS))
    if cfg_json is not None:
        (folder / "config.json").write_text(json.dumps(cfg_json))
    return folder


def test_damaged_safetensors_is_named_before_it_is_opened(tmp_path):
    """A truncated weights file: a one-line ValueError naming it (the library's error names no file)."""
    folder = _write_native(tmp_path / "wan", T2V)
    weights = folder / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        checkpoint.load(folder, num_heads=T2V.num_heads)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_config_limits_before_anything_is_allocated(tmp_path):
    """A damaged block name (a billion layers) or config.json (absurd or non-numeric heads, text_len) is refused
    naming the size and the file, before the tensors of such a network are listed."""
    shapes = {k: tuple(v) for k, v in wn.native_shapes(T2V).items()}
    with pytest.raises(ValueError, match=r"num_layers = 1000000000 .*out of range \(a whole number in 1\.\.512\)"):
        wn.infer_config({**shapes, "blocks.999999999.ffn.0.weight": (2,)}, num_heads=T2V.num_heads)
    with pytest.raises(ValueError, match=r"ffn_dim = 0 .*out of range"):
        wn.infer_config({**shapes, "blocks.0.ffn.0.weight": (0, T2V.dim)}, num_heads=T2V.num_heads)
    folder = _write_native(tmp_path / "layers", T2V, extra=[f"blocks.{wn.CONFIG_LIMITS['num_layers']}.norm3.weight"])
    with pytest.raises(ValueError, match=r"layers.*num_layers = 513 .*out of range"):
        checkpoint.load(folder, num_heads=T2V.num_heads)
    for field, value in (("num_heads", 10**9), ("num_heads", "12"), ("text_len", 1 << 40)):
        folder = _write_native(tmp_path / f"{field}{value}", T2V, cfg_json={"num_heads": 2, field: value})
        with pytest.raises(ValueError, match=rf"{field} = {value!r} .*out of range") as e:
            checkpoint.load(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
