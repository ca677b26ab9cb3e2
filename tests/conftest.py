"""Test-wide set-up: 8 simulated CPU devices (for the sharding tests), one XLA compilation cache for the session,
parsed absl flags (grain reads them), and the shared tiny fixtures (a teacher `.pt` in the release layout)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the main.py / plan subprocesses they start, which inherit the environment) compile the same tiny
# updates: a persistent compilation cache, new for each session and removed at its end, compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="trigflow-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from trigflow_distill.models import cosmos_dit  # noqa: E402
from trigflow_distill.models.cosmos_dit import convert  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def teacher_pt(tmp_path_factory):
    """A random tiny Cosmos DiT (1 block) written as a native `.pt` (what users bring), shared by every test that
    needs *a* teacher checkpoint."""
    net = cosmos_dit.get_preset("tiny", num_blocks=1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(0)), net, path)
    return path
