"""The layering rule: the import-linter contracts of pyproject.toml hold (layers point one way, core is jax/optax/numpy
only, nothing imports torch); the methods load no system packages and no toy world, the trainer no toy world; no
sys.path edits; every console script answers --help; one x0 builder, one text projection, one data/teacher check and
one run builder; the data-kind registry hands the trainer its source and sample writer from the config."""

import argparse
import ast
import os
import pathlib
import subprocess
import sys
import tomllib

import numpy as np

from trigflow_distill import data_kinds
from trigflow_distill.common import cli
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


def test_import_contracts_hold():
    """`lint-imports` (the contracts in pyproject.toml's [tool.importlinter]) passes: a layer importing one above
    it, core importing flax/orbax/..., or the package importing torch fails here."""
    out = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_methods_import_no_system_packages_and_no_toy():
    for module in ("trigflow_distill.methods.dmd2", "trigflow_distill.methods.rcm"):
        assert _loaded_after_import(module) == [], module


def _definitions(name: str) -> list[str]:
    """Files of the package that define a top-level function or class `name`."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "trigflow_distill").rglob("*.py")
        for node in ast.parse(p.read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name
    )


def test_one_of_each_shared_piece():
    """One x0 builder, one sampling entry point, one text projection, one data/teacher check, one run builder."""
    assert _definitions("make_x0_fn") == ["trigflow_distill/methods/video2world.py"]
    assert _definitions("sample") == ["trigflow_distill/core/sampling.py", "trigflow_distill/methods/video2world.py"]
    assert _definitions("project_text") == ["trigflow_distill/models/cosmos_dit/conditioning.py"]
    assert _definitions("check_data") == ["trigflow_distill/models/cosmos_dit/conditioning.py"]
    assert _definitions("build") == ["trigflow_distill/training/builder.py"]
    # the text projection is an einsum in exactly one place (Wan's text embedding is a trainable layer of its DiT,
    # not a frozen projection shared by teacher, student and critic)
    einsum_proj = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "trigflow_distill").rglob("*.py")
        if ("jax.nn.gelu(y + bias" in p.read_text() or "gelu(_dense(text" in p.read_text())
        and "models/wan_dit" not in p.as_posix()
    ]
    assert einsum_proj == ["trigflow_distill/models/cosmos_dit/conditioning.py"], einsum_proj


def test_every_console_script_answers_help():
    """Each [project.scripts] entry (and main.py) prints its --help and exits 0, all started at once."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, target in scripts.items():
        module, func = target.split(":")
        code = f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {func}; {func}()"
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    procs["main.py"] = subprocess.Popen(
        [sys.executable, "main.py", "--help"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        assert "usage" in (out + err).lower() or "flags" in (out + err).lower(), f"{name}: {out[:500]}"


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


def test_every_argparse_command_uses_the_help_formatter_that_shows_defaults():
    """Each argparse parser in the package is built with `cli.HelpFormatter`, so `--help` states every option's
    default (prepare --vae used to show none); the formatter appends a default unless the help states one."""
    plain = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "trigflow_distill").rglob("*.py")
        if "argparse.ArgumentParser(" in p.read_text() and "cli.HelpFormatter" not in p.read_text()
    ]
    assert not plain, f"argparse commands without cli.HelpFormatter: {plain}"
    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--vae", default="hf://x/y.pth", help="the VAE")
    parser.add_argument("--frames", type=int, default=93, help="frames (default 93)")
    parser.add_argument("--out", required=True, help="output")
    text = parser.format_help()
    assert "the VAE (default: hf://x/y.pth)" in text and "(default 93)" in text and "(default: 93)" not in text
    assert "output (default" not in text
