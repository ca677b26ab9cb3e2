"""The memory/FLOP plan: the CLI's JSON schema and sane numbers for the tiny config; argument parsing errors; the
automatic mesh (memplan): a deterministic choice that fits, the refusal naming a mesh that would, axis names."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from trigflow_distill.common import sharding
from trigflow_distill.models import cosmos_dit
from trigflow_distill.training import builder, plan

import predict25_4step  # configs/ is on the pytest pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops"}


@pytest.mark.slow
def test_plan_cli_json_for_the_tiny_config():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the plan sets its own device count
    cmd = [
        sys.executable,
        "-m",
        "trigflow_distill.training.plan",
        "--config=configs/predict25_4step.py:tiny",
        "--net=tiny",
        "--mesh=data:1,fsdp:2,seq:2",
        "--frames=5",
        "--height=32",
        "--width=48",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"devices", "mesh", "batch", "updates"} and result["batch"] == 2
    assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 2, "seq": 2}
    assert set(result["updates"]) == {"student", "critic"}
    for u in result["updates"].values():
        assert set(u) == KEYS and all(u[k] > 0 for k in KEYS)
        assert u["total_bytes"] >= max(u["argument_bytes"], u["temp_bytes"])
    # the student step runs more network passes (student, critic, teacher cond + uncond) than the critic step
    assert result["updates"]["student"]["flops"] > result["updates"]["critic"]["flops"]


def test_parse_mesh_and_video_shape():
    assert plan.parse_mesh("data:1,fsdp:2,seq:4") == {"data": 1, "fsdp": 2, "seq": 4}
    with pytest.raises(ValueError, match="axis:size"):
        plan.parse_mesh("fsdp=8")
    with pytest.raises(ValueError, match="unknown mesh axis 'dta'.*data, fsdp, seq"):
        plan.parse_mesh("dta:1,fsdp:8")
    assert plan.parse_mesh("auto") == {"data": 0, "fsdp": 0, "seq": 0}
    assert plan.latent_shape(93, 704, 1280) == (16, 24, 88, 160)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        plan.latent_shape(92, 704, 1280)


LATENT, TEXT_LEN = (16, 1, 4, 4), 3


def _tiny_auto(batch):
    config = predict25_4step.get_config("tiny")
    config.data.batch_size = batch
    config.mesh.update(data=0, fsdp=0, seq=0)
    net = dataclasses.replace(cosmos_dit.get_preset("tiny", num_blocks=1), **builder.net_options(config.net))
    return config, net


def test_mesh_auto_picks_the_best_ranked_mesh_that_fits(tmp_path):
    config, net = _tiny_auto(batch=2)
    assert plan.candidates(4, 4, net.num_heads)[0] == {"data": 4, "fsdp": 1, "seq": 1}
    assert plan.candidates(4, 4, net.num_heads)[-1] == {"data": 1, "fsdp": 1, "seq": 4}
    assert plan.candidates(4, 3, net.num_heads) == [{"data": 1, "fsdp": 1, "seq": 4}]  # data x fsdp | batch
    devices = jax.devices()[:2]
    found = plan.candidates(2, 2, net.num_heads)
    assert found == [
        {"data": 2, "fsdp": 1, "seq": 1},
        {"data": 1, "fsdp": 2, "seq": 1},
        {"data": 1, "fsdp": 1, "seq": 2},
    ]
    text = (TEXT_LEN, net.crossattn_emb_channels)
    top = plan.argument_bytes(config, net, sharding.make_mesh(found[0], devices=devices), LATENT, text, 2)
    config.mesh.device_memory_gib = (top - 1) / plan.GIB  # the data-parallel mesh's arguments alone do not fit
    lines = []
    mesh = plan.run_mesh(config, net, LATENT, TEXT_LEN, 2, str(tmp_path), devices, log=lines.append)
    chosen = {a: mesh.shape[a] for a in sharding.MESH_AXES}
    assert (
        chosen != found[0]
        and lines == [lines[0]]
        and lines[0].startswith(f"mesh auto: {plan.format_mesh(chosen)} on 2 devices")
    )
    cached = json.loads((tmp_path / plan.CACHE_FILE).read_text())
    assert cached["mesh"] == chosen and set(cached["estimates"]) == {"student", "critic"}
    assert all(e["total_bytes"] <= top - 1 for e in cached["estimates"].values())
    again = plan.run_mesh(config, net, LATENT, TEXT_LEN, 2, str(tmp_path), devices, log=lines.append)
    assert dict(again.shape) == dict(mesh.shape) and lines[1] == lines[0]  # from the cache
    # fixed sizes are kept; every size given means no search at all
    config.mesh.update(seq=2)
    assert plan.candidates(4, 4, net.num_heads, sharding.mesh_request(config.mesh)) == [
        {"data": 2, "fsdp": 1, "seq": 2},
        {"data": 1, "fsdp": 2, "seq": 2},
    ]
    config.mesh.update(data=1, fsdp=-1, seq=1)
    assert dict(plan.run_mesh(config, net, LATENT, TEXT_LEN, 4, None, jax.devices()[:4]).shape) == {
        "data": 1,
        "fsdp": 4,
        "seq": 1,
    }


@pytest.mark.slow
def test_mesh_auto_choice_is_deterministic():
    """Planned twice from scratch: the same mesh and numbers; every better-ranked mesh was tried and refused."""
    config, net = _tiny_auto(batch=2)
    devices, text = jax.devices()[:2], (TEXT_LEN, net.crossattn_emb_channels)
    found = plan.candidates(2, 2, net.num_heads)
    memory = plan.argument_bytes(config, net, sharding.make_mesh(found[0], devices=devices), LATENT, text, 2) - 1
    logs = [[], []]
    first, second = (plan.choose_mesh(config, net, devices, LATENT, text, 2, memory, log=log.append) for log in logs)
    assert first == second and logs[0] == logs[1] and first[0] != found[0]
    assert {line.split(": ", 1)[0] for line in logs[0]} == {
        f"mesh {plan.format_mesh(m)}" for m in found[: found.index(first[0]) + 1]
    }


def test_mesh_auto_refuses_clearly_when_nothing_fits():
    config, net = _tiny_auto(batch=2)
    devices = jax.devices()[:2]
    with pytest.raises(
        ValueError,
        match=r"no mesh of 2 devices fits in 0\.00 GiB per device at global batch 2 "
        r"\(the smallest plan, data:1,fsdp:1,seq:2, needs .* lower data\.batch_size",
    ):
        plan.choose_mesh(config, net, devices, LATENT, (TEXT_LEN, net.crossattn_emb_channels), 2, 1024)
    # the smallest mesh that would fit, by scaling the smallest plan: 60 GiB on 8 devices -> 15 GiB on 32
    message = plan._refusal(8, 8, 16, 16 * plan.GIB, 60 * plan.GIB, {"data": 1, "fsdp": 8, "seq": 1})
    assert "The smallest mesh that fits is about 32 devices: data:1,fsdp:8,seq:4 (~15.00 GiB" in message
    with pytest.raises(ValueError, match="does not report its device memory.*device_memory_gib"):
        plan.run_mesh(config, net, LATENT, TEXT_LEN, 4, None, devices)
