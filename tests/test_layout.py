"""The layering rule: the method (dmd2) loads no system packages and no toy world, the trainer no toy world; no
sys.path edits; the data-kind registry hands the trainer its source and sample writer from the config."""

import ast
import pathlib
import subprocess
import sys

import numpy as np

from trigflow_distill import data_kinds
from trigflow_distill.toy import evaluate

import predict25_4step

HEAVY = ("orbax", "grain", "clu", "tensorboardX", "trigflow_distill.toy")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _loaded_after_import(module: str) -> list[str]:
    code = (
        f"import sys, {module}; heavy = {HEAVY!r}; "
        "print(sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + '.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_dmd2_imports_no_system_packages_and_no_toy():
    assert _loaded_after_import("trigflow_distill.methods.dmd2") == []


def test_trainer_does_not_import_the_toy_world():
    assert "trigflow_distill.toy" not in _loaded_after_import("trigflow_distill.training.loop")


def _edits_sys_path(source: str) -> bool:
    """True if the code calls a method of `sys.path` (insert, append, extend, ...); text in strings does not count."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                return True
    return False


def test_no_sys_path_edits():
    edit = "import sys\nsys." + "path.insert(0, 'x')"  # split so that text searches do not flag this file
    assert _edits_sys_path(edit) and not _edits_sys_path("'sys.path.insert'")
    offenders = [
        str(p.relative_to(ROOT))
        for d in ("tests", "trigflow_distill", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
        if _edits_sys_path(p.read_text())
    ]
    assert offenders == [], offenders


def test_toy_kind_reads_the_config_and_writes_pictures(tmp_path):
    """data_kinds: the toy records draw N from config.distill.cond_frame_probs (one home for the value) and the
    sample writer the trainer gets writes a PNG."""
    config = predict25_4step.get_config("tiny")
    kind = data_kinds.get(config)
    assert kind.evaluate is evaluate.evaluate_run
    config.distill.cond_frame_probs = (0.0, 0.0, 1.0)
    source, write_samples = kind.open(config)
    records = [source[i] for i in range(8)]
    assert all(int(r["num_cond_frames"]) == 2 for r in records)
    batch = {k: np.stack([r[k] for r in records]) for k in ("latents", "prompt")}
    write_samples(batch["latents"], batch, str(tmp_path / "samples.png"))
    assert (tmp_path / "samples.png").stat().st_size > 0
