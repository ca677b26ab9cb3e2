"""One conversion per job: two JAX processes (gloo on loopback) start `load_teacher` on an empty shared cache."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert

CHILD = """
import hashlib, json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from trigflow_distill.models.cosmos_dit import teacher_cache
config, params = teacher_cache.load_teacher(sys.argv[3], sys.argv[4], poll_s=0.05)
h = hashlib.sha256()
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode() + str(leaf.dtype).encode() + np.ascontiguousarray(leaf).tobytes())
print(json.dumps({"process": jax.process_index(), "hash": h.hexdigest(), "blocks": config.num_blocks}))
jax.distributed.shutdown()
"""


def _digest(params) -> str:
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode() + str(leaf.dtype).encode() + np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_convert_once(tmp_path):
    net = cosmos_dit.get_preset("tiny", num_blocks=2)
    teacher = tmp_path / "teacher.pt"
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(3)), net, teacher)
    cache = tmp_path / "cache"  # empty: the first start of a job
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, address, str(i), str(teacher), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    conversions = [err.count("converting teacher") for _, err in outs]
    assert conversions == [1, 0]  # process 0 converted; process 1 waited and read its result
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["hash"] == results[1]["hash"] == _digest(convert.load_torch_checkpoint(teacher)[1])
    assert results[0]["blocks"] == results[1]["blocks"] == 2
    (entry,) = os.listdir(cache)  # one entry, no temporary folder left
    assert sorted(os.listdir(cache / entry)) == ["COMPLETE", "params", "source.json"]
