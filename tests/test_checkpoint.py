"""Checkpoints: bit-exact sharded save/restore with the data position, keep-last-K, incomplete saves ignored."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trigflow_distill import data
from trigflow_distill.common import sharding
from trigflow_distill.training import checkpoint

LAT, TXT = (16, 2, 2, 2), (3, 4)


def _state(mesh, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "stack": jax.random.normal(k1, (2, 16, 8)),
        "w": jax.random.normal(k2, (16, 4)),
        "scale": jnp.full((7,), 0.1 * (seed + 1), jnp.bfloat16),
    }
    shardings = sharding.param_sharding(params, mesh, min_size=32)
    params = sharding.put_global(jax.tree.map(np.asarray, params), shardings)
    opt = optax.adamw(1e-2)
    opt_state, _ = sharding.init_opt_state(opt, params, shardings, mesh)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
    return {"step": jnp.int32(17 + seed), "params": params, "opt_state": opt_state, "key": jax.random.key(seed + 5)}


def _assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_bit_exact_with_data_position(tmp_path):
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    state = _state(mesh)
    assert state["params"]["stack"].sharding.spec == P(None, "fsdp", None)
    src = data.make_synthetic_source(10, LAT, TXT, seed=0)
    it = data.make_iterator(src, 4, seed=1)
    for _ in range(3):
        next(it)
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, enable_async=True)
    saved_state = jax.tree.map(lambda x: x.copy(), state)
    assert checkpoint.save(manager, 3, state, it)
    # the run goes on at once: the state is donated to the next step while the async save is still writing
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(state["params"])
    assert state["params"]["w"].is_deleted()
    expected_batches = [next(it) for _ in range(4)]
    checkpoint.wait_until_finished(manager)

    for mesh_config in ({"data": 2, "fsdp": -1}, {"data": 1, "fsdp": 8}):  # same and another layout
        target_mesh = sharding.make_mesh(mesh_config)
        abstract = checkpoint.abstract_like(_state(target_mesh, seed=1))
        fresh_it = data.make_iterator(src, 4, seed=1)
        restored, step = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path)), abstract, fresh_it)
        assert step == 3
        _assert_bit_equal(restored, saved_state)
        stacked = NamedSharding(target_mesh, P(None, "fsdp", None))
        assert restored["params"]["stack"].sharding.is_equivalent_to(stacked, 3)
        assert restored["opt_state"][0].mu["stack"].sharding.is_equivalent_to(stacked, 3)
        for got, want in zip([next(fresh_it) for _ in range(4)], expected_batches):
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


def test_empty_interval_and_keep_last(tmp_path):
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
    state = _state(mesh)
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, save_interval_steps=2, enable_async=False)
    assert checkpoint.restore_latest(manager, checkpoint.abstract_like(state)) == (None, 0)
    saved = [checkpoint.save(manager, s, state) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert checkpoint.save(manager, 7, state, force=True)
    checkpoint.wait_until_finished(manager)
    assert list(manager.all_steps()) == [6, 7]


def test_incomplete_newer_checkpoint_is_ignored(tmp_path):
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
    states = [_state(mesh, seed=s) for s in range(2)]
    manager = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    for step, st in zip((1, 2), states):
        checkpoint.save(manager, step, st)
    checkpoint.wait_until_finished(manager)
    # a save of step 3 killed before orbax finalised it: its data sits in the temporary directory
    ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
    shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp"))
    os.remove(os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp", "commit_success.txt"))

    resumed = checkpoint.make_manager(str(tmp_path), max_to_keep=5)
    restored, step = checkpoint.restore_latest(resumed, checkpoint.abstract_like(states[0]))
    assert step == 2
    _assert_bit_equal(restored, states[1])
    assert checkpoint.save(resumed, 3, states[0])  # the leftover does not block re-saving that step
    checkpoint.wait_until_finished(resumed)
    restored, step = checkpoint.restore_latest(
        checkpoint.make_manager(str(tmp_path)), checkpoint.abstract_like(states[0])
    )
    assert step == 3
    _assert_bit_equal(restored, states[0])
