"""The layering rule: the method (dmd2) loads no system packages and no toy world; tests and modules do not edit
sys.path."""
import pathlib
import subprocess
import sys

HEAVY = ("orbax", "grain", "clu", "tensorboardX", "trigflow_distill.toy")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _loaded_after_import(module: str) -> list[str]:
    code = (f"import sys, {module}; heavy = {HEAVY!r}; "
            "print(sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + '.')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_dmd2_imports_no_system_packages_and_no_toy():
    assert _loaded_after_import("trigflow_distill.dmd2") == []


def test_trainer_does_not_import_the_toy_world():
    assert "trigflow_distill.toy" not in _loaded_after_import("trigflow_distill.train")


def test_no_sys_path_edits():
    offenders = [str(p.relative_to(ROOT)) for d in ("tests", "trigflow_distill", "benchmarks")
                 for p in (ROOT / d).rglob("*.py") if p.name != "test_layout.py" and "sys.path.insert" in p.read_text()]
    assert offenders == [], offenders
