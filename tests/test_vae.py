"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, name maps, loading, errors, sharding, bf16, CLI."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trigflow_distill.common import video
from trigflow_distill.models import torchfile, wan_vae
from trigflow_distill.models.wan_vae.names import LATENT_MEAN, LATENT_STD
from trigflow_distill.training import plan

CFG = wan_vae.WanVAEConfig(dim=8, z_dim=16)  # narrow, but the release structure (dim_mult 1,2,4,4; 2 res blocks)


@pytest.fixture(scope="module")
def params():
    return wan_vae.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def torch_vae(params):
    """diffusers' AutoencoderKLWan holding the same weights (through the native -> diffusers name map)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKLWan(base_dim=CFG.dim, z_dim=CFG.z_dim).eval()
    state = wan_vae.native_to_diffusers(wan_vae.to_torch(params, CFG), CFG)
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    return model


def _torch_encode(model, x):
    """Reference normalised latent: posterior mean of diffusers' chunked encoder, (mu - mean) / std."""
    import torch

    with torch.no_grad():
        mu = model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    return (mu - LATENT_MEAN[:, None, None, None]) / LATENT_STD[:, None, None, None]


def _torch_decode(model, z):
    """Reference pixels: diffusers' per-latent-frame decoder loop without its final clamp (the reference's)."""
    import torch

    mu = z * LATENT_STD[:, None, None, None] + LATENT_MEAN[:, None, None, None]
    with torch.no_grad():
        model.clear_cache()
        x = model.post_quant_conv(torch.from_numpy(mu.astype(np.float32)))
        frames = []
        for i in range(x.shape[2]):
            model._conv_idx = [0]
            frames.append(
                model.decoder(
                    x[:, :, i : i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx, first_chunk=i == 0
                )
            )
        model.clear_cache()
        return torch.cat(frames, 2).numpy()


def _parity(model, x, z, x_rec, t):
    """Max abs differences of our encode z / decode x_rec of clip x to diffusers' on its first t frames."""
    want_z = _torch_encode(model, x[:, :, :t])
    t_lat = want_z.shape[2]
    want_x = _torch_decode(model, want_z)
    assert z[:, :, :t_lat].shape == want_z.shape and x_rec[:, :, :t].shape == want_x.shape
    return np.abs(z[:, :, :t_lat] - want_z).max(), np.abs(x_rec[:, :, :t] - want_x).max()


@pytest.mark.torch
def test_parity_with_diffusers_1_5_9_13_frames(params, torch_vae):
    """Our 13-frame encode/decode against diffusers on the 1-, 5-, 9- and 13-frame clips that are its prefixes
    (both are causal, so a clip's latents are a prefix of a longer clip's): one compile instead of four."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 13, 16, 16)).astype(np.float32)
    z = np.asarray(wan_vae.encode(CFG, params, x))
    assert z.shape == (2, 16, 4, 2, 2)
    x_rec = np.asarray(wan_vae.decode(CFG, params, _torch_encode(torch_vae, x)))
    assert x_rec.shape == x.shape
    for t in (1, 5, 9, 13):
        enc_err, dec_err = _parity(torch_vae, x, z, x_rec, t)
        print(f"\nparity T={t} 16x16: encode max abs {enc_err:.2e}, decode max abs {dec_err:.2e}")
        assert enc_err <= 1e-4 and dec_err <= 1e-4
    assert np.abs(x_rec).max() > 1.0  # not clamped (the reference does not clamp; diffusers does)
    # a single image goes through the T = 1 path of its own
    z1, x1 = np.asarray(wan_vae.encode(CFG, params, x[:, :, :1])), np.asarray(wan_vae.decode(CFG, params, z[:, :, :1]))
    np.testing.assert_allclose(z1, z[:, :, :1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(x1, wan_vae.decode(CFG, params, z)[:, :, :1], atol=1e-5, rtol=0)


@pytest.mark.torch
def test_parity_with_diffusers_other_size(params, torch_vae):
    x = np.random.default_rng(1).uniform(-1, 1, (8, 3, 5, 24, 16)).astype(np.float32)
    z = np.asarray(wan_vae.encode(CFG, params, x))
    x_rec = np.asarray(wan_vae.decode(CFG, params, _torch_encode(torch_vae, x)))
    for t in (1, 5):
        enc_err, dec_err = _parity(torch_vae, x, z, x_rec, t)
        print(f"\nparity T={t} 24x16: encode max abs {enc_err:.2e}, decode max abs {dec_err:.2e}")
        assert enc_err <= 1e-4 and dec_err <= 1e-4


@pytest.mark.torch
def test_name_maps_round_trip_bit_exact(params, torch_vae):
    native = wan_vae.to_torch(params, CFG)
    diffusers_sd = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    assert set(wan_vae.native_to_diffusers(native, CFG)) == set(diffusers_sd)
    back = wan_vae.diffusers_to_native(diffusers_sd)  # architecture inferred from the diffusers shapes
    assert list(back) != [] and set(back) == set(native)
    for k, v in native.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    again = wan_vae.from_torch(wan_vae.to_torch(params, CFG), CFG)
    assert all(np.array_equal(again[k], params[k]) for k in params)
    # diffusers' own native-checkpoint converter agrees with our map
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    theirs = convert_wan_vae_to_diffusers(native)
    ours = wan_vae.native_to_diffusers(native, CFG)
    assert {k: id(v) for k, v in theirs.items()} == {k: id(v) for k, v in ours.items()}


def test_load_native_and_diffusers_and_errors(params, tmp_path):
    native = wan_vae.to_torch(params, CFG)
    torchfile.save(tmp_path / "tokenizer.pth", native)
    cfg, loaded = wan_vae.load(tmp_path / "tokenizer.pth")
    assert cfg == CFG and all(np.array_equal(loaded[k], params[k]) for k in params)
    torchfile.save(tmp_path / "bf16.pth", {k: v.astype(ml_dtypes.bfloat16) for k, v in native.items()})
    _, loaded16 = wan_vae.load(tmp_path / "bf16.pth")  # bf16 checkpoints load as float32
    assert all(
        loaded16[k].dtype == np.float32 and np.array_equal(loaded16[k], params[k].astype(ml_dtypes.bfloat16))
        for k in params
    )

    from safetensors.numpy import save_file

    folder = tmp_path / "vae_diffusers"
    folder.mkdir()
    save_file(wan_vae.native_to_diffusers(native, CFG), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 16}))
    cfg2, loaded2 = wan_vae.load(folder)
    assert cfg2 == CFG and all(np.array_equal(loaded2[k], params[k]) for k in params)

    bad = dict(native)
    del bad["decoder.head.2.bias"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    torchfile.save(tmp_path / "bad.pth", bad)
    with pytest.raises(ValueError, match=r"1 missing: decoder\.head\.2\.bias; 1 unknown: encoder\.extra\.weight"):
        wan_vae.load(tmp_path / "bad.pth")
    torchfile.save(tmp_path / "other.pth", {"net.x_embedder.proj.1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not a Wan2.1 VAE state dict"):
        wan_vae.load(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        wan_vae.load(tmp_path / "nothing.pth")


def test_config_inferred_from_shapes():
    cfg = wan_vae.WanVAEConfig(dim=4, z_dim=16, dim_mult=(1, 2, 3), num_res_blocks=1, temporal_downsample=(True, False))
    assert wan_vae.infer_config(wan_vae.param_shapes(cfg)) == cfg
    assert wan_vae.infer_config(wan_vae.param_shapes(wan_vae.WanVAEConfig())) == wan_vae.WanVAEConfig()


@pytest.mark.torch
def test_release_shapes_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.AutoencoderKLWan()  # defaults = the Wan2.1 release (base_dim 96)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = wan_vae.WanVAEConfig()
    names = wan_vae.diffusers_names(cfg)
    assert {names[k]: s for k, s in wan_vae.param_shapes(cfg).items()} == theirs


def test_bad_shapes_are_clear_errors(params):
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k frames, got T = 6"):
        wan_vae.encode(CFG, params, np.zeros((1, 3, 6, 16, 16), np.float32))
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        wan_vae.encode(CFG, params, np.zeros((1, 3, 5, 12, 16), np.float32))
    with pytest.raises(ValueError, match=r"decode needs latents \(B, 16"):
        wan_vae.decode(CFG, params, np.zeros((1, 4, 2, 2, 2), np.float32))


def test_batch_sharded_equals_unsharded_and_bf16_close(params):
    devices = np.array(jax.devices()[:8])
    assert len(devices) == 8, "conftest sets 8 simulated CPU devices"
    x = np.random.default_rng(1).uniform(-1, 1, (8, 3, 5, 24, 16)).astype(np.float32)  # as in the parity test
    want = np.asarray(wan_vae.encode(CFG, params, x))
    sharded = jax.device_put(x, NamedSharding(Mesh(devices, ("data",)), P("data")))
    got = wan_vae.encode(CFG, params, sharded)
    assert got.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

    z16 = np.asarray(wan_vae.encode(CFG, params, x, dtype=jnp.bfloat16))
    x32, x16 = (np.asarray(wan_vae.decode(CFG, params, want, dtype=d)) for d in ("float32", "bfloat16"))
    enc_err, dec_err = np.abs(z16 - want).max(), np.abs(x16 - x32).max()
    print(
        f"\nbf16 vs fp32: encode max abs {enc_err:.3f} (|z| max {np.abs(want).max():.2f}), "
        f"decode max abs {dec_err:.3f} (|x| max {np.abs(x32).max():.2f})"
    )
    assert 0 < enc_err < 0.1 * np.abs(want).max() and 0 < dec_err < 0.1 * np.abs(x32).max()


def test_cli_round_trip(params, tmp_path, capsys):
    torchfile.save(tmp_path / "wan_vae.pth", wan_vae.to_torch(params, CFG))
    frames = np.zeros((7, 36, 48, 3), np.uint8)  # 4:3 -> the 320x256 bucket at "256"
    frames[..., 0] = np.linspace(0, 255, 48, dtype=np.uint8)[None, None]
    frames[..., 1] = np.arange(7, dtype=np.uint8)[:, None, None] * 30
    video.write_mp4(tmp_path / "in.mp4", frames, 12)
    assert (
        wan_vae.main(
            [
                "encode",
                str(tmp_path / "in.mp4"),
                str(tmp_path / "z.npz"),
                "--vae",
                str(tmp_path / "wan_vae.pth"),
                "--resolution",
                "256",
            ]
        )
        == 0
    )
    with np.load(tmp_path / "z.npz") as data:
        assert data["latents"].shape == (16, 2, 32, 40)  # 5 of the 7 frames (1 + 4k)
        assert data["padding_mask"].shape == (1, 256, 320) and tuple(data["bucket"]) == (320, 256)
        mask = data["padding_mask"][0]  # 36x48 -> 240x320, centred in 256x320: 8 padded rows above and below
        assert mask[:8].all() and mask[-8:].all() and not mask[8:-8].any()
    assert (
        wan_vae.main(
            [
                "decode",
                str(tmp_path / "z.npz"),
                str(tmp_path / "out.mp4"),
                "--vae",
                str(tmp_path / "wan_vae.pth"),
                "--fps",
                "12",
            ]
        )
        == 0
    )
    out, fps = video.read_video(tmp_path / "out.mp4")
    assert out.shape == (5, 256, 320, 3) and fps == 12

    assert (
        wan_vae.main(
            [
                "encode",
                str(tmp_path / "in.mp4"),
                str(tmp_path / "y.npz"),
                "--vae",
                str(tmp_path / "wan_vae.pth"),
                "--frames",
                "6",
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --frames 6")
    assert wan_vae.main(["decode", str(tmp_path / "missing.npz"), str(tmp_path / "o.mp4")]) == 1
    assert "error: " in capsys.readouterr().err


def test_frame_counts_other_than_1_plus_4k_name_the_nearest_valid_ones():
    """The one frame-count check (prepare, generate, the plan, the VAE CLI): 1 + 4k passes, others are one line
    naming the two nearest counts."""
    for ok in (1, 5, 93):
        assert wan_vae.check_frame_count(ok) == ok
    for bad, nearest in ((90, "89 or 93"), (2, "1 or 5"), (0, "1 or 5"), (96, "93 or 97")):
        with pytest.raises(
            ValueError, match=rf"--frames {bad}: the Wan2.1 VAE needs 1 \+ 4k frames \(nearest: {nearest}\)"
        ):
            wan_vae.check_frame_count(bad)
    with pytest.raises(ValueError, match=r"--frames 90: .*nearest: 89 or 93"):
        plan.latent_shape(90, 704, 1280)


@pytest.mark.parametrize(
    "key, shape, field",
    [
        ("encoder.conv1.weight", (10**6, 3, 3, 3, 3), "dim"),
        ("conv2.weight", (10**5, 32, 1, 1, 1), "z_dim"),
        ("encoder.downsamples.0.residual.2.weight", (8 * 1000, 8, 3, 3, 3), "dim_mult"),
    ],
)
def test_sizes_inferred_from_shapes_are_bounded(key, shape, field):
    """A damaged header or name must not size the network: an error naming the size, before anything is built."""
    shapes = dict(wan_vae.param_shapes(CFG))
    shapes[key] = shape
    with pytest.raises(ValueError, match=f"^{field} = .* is out of range"):
        wan_vae.infer_config(shapes)


def test_damaged_diffusers_vae_folder_is_a_one_line_error_naming_the_file(params, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "vae"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(wan_vae.native_to_diffusers(wan_vae.to_torch(params, CFG), CFG), str(weights))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 16}))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="not a valid safetensors file") as e:
        wan_vae.load(folder)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    weights.write_bytes((10**12).to_bytes(8, "little") + data[8:])  # header length past the end of the file
    with pytest.raises(ValueError, match="header length"):
        wan_vae.load(folder)
    (folder / "config.json").write_text('{"_class_name": ')
    with pytest.raises(ValueError, match="config.json: not valid JSON") as e:
        wan_vae.load(folder)
    assert str(folder / "config.json") in str(e.value)
