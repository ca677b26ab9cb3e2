"""The memory/FLOP plan: the CLI's JSON schema and sane numbers for the tiny config; argument parsing errors."""
import json
import os
import subprocess
import sys

import pytest

from trigflow_distill import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops"}


@pytest.mark.slow
def test_plan_cli_json_for_the_tiny_config():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the plan sets its own device count
    cmd = [sys.executable, "-m", "trigflow_distill.plan", "--config=configs/predict25_4step.py:tiny", "--net=tiny",
           "--mesh=data:1,fsdp:2,seq:2", "--frames=5", "--height=32", "--width=48", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"devices", "mesh", "updates"}
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
    assert plan.latent_shape(93, 704, 1280) == (16, 24, 88, 160)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        plan.latent_shape(92, 704, 1280)
