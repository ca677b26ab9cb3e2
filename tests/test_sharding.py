"""Mesh / sharding rules, and a sharded training step equal to the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from trigflow_distill.common import sharding


def test_make_mesh_fill_and_errors():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "seq": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "seq": 1}
    assert sharding.make_mesh({"seq": 2, "fsdp": 2, "data": 2}).axis_names == ("data", "fsdp", "seq")
    assert sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1]).size == 1
    with pytest.raises(ValueError, match=r"has 6 devices .* there are 8"):
        sharding.make_mesh({"data": 2, "fsdp": 3})
    with pytest.raises(ValueError, match="multiple of 3"):
        sharding.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1})


def test_param_spec_rule():
    spec = sharding.param_spec
    assert spec((64, 128), 4, min_size=0) == P(None, "fsdp")  # largest divisible dim
    assert spec((30, 64), 4, min_size=0) == P(None, "fsdp")  # 30 does not divide
    assert spec((8, 16, 12), 4, min_size=0) == P(None, "fsdp", None)  # stacked: never the layer dim if avoidable
    assert spec((8, 6, 10), 4, min_size=0) == P("fsdp", None, None)  # ... unless only it divides
    assert spec((30, 7), 4, min_size=0) == P()
    assert spec((64, 128), 4, min_size=1 << 20) == P()  # small -> replicated
    assert spec((64, 128), 1, min_size=0) == P()


def test_check_batch():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharding.check_batch(16, mesh)
    with pytest.raises(ValueError, match=r"batch size 12 .* multiple of 8"):
        sharding.check_batch(12, mesh)
    seq_mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "seq": 4})
    sharding.check_batch(2, seq_mesh)  # seq does not split the batch
    assert sharding.local_batch_slice(4, seq_mesh) == slice(0, 4)


def _init(key, d_in=16, d_hidden=64, n_layers=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w_in": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
        "stack": jax.random.normal(k2, (n_layers, d_hidden, d_hidden)) / np.sqrt(d_hidden),
        "bias": jnp.zeros((d_hidden,)),
        "w_out": jax.random.normal(k3, (d_hidden, 1)) / np.sqrt(d_hidden),
    }


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w_in"] + params["bias"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, params["stack"])
    return jnp.mean((h @ params["w_out"] - batch["y"]) ** 2)


def _run(mesh, params_host, batches, optimizer):
    shardings = sharding.param_sharding(params_host, mesh, min_size=256)
    params = sharding.put_global(params_host, shardings)
    opt_state, opt_shardings = sharding.init_opt_state(optimizer, params, shardings, mesh)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    bs = sharding.batch_sharding(mesh)
    step = jax.jit(
        step,
        in_shardings=(shardings, opt_shardings, bs),
        out_shardings=(shardings, opt_shardings, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    losses = []
    for b in batches:
        rows = sharding.local_batch_slice(len(b["x"]), mesh)
        gb = sharding.global_batch({k: v[rows] for k, v in b.items()}, len(b["x"]), mesh)
        params, opt_state, loss = step(params, opt_state, gb)
        losses.append(float(loss))
    return params, opt_state, losses


def test_sharded_step_equals_single_device():
    params_host = jax.tree.map(np.asarray, _init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 16)).astype(np.float32), "y": rng.normal(size=(16, 1)).astype(np.float32)}
    batches = [batch] * 4  # the same batch: the loss must go down
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))

    mesh8 = sharding.make_mesh({"data": 2, "fsdp": -1, "seq": 1})
    mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "seq": 1}, devices=jax.devices()[:1])
    p8, s8, l8 = _run(mesh8, params_host, batches, optimizer)
    p1, s1, l1 = _run(mesh1, params_host, batches, optimizer)

    # the 8-device run really is sharded: large params and their Adam moments over fsdp, the bias replicated
    assert p8["stack"].sharding.spec == P(None, "fsdp", None)
    assert p8["w_in"].sharding.spec == P(None, "fsdp")
    assert p8["bias"].sharding.spec == P()
    mu = s8[1][0].mu
    assert mu["stack"].sharding.spec == P(None, "fsdp", None)
    assert len(p8["stack"].addressable_shards) == 8 and p8["stack"].addressable_shards[0].data.shape == (3, 16, 64)
    assert l8[-1] < l8[0]
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_global_batch_shape_error():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match="expects 8 rows"):
        sharding.global_batch({"x": np.zeros((4, 3), np.float32)}, 8, mesh)


def test_mesh_axis_names_and_auto_sizes_are_validated():
    """A misspelled axis is a clear error in a config's mesh section and in make_mesh; 0 means 'chosen at start'."""
    with pytest.raises(ValueError, match=r"unknown mesh axis 'dta' in config\.mesh; the axes are data, fsdp, seq"):
        sharding.mesh_request({"dta": 1, "fsdp": 8, "seq": 1, "device_memory_gib": 16.0})
    with pytest.raises(ValueError, match="unknown mesh axis 'dta'"):
        sharding.make_mesh({"dta": 2, "fsdp": -1})
    request = sharding.mesh_request({"data": 0, "fsdp": 0, "seq": 2, "device_memory_gib": 0.0})
    assert request == {"data": 0, "fsdp": 0, "seq": 2} and sharding.is_auto(request)
    assert sharding.mesh_request({"fsdp": -1}) == {"data": 1, "fsdp": -1, "seq": 1}
    assert not sharding.is_auto(sharding.mesh_request({"fsdp": -1}))
    with pytest.raises(ValueError, match="without mixing -1 and 0"):
        sharding.mesh_request({"data": -1, "fsdp": 0})
    with pytest.raises(ValueError, match="chosen automatically"):
        sharding.make_mesh({"data": 0, "fsdp": 8})
