"""Cosmos DiT: parity with diffusers' CosmosTransformer3DModel (an independent PyTorch implementation), bf16,
block outputs, remat, and the native/diffusers name mapping with its errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from trigflow_distill.common import sharding
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import names as sdm

torch = pytest.importorskip("torch")
tc = pytest.importorskip("diffusers.models.transformers.transformer_cosmos")
# The PyTorch reference side (diffusers stand-ins shared with the benchmarks; benchmarks/ is on the pytest pythonpath).
import torch_dmd2  # noqa: E402  (after the importorskips: it imports torch)

pytestmark = pytest.mark.torch

CFG = cosmos_dit.get_preset("tiny")
CFG_REMAT = cosmos_dit.get_preset("tiny", remat=True)
T_COND = 1e-4 / (1 + 1e-4)  # RF time of the conditional frames, tau_c = arctan(1e-4)


def random_params(config, key):
    """Random weights everywhere (also the layers Cosmos zero-initialises, norm scales and the bias)."""
    shapes = cosmos_dit.param_shapes(config)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    out = []
    for k, (path, shape) in zip(jax.random.split(key, len(paths)), paths):
        z = jax.random.normal(k, shape, jnp.float32)
        kind = path[-1].key  # "kernel" (in, out), norm "scale" or "bias"
        out.append(1.0 + 0.2 * z if kind == "scale" else 0.1 * z if kind == "bias" else z / np.sqrt(shape[-2]))
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(scope="module")
def setup():
    params = random_params(CFG, jax.random.key(0))
    native = sdm.state_dict_from_params(jax.tree.map(np.array, params), CFG)
    torch_dmd2.install_nearest_resize()
    model = tc.CosmosTransformer3DModel(**{k: v for k, v in sdm.diffusers_config(CFG).items() if k[0] != "_"})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sdm.diffusers_from_native(native).items()}, strict=True)
    # Cosmos uses eps 1e-6 in the q/k RMSNorm (docs/algorithm.md §8); diffusers hard-codes 1e-5: patch diffusers.
    torch_dmd2.set_cosmos_qk_eps(model)
    return params, model.eval()


def make_inputs(seed, b, t, h, w, n_cond, per_frame):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 16, t, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 5, CFG.crossattn_proj_in_channels)).astype(np.float32)
    ts = rng.uniform(0, 1, (b, t if per_frame else 1)).astype(np.float32)
    ts = np.repeat(ts, t, axis=1) if not per_frame else ts
    mask = np.zeros((b, 1, t, h, w), np.float32)
    mask[:, :, :n_cond] = 1.0
    ts[:, :n_cond] = T_COND
    pad = (rng.uniform(size=(1, 1, 8 * h, 8 * w)) < 0.3).astype(np.float32)  # pixel-space, batch 1 (diffusers)
    return x, ts, text, mask, pad


def run_diffusers(model, x, ts, text, mask, pad, block_ids=()):
    feats = {}
    hooks = [
        model.transformer_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(i, out.detach().numpy())
        )
        for i in block_ids
    ]
    b, _, t = x.shape[:3]
    with torch.no_grad():
        out = model(
            torch.from_numpy(x),
            torch.from_numpy(ts).reshape(b, 1, t, 1, 1),
            torch.from_numpy(text),
            fps=None,
            condition_mask=torch.from_numpy(mask),
            padding_mask=torch.from_numpy(pad),
            return_dict=False,
        )[0]
    for hk in hooks:
        hk.remove()
    return out.numpy(), feats


@pytest.mark.parametrize(
    "b,t,h,w,n_cond,per_frame,attn",
    [
        (1, 1, 4, 4, 0, False, "auto"),
        (2, 3, 6, 4, 1, True, "blockwise"),  # 18 tokens in key blocks of 8 (padded), 5 context keys
        (2, 4, 8, 8, 2, True, "xla"),
    ],
)
def test_parity_with_diffusers(setup, b, t, h, w, n_cond, per_frame, attn):
    params, model = setup
    x, ts, text, mask, pad = make_inputs(b * 100 + t, b, t, h, w, n_cond, per_frame)
    ids = (0, 1) if b == 2 and t == 4 else ()
    ref, ref_feats = run_diffusers(model, x, ts, text, mask, pad, ids)
    config = cosmos_dit.get_preset("tiny", attention=attn, attention_block_size=8)
    got = cosmos_dit.velocity(
        config, params, x, ts, text, cond_mask_b1thw=mask, padding_mask_b1hw=pad, return_block_outputs=ids
    )
    got, feats = got if ids else (got, {})
    scale = float(np.std(ref))
    err = float(np.max(np.abs(np.asarray(got) - ref)))
    print(f"parity b={b} t={t} {h}x{w} cond={n_cond} per_frame={per_frame} {attn}: max|err|/std = {err / scale:.2e}")
    assert got.shape == ref.shape and err <= 1e-4 * scale
    for i in ids:
        f_err = np.max(np.abs(np.asarray(feats[i]) - ref_feats[i])) / np.std(ref_feats[i])
        assert feats[i].shape == (b, t * (h // 2) * (w // 2), CFG.model_channels) and f_err <= 1e-4


def test_padding_mask_and_text_change_output(setup):
    """The parity inputs exercise every input: changing the padding mask or the text changes the output."""
    params, _ = setup
    x, ts, text, mask, pad = make_inputs(7, 1, 2, 4, 4, 1, True)
    base = cosmos_dit.velocity(CFG, params, x, ts, text, mask, pad)
    assert not np.allclose(base, cosmos_dit.velocity(CFG, params, x, ts, text, mask, 1.0 - pad), atol=1e-3)
    assert not np.allclose(base, cosmos_dit.velocity(CFG, params, x, ts, 0 * text, mask, pad), atol=1e-3)


def test_bf16_close_to_fp32_and_projected_context(setup):
    params, _ = setup
    x, ts, text, mask, pad = make_inputs(3, 2, 2, 4, 4, 1, True)
    ref = cosmos_dit.velocity(CFG, params, x, ts, text, mask, pad)
    bf16 = cosmos_dit.velocity(cosmos_dit.get_preset("tiny", dtype="bfloat16"), params, x, ts, text, mask, pad)
    rel = np.abs(np.asarray(bf16) - np.asarray(ref)) / np.std(ref)
    print(f"bf16 vs fp32: max {rel.max():.2e}, mean {rel.mean():.2e} (of output std)")
    assert bf16.dtype == jnp.float32 and rel.mean() < 1e-2 and rel.max() < 8e-2
    # Projecting once outside and dropping crossattn_proj from params gives the same output (trainer path).
    ctx = cosmos_dit.project_text(params["crossattn_proj"], text)
    no_proj = {k: v for k, v in params.items() if k != "crossattn_proj"}
    np.testing.assert_allclose(cosmos_dit.velocity(CFG, no_proj, x, ts, ctx, mask, pad), ref, rtol=0, atol=1e-6)


def test_gradient_parity_with_diffusers_remat_block_outputs(setup):
    """jit(grad) of the remat network (scan split at a returned block) equals torch autograd of diffusers."""
    params, model = setup
    x, ts, text, mask, pad = make_inputs(5, 1, 2, 4, 4, 1, True)
    rng = np.random.default_rng(0)
    w_out = rng.standard_normal(x.shape).astype(np.float32)
    w_feat = rng.standard_normal((1, 2 * 2 * 2, CFG.model_channels)).astype(np.float32)

    def loss(p, x):
        v, feats = cosmos_dit.velocity(CFG_REMAT, p, x, ts, text, mask, pad, return_block_outputs=(0,))
        return jnp.sum(v * w_out) + jnp.sum(feats[0] * w_feat)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    feats = {}
    hook = model.transformer_blocks[0].register_forward_hook(lambda m, a, out: feats.__setitem__(0, out))
    x_t = torch.from_numpy(x).requires_grad_(True)
    model.zero_grad()
    out = model(
        x_t,
        torch.from_numpy(ts).reshape(1, 1, 2, 1, 1),
        torch.from_numpy(text),
        fps=None,
        condition_mask=torch.from_numpy(mask),
        padding_mask=torch.from_numpy(pad),
        return_dict=False,
    )[0]
    hook.remove()
    (torch.sum(out * torch.from_numpy(w_out)) + torch.sum(feats[0] * torch.from_numpy(w_feat))).backward()
    ref_sd = sdm.native_from_diffusers({k: p.grad.numpy() for k, p in model.named_parameters()})
    ref = sdm.params_from_state_dict(ref_sd, CFG)

    def rel_err(a, b):
        return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))

    errs = jax.tree.map(rel_err, g_params, ref)
    worst = max(jax.tree.leaves(errs))
    print(f"grad parity (remat, block output 0): worst leaf max|err|/max|g| = {worst:.2e}")
    assert worst <= 1e-4 and rel_err(g_x, x_t.grad.numpy()) <= 1e-4
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(ref))
    with pytest.raises(ValueError, match="return_block_outputs"):
        cosmos_dit.velocity(CFG, params, x, ts, text, return_block_outputs=(CFG.num_blocks,))


def _random_native(config, seed=0, dtype=ml_dtypes.bfloat16):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in sdm.native_shapes(config).items()}


def test_native_round_trip_and_diffusers_names():
    native = _random_native(CFG)
    extras = {
        "pos_embedder.seq": np.arange(4.0),
        "accum_video_sample_counter": np.zeros(()),
        "blocks.0.self_attn.attn_op._extra_state": np.zeros(1),
    }
    params = sdm.params_from_state_dict({**native, **extras}, CFG)
    assert jax.tree.map(np.shape, params) == jax.tree.map(
        tuple, cosmos_dit.param_shapes(CFG), is_leaf=lambda s: isinstance(s, tuple)
    )
    back = sdm.state_dict_from_params(params, CFG)
    assert back.keys() == native.keys()
    for k in native:
        assert back[k].dtype == native[k].dtype and np.array_equal(back[k].view(np.uint16), native[k].view(np.uint16))
    diff = sdm.diffusers_from_native({**native, **extras})
    assert len(diff) == len(native) and sdm.native_from_diffusers(diff).keys() == native.keys()


@pytest.mark.parametrize("name", ["tiny", "predict25_2b", "predict25_14b"])
def test_infer_config_recovers_presets(name):
    config = cosmos_dit.get_preset(name)
    shapes = sdm.native_shapes(config)
    assert sdm.infer_config(shapes) == config
    assert sdm.infer_config({**shapes, "pos_embedder.seq": (128,)}, dtype="bfloat16").dtype == "bfloat16"
    if name == "predict25_2b":  # docs/algorithm.md §8: 2B total ~ 2.059B parameters
        assert abs(sum(int(np.prod(s)) for s in shapes.values()) / 2.059e9 - 1) < 2e-3


def test_state_dict_errors():
    native = _random_native(CFG, dtype=np.float32)
    missing = {k: v for k, v in native.items() if k != "blocks.1.mlp.layer2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.mlp\.layer2\.weight\]"):
        sdm.params_from_state_dict(missing, CFG)
    with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.0\.foo\.weight\]"):
        sdm.params_from_state_dict({**native, "blocks.0.foo.weight": np.zeros(3)}, CFG)
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.2\."):  # wrong block count in the config
        sdm.params_from_state_dict(native, cosmos_dit.get_preset("tiny", num_blocks=3))
    bad = {**native, "blocks.0.self_attn.q_norm.weight": np.zeros(16, np.float32)}
    with pytest.raises(ValueError, match=r"mismatch: blocks\.0\.self_attn\.q_norm\.weight: \(16,\) != expected \(32"):
        sdm.params_from_state_dict(bad, CFG)
    with pytest.raises(ValueError, match="wrong model family"):
        sdm.params_from_state_dict({"conv_in.weight": np.zeros((4, 4)), "down_blocks.0.w": np.zeros(2)}, CFG)
    with pytest.raises(ValueError, match="wrong model family"):
        sdm.infer_config({"model.layers.0.self_attn.q_proj.weight": (8, 8)})
    with pytest.raises(ValueError, match="net.*prefix"):
        sdm.params_from_state_dict({f"net.{k}": v for k, v in native.items()}, CFG)
    with pytest.raises(ValueError, match="native_from_diffusers"):
        sdm.params_from_state_dict(sdm.diffusers_from_native(native), CFG)
    with pytest.raises(ValueError, match="wrong model family"):
        sdm.native_from_diffusers(native)
    with pytest.raises(ValueError, match=r"unexpected keys .*learnable_pos_embed\.pos_emb_t"):
        sdm.native_from_diffusers({**sdm.diffusers_from_native(native), "learnable_pos_embed.pos_emb_t": 0})
    params = sdm.params_from_state_dict(native, CFG)
    del params["t_embedding_norm"]
    with pytest.raises(ValueError, match="missing .*t_embedding_norm/scale"):
        sdm.state_dict_from_params(params, CFG)


def test_init_params_and_input_errors():
    params = cosmos_dit.init_params(CFG, jax.random.key(1))
    assert jax.tree.map(np.shape, params) == jax.tree.map(
        tuple, cosmos_dit.param_shapes(CFG), is_leaf=lambda s: isinstance(s, tuple)
    )
    x, ts, text, mask, pad = make_inputs(1, 1, 2, 4, 4, 0, True)
    v = cosmos_dit.velocity(CFG, params, x, ts, text)
    assert bool(jnp.all(jnp.isfinite(v))) and float(jnp.std(v)) > 0.1
    with pytest.raises(ValueError, match="divisible"):
        cosmos_dit.velocity(CFG, params, x[..., :3], ts, text)
    with pytest.raises(ValueError, match="timesteps_bt"):
        cosmos_dit.velocity(CFG, params, x, np.zeros((1, 3)), text)
    with pytest.raises(ValueError, match="text embedding"):
        cosmos_dit.velocity(CFG, params, x, ts, text[..., :64])
    with pytest.raises(ValueError, match="unknown DiT preset"):
        cosmos_dit.get_preset("predict25_7b")


def test_mlp_frame_groups_and_head_parallel_attention_keep_value_and_gradient():
    """Memory layouts change no number: with remat, the MLP in checkpointed groups of 2 frames (3 frames: one group
    padded) and, on a seq:4 mesh, self-attention with the 4 heads split over the devices by all-to-all, give the
    value and gradient of the plain remat network."""
    params = random_params(CFG, jax.random.key(3))
    x, ts, text, mask, pad = make_inputs(6, 2, 3, 4, 6, 1, True)
    w = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

    def value_and_grad(config, mesh=None):
        loss = lambda p, x: jnp.sum(cosmos_dit.velocity(config, p, x, ts, text, mask, pad, mesh=mesh) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    ref = value_and_grad(cosmos_dit.get_preset("tiny", remat=True, mlp_chunk_frames=0))(params, x)
    grouped_cfg = cosmos_dit.get_preset("tiny", remat=True, mlp_chunk_frames=2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "seq": 4}, devices=jax.devices()[:4])
    sharded = value_and_grad(grouped_cfg, mesh)
    assert "all-to-all" in sharded.lower(params, x).compile().as_text()
    for got in (value_and_grad(grouped_cfg)(params, x), sharded(params, x)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
