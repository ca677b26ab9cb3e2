"""The command-line convention shared by every command: bad input is one `error: ...` line and exit code 1
(`errors.fail`), a usage mistake exit code 2 (argparse), `--help` exit code 0 — absl commands included (absl's
help flag exits 1) — and shows every option's default (`HelpFormatter`); timestamped progress lines (`say`); the
start-up hint when JAX misses the accelerator."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
from collections.abc import Callable

from absl import app

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The argparse formatter of every command: the module docstring as written, and each option's default appended
    unless its help already states one (or it has none to state)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def run_absl(main: Callable, flags_parser: Callable | None = None) -> None:
    """`absl.app.run(main)` with the exit code of `--help` made 0, like the argparse commands."""
    try:
        if flags_parser is None:
            app.run(main)
        else:
            app.run(main, flags_parser=flags_parser)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise


def stamp() -> str:
    """The wall-clock prefix of every progress line, e.g. `[02:41:07]`."""
    return time.strftime("[%H:%M:%S]")


def say(line: str) -> None:
    """A timestamped progress line on stdout (callers print only on the main process)."""
    print(f"{stamp()} {line}", flush=True)


def accelerator_hint(backend: str | None = None, env=None, which=shutil.which, tpu_devices=None) -> str | None:
    """One line when this machine looks like it has an accelerator but JAX runs on the CPU (the CUDA / TPU jaxlib
    is missing): a GPU is `nvidia-smi` on PATH or CUDA_VISIBLE_DEVICES naming devices, a TPU is /dev/accel*. None
    when nothing looks wrong or JAX_PLATFORMS=cpu asks for the CPU."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":  # the CPU was asked for
        return None
    if backend is None:
        import jax  # only at start-up, after flag parsing: keeps --help fast

        backend = jax.default_backend()
    if backend != "cpu":
        return None
    tpu = glob.glob("/dev/accel*") if tpu_devices is None else tpu_devices
    if tpu:
        found, extra = "a TPU (/dev/accel*)", "tpu"
    elif which("nvidia-smi") is not None or env.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        found, extra = "an NVIDIA GPU", "gpu"
    else:
        return None
    return (
        f"warning: this machine has {found} but JAX sees only the CPU (jax.default_backend() is 'cpu'); "
        f'install the accelerator jaxlib with `pip install -e ".[{extra}]"` (docs/install.md), or ignore this for a '
        "CPU run."
    )
