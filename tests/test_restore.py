"""Inference restores: only the EMA student (or the raw one) is read from a run's checkpoint, onto the host or
sharded over the devices; it equals the same subtree of a full TrainState restore; peak host RSS stays at about the
EMA's size while a full restore needs the whole state."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trigflow_distill.common import errors, sharding
from trigflow_distill.methods import train_state
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import builder, checkpoint, restore

import predict25_4step  # configs/ is on the pytest pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run folder as the trainer leaves it: config.json, a teacher cache and a TrainState checkpoint at step 4
    whose student, EMA and critic all differ (a restore of the wrong subtree cannot pass)."""
    net = cosmos_dit.get_preset("tiny", num_blocks=2)
    teacher_pt = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(0)), net, teacher_pt)
    config = predict25_4step.get_config("tiny")
    config.teacher.path = str(teacher_pt)
    workdir = tmp_path_factory.mktemp("run")
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _, teacher = builder.load_teacher(config, str(workdir))
    rng = np.random.default_rng(1)

    def copy():
        return jax.tree.map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32), teacher["net"])

    def zeros_like_opt_state(tx, params):
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))

    student_tx, critic_tx = train_state.make_optimizers(config)
    student, critic = copy(), copy()
    state = train_state.TrainState(
        step=np.int32(4),
        key=np.zeros(2, np.uint32),
        student=student,
        student_opt=zeros_like_opt_state(student_tx, student),
        student_ema=copy(),
        student_updates=np.int32(1),
        critic=critic,
        critic_opt=zeros_like_opt_state(critic_tx, critic),
        consecutive_skips=np.int32(0),
        total_skips=np.int32(0),
    )
    manager = checkpoint.make_manager(str(workdir), save_interval_steps=4)
    checkpoint.save(manager, 4, state)
    checkpoint.wait_until_finished(manager)
    return workdir, state, teacher


def test_ema_only_equals_ema_of_full_restore(workdir):
    workdir, state, _ = workdir
    step, restored = restore.restore_params(str(workdir))
    assert step == 4 and list(restored) == ["student_ema"]
    ema = restored["student_ema"]
    assert all(type(x) is np.ndarray and x.dtype == np.float32 for x in jax.tree.leaves(ema))  # host memory
    full = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")  # the whole TrainState
    _tree_equal(ema, full["student_ema"])
    _tree_equal(ema, state.student_ema)
    assert not np.array_equal(jax.tree.leaves(ema)[0], jax.tree.leaves(state.student)[0])  # copies differ

    _, both = restore.restore_params(str(workdir), ("student_ema", "student"))
    _tree_equal(both["student"], full["student"])


def test_sharded_restore(workdir):
    workdir, state, _ = workdir
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "seq": 1})
    _, restored = restore.restore_params(str(workdir), mesh=mesh)
    ema = restored["student_ema"]
    expected = sharding.param_sharding(ema, mesh)
    for x, s in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
        assert isinstance(x, jax.Array) and x.sharding == s
    assert any(
        len(x.sharding.device_set) == len(jax.devices()) and not x.is_fully_replicated for x in jax.tree.leaves(ema)
    )  # some leaves really are split over the devices
    _tree_equal(ema, state.student_ema)
    _, _, student = restore.load_student(str(workdir), mesh=mesh)  # the text projection is replicated beside it
    proj = jax.tree.leaves(student["text_proj"])
    assert all(
        isinstance(x, jax.Array) and x.is_fully_replicated and len(x.sharding.device_set) == len(jax.devices())
        for x in proj
    )


def test_load_student(workdir):
    workdir, state, teacher = workdir
    config, net_config, student = restore.load_student(str(workdir))
    assert config.teacher.path.endswith("teacher.pt") and net_config.num_blocks == 2
    _tree_equal(student["net"], state.student_ema)
    _tree_equal(student["text_proj"], teacher["text_proj"])
    assert np.asarray(jax.tree.leaves(student["text_proj"])[0]).dtype == np.float32
    _, _, raw = restore.load_student(str(workdir), which="raw")
    _tree_equal(raw["net"], state.student)
    with pytest.raises(ValueError, match="which='best'"):
        restore.load_student(str(workdir), which="best")


def test_clear_errors(workdir, tmp_path):
    workdir = str(workdir[0])
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        restore.load_student(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        restore.restore_params(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 3 .* there are \\[4\\]"):
        restore.restore_params(workdir, step=3)
    with pytest.raises(ValueError, match="has no \\['student_emma'\\]"):
        restore.restore_params(workdir, ("student_emma",))


# Peak RSS of the restore alone: the high-water mark is reset (Linux: "5" > /proc/self/clear_refs) after the imports
# and the JAX backend start, then read back as VmHWM.
_RSS_SCRIPT = """
import json, os, sys
import jax, numpy as np
from trigflow_distill.training import restore
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))
jax.numpy.zeros(1).block_until_ready()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
restored = restore.restore_params(sys.argv[1], sys.argv[2].split(","), group_bytes=int(sys.argv[3]))[1]
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "read": sum(x.nbytes for x in jax.tree.leaves(restored))}))
"""


def _peak_rss(workdir, names, group_bytes=1 << 30):
    # glibc serves blocks under its (adaptive, <= 32 MiB) mmap threshold from the heap, where a freed read buffer
    # may stay resident; the 2B model's leaves are far above it. A fixed threshold makes these small leaves behave
    # the same way.
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(workdir), names, str(group_bytes)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_host_rss_is_the_ema_not_the_state(tmp_path):
    """A TrainState-shaped checkpoint of 7 trees of 4 x 16 MiB leaves. Restoring the EMA in groups of one leaf grows
    peak RSS by the EMA plus about one leaf (a TensorStore read holds a buffer of what it reads until it returns);
    restoring everything by at least the 7 trees."""
    leaf = 4 << 20  # float32 elements per leaf
    rng = np.random.default_rng(0)
    tree = lambda: {f"w{i}": rng.standard_normal(leaf, np.float32) for i in range(4)}  # noqa: E731
    state = {
        "student": tree(),
        "student_ema": tree(),
        "critic": tree(),
        "student_opt": [tree(), tree()],
        "critic_opt": [tree(), tree()],
        "step": np.int32(8),
    }
    manager = checkpoint.make_manager(str(tmp_path), save_interval_steps=8)
    checkpoint.save(manager, 8, jax.tree.map(jax.numpy.asarray, state))
    checkpoint.wait_until_finished(manager)
    leaf_bytes = 4 * leaf
    tree_bytes = 4 * leaf_bytes
    ema = _peak_rss(tmp_path, "student_ema", group_bytes=leaf_bytes)
    full = _peak_rss(tmp_path, ",".join(state))
    ema_growth, full_growth = ema["peak"] - ema["base"], full["peak"] - full["base"]
    print(
        f"peak RSS growth: EMA only {ema_growth / 2**20:.1f} MiB (read {ema['read'] / 2**20:.0f} MiB), "
        f"full state {full_growth / 2**20:.1f} MiB (read {full['read'] / 2**20:.0f} MiB)"
    )
    assert ema["read"] == tree_bytes and full["read"] == 7 * tree_bytes + 4
    assert ema_growth < tree_bytes + 2 * leaf_bytes + (24 << 20)  # + TensorStore / Orbax fixed overhead
    assert full_growth > 6 * tree_bytes


# ------------------------------------------------------------------------------------------------------- integrity
def _copy_with_step_8(workdir, tmp_path, ema):
    """A copy of the run with a second checkpoint, step 8, whose EMA is `ema(state.student_ema)` and whose other
    leaves are zeros (they compress to nothing: the array files are the EMA's bytes)."""
    import dataclasses
    import shutil

    src, state, _ = workdir
    run = tmp_path / "run"
    shutil.copytree(src, run)
    zeros = jax.tree.map(np.zeros_like, state)
    state8 = dataclasses.replace(zeros, step=np.int32(8), student_ema=ema(state.student_ema))
    manager = checkpoint.make_manager(str(run), save_interval_steps=4)
    checkpoint.save(manager, 8, state8)
    checkpoint.wait_until_finished(manager)
    return run, state, state8


def _flip_a_bit(step_dir):
    files = (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 1  # Orbax decodes this to wrong numbers without an error
    biggest.write_bytes(bytes(data))


def test_flipped_bit_is_detected_by_export_and_generate(workdir, tmp_path, capsys):
    """A bit flipped in the newest checkpoint's EMA data fails its checksums: the readers (restore_params, export,
    generate --workdir) say so and read the previous checkpoint; the damaged one is left in place."""
    from trigflow_distill.inference import export, loader

    run, state, _ = _copy_with_step_8(workdir, tmp_path, lambda ema: jax.tree.map(lambda x: x + 1, ema))
    _flip_a_bit(run / "checkpoints" / "8")
    lines = []
    step, restored = restore.restore_params(str(run), report=lines.append)
    assert step == 4
    _tree_equal(restored["student_ema"], state.student_ema)
    assert re.match(
        rf"checkpoint 8 in {run / 'checkpoints'} does not read back intact \(ValueError: checksum mismatch in "
        r"student_ema/\S+: its array data changed after it was saved\); trying the previous one\.",
        lines[0],
    ), lines
    assert lines[-1] == "skipped unreadable checkpoint(s) [8]; read step 4."
    with pytest.raises(errors.CheckpointError, match=r"checkpoint 8 .* checksum mismatch in student_ema/"):
        restore.restore_params(str(run), step=8)

    assert export.main([f"--workdir={run}", f"--out={tmp_path / 'student.pt'}"]) == 0
    assert "checksum mismatch" in capsys.readouterr().out
    _, exported = convert.load_torch_checkpoint(str(tmp_path / "student.pt"))
    np.testing.assert_allclose(
        np.asarray(exported["x_embedder"]["kernel"], np.float32), state.student_ema["x_embedder"]["kernel"], atol=1e-2
    )
    model = loader.load_workdir(str(run))  # generate --workdir
    _tree_equal(model.params, state.student_ema)
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "8"]  # readers rename nothing


def test_checkpoint_without_checksums_is_read_not_verified(workdir, tmp_path):
    """Checkpoints saved before checksums existed still restore, with a line saying they are not verified."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(workdir[0], run)
    shutil.rmtree(run / "checkpoints" / "4" / checkpoint.CHECKSUMS)
    lines = []
    step, restored = restore.restore_params(str(run), report=lines.append)
    assert step == 4 and lines == [
        f"checkpoint 4 in {run / 'checkpoints'} has no checksums (saved before they were recorded): its data is not "
        "verified."
    ]
    _tree_equal(restored["student_ema"], workdir[1].student_ema)


@pytest.mark.parametrize("fmt", ["torch", "diffusers"])
def test_export_refuses_non_finite_weights_naming_the_step(workdir, tmp_path, capsys, fmt):
    from trigflow_distill.inference import export

    def poison(ema):
        ema = jax.tree.map(np.copy, ema)
        ema["x_embedder"]["kernel"][0, 0] = np.nan
        ema["final_layer"]["linear"]["kernel"][0, 0] = 3.4e38  # finite in fp32, inf in the bfloat16 written
        return ema

    run, _, _ = _copy_with_step_8(workdir, tmp_path, poison)
    out = tmp_path / "student"
    assert export.main([f"--workdir={run}", f"--out={out}", f"--format={fmt}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.fullmatch(
        rf"error: the EMA student of step 8 in {run} has non-finite values \(final_layer/linear/kernel, "
        r"x_embedder/kernel\) in the export's bfloat16; nothing was written\. .*\n",
        err,
    ), err
    assert not out.exists()
