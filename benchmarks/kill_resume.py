"""kill -9 at random points of a training run, resume, and count how many resumes are bit-exact.

  python benchmarks/kill_resume.py                      # 20 kills, chain mode, ~11 min on 2 loaded CPU cores
  python benchmarks/kill_resume.py --mode=independent   # a fresh workdir per kill (twice the process starts)

The tiny recipe (a random 2-block tiny teacher, toy data, batch 4) runs `--steps` steps once uninterrupted with a
checkpoint at every step: the reference. Then main.py is started on another workdir and killed with SIGKILL at a
random point: with probability `--startup-share` uniformly within the start-up (imports, teacher conversion,
compilation, restore; its length estimated from the runs so far), otherwise once the run has trained a number of
steps drawn uniformly from [1, `--steps`] past the checkpoint it resumes from (read from the progress lines) plus a
uniform fraction of a step. A run drawn past the end finishes its chain, so kills spread over the whole run and
land in the start-up, in the middle of steps, in logging and during the asynchronous saves alike, before and
after the first checkpoint of a chain. Restarts share a persistent compilation cache.

chain mode: the killed run is resumed in the same workdir and killed again, until `--kills` kills; a last run
finishes the chain (a run that finishes before its kill also ends a chain, and a new one starts). Every
checkpoint a chain wrote (state and data position; one every `--every` steps, all kept) must equal the
reference's checkpoint of the same step bit for bit: a kill counts as resumed bit-exactly when every checkpoint
written after it matches (the final one included). independent mode: each kill gets a fresh workdir, one resume
to the end, and its final checkpoint is compared. Prints one line per kill and a JSON summary; exits 1 unless
all are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUMED = re.compile(r"[Rr]esumed from .* at step (\d+)")
PROGRESS = re.compile(r"^(?:\[[\d:]+\] )?\[\s*(\d+)/")  # after the `[HH:MM:SS]` stamp of cli.say


def command(workdir, teacher, steps: int, every: int, *extra: str, log_every: int = 1, keep: int | None = 100000):
    """The tiny main.py job on one CPU device, quiet (no samples, no evaluation) and checkpointing every `every`
    steps; `keep` None leaves the config's keep_checkpoints. Also the command line of tests/test_resume.py and
    tests/test_faults.py."""
    return [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--config=" + os.path.join(ROOT, "configs/predict25_4step.py:tiny"),
        f"--workdir={workdir}",
        f"--config.teacher.path={teacher}",
        f"--config.total_steps={steps}",
        f"--config.checkpoint_every={every}",
        *([] if keep is None else [f"--config.keep_checkpoints={keep}"]),
        "--config.data.batch_size=4",
        f"--config.log_every={log_every}",
        "--config.sample_every=0",
        "--config.eval.at_end=False",
        "--config.mesh.data=1",
        *extra,
    ]


def environment(cache_dir: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    # Every process compiles the same two updates: the persistent cache makes the restarts cheap.
    env.update(
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


class Run:
    """main.py in a subprocess, its stdout lines collected with arrival times."""

    def __init__(self, cmd: list[str], env: dict):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.start, line.rstrip("\n")))

    def wait(self, timeout=None) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill_after(self, seconds: float) -> bool:
        """SIGKILL at `seconds` after the start; False if the run had ended by then."""
        try:
            self.proc.wait(timeout=max(0.0, seconds - (time.perf_counter() - self.start)))
            return False
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.wait()
            return True

    def kill_at_step(self, step: int, delay: float) -> bool:
        """SIGKILL `delay` seconds after the progress line of `step` (or a later one: a resume may start past it);
        False if the run had ended by then."""
        while (reached := self.step_reached_s(step)) is None and self.proc.poll() is None:
            time.sleep(0.02)
        if reached is None:
            return False
        return self.kill_after(reached + delay)

    def step_reached_s(self, step: int) -> float | None:
        lines = list(self.lines)
        return next((t for t, line in lines if (m := PROGRESS.match(line)) and int(m.group(1)) >= step), None)

    def first_step_s(self) -> float | None:
        return next((t for t, line in list(self.lines) if PROGRESS.match(line)), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def last_step(self) -> int | None:
        steps = [int(m.group(1)) for _, line in self.lines if (m := PROGRESS.match(line))]
        return steps[-1] if steps else None

    def resumed_at(self) -> int:
        m = RESUMED.search(self.text())
        return int(m.group(1)) if m else 0


def read_checkpoint(step_dir: str):
    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    data = {}
    for root, _, files in os.walk(os.path.join(step_dir, "data")):
        for name in files:
            if name == "commit_success.txt":  # Orbax writes the folder's own path into it
                continue
            with open(os.path.join(root, name), "rb") as f:
                data[os.path.relpath(os.path.join(root, name), step_dir)] = f.read()
    return jax.tree.map(np.asarray, state), data


def equal_checkpoints(a_dir: str, b_dir: str) -> bool:
    (sa, da), (sb, db) = read_checkpoint(a_dir), read_checkpoint(b_dir)
    la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
    return da == db and len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def step_dirs(workdir: str) -> dict[int, str]:
    root = os.path.join(workdir, "checkpoints")
    return {int(n): os.path.join(root, n) for n in os.listdir(root) if n.isdigit()} if os.path.isdir(root) else {}


def saving_now(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any("orbax-checkpoint-tmp" in n for n in os.listdir(root))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=24, help="training steps of the run")
    parser.add_argument("--every", type=int, default=2, help="checkpoint interval of the killed runs")
    parser.add_argument("--startup-share", type=float, default=0.25, help="share of the kills aimed at the start-up")
    parser.add_argument("--mode", choices=("chain", "independent"), default="chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a new temporary one, deleted)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    scratch = args.dir or tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(scratch, exist_ok=True)
    env = environment(os.path.join(scratch, "jax_cache"))
    teacher = os.path.join(scratch, "teacher.pt")
    net = cosmos_dit.get_preset("tiny", num_blocks=2)
    convert.export_torch(cosmos_dit.init_params(net, jax.random.PRNGKey(1)), net, teacher, overwrite=True)
    t0 = time.perf_counter()

    # 2 steps compile both updates into the persistent cache, so the reference is timed like the restarts
    shutil.rmtree(os.path.join(scratch, "warm-up"), ignore_errors=True)
    warm = Run(command(os.path.join(scratch, "warm-up"), teacher, 2, 2), env)
    if warm.wait(timeout=3600) != 0:
        print(warm.text()[-3000:])
        raise SystemExit("the warm-up run failed")
    shutil.rmtree(os.path.join(scratch, "warm-up"), ignore_errors=True)
    ref_dir = os.path.join(scratch, "reference")  # always run anew: a reference of other code proves nothing
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref = Run(command(ref_dir, teacher, args.steps, 1), env)
    if ref.wait(timeout=3600) != 0:
        print(ref.text()[-3000:])
        raise SystemExit("the reference run failed")
    times = [t for t, line in ref.lines if PROGRESS.match(line)]  # log_every=1: one line per step
    # the median step (the first ones also compile the other update): the sub-step offset of a training kill
    step_s = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
    print(f"reference: {args.steps} steps in {times[-1]:.1f} s, {step_s:.2f} s per step", flush=True)
    reference = step_dirs(ref_dir)

    def finish(workdir: str) -> None:
        final = Run(command(workdir, teacher, args.steps, args.every), env)
        if final.wait(timeout=3600) != 0:
            print(final.text()[-3000:])
            raise SystemExit("a resumed run failed")

    startups = []  # first-step times of the runs so far (with a warm compilation cache)
    kills, chains = [], [os.path.join(scratch, "run0")]
    shutil.rmtree(chains[-1], ignore_errors=True)
    while len(kills) < args.kills:
        work = chains[-1]
        if args.mode == "independent" and kills:
            chains.append(os.path.join(scratch, f"run{len(chains)}"))
            work = chains[-1]
        aim_startup = bool(startups) and rng.random() < args.startup_share
        # counted from where the resume starts: an absolute target it skips would only kill early, one drawn
        # between the latest checkpoint and the end would pile the kills up at the end of a chain
        target = max(step_dirs(work), default=0) + rng.randint(1, args.steps)
        delay = rng.uniform(0, float(np.median(startups)) if aim_startup else step_s)
        run = Run(command(work, teacher, args.steps, args.every), env)
        killed = run.kill_after(delay) if aim_startup else run.kill_at_step(target, delay)
        if run.first_step_s() is not None:
            startups.append(run.first_step_s())
        if not killed:
            if run.proc.returncode != 0:
                print(run.text()[-3000:])
                raise SystemExit(f"a run failed (exit {run.proc.returncode}) instead of being killed")
            chains.append(os.path.join(scratch, f"run{len(chains)}"))  # this chain is complete: start another
            continue
        kill = {
            "chain": len(chains) - 1,
            "phase": "start-up" if run.last_step() is None else "training",
            "target_step": None if aim_startup else target,
            "at_s": round(time.perf_counter() - run.start, 2),
            "resumed_from": run.resumed_at(),
            "last_logged_step": run.last_step(),
            # where the chain stood: the last step logged, else (start-up) the checkpoint it was resuming from
            "chain_step": run.last_step() or max(step_dirs(work), default=0),
            "during_save": saving_now(work),
            "checkpoints_before": sorted(step_dirs(work)),
        }
        kills.append(kill)
        print(f"kill {len(kills)}: {kill}", flush=True)
        if args.mode == "independent":
            finish(work)
    if args.mode == "chain" and os.path.isdir(chains[-1]):
        finish(chains[-1])

    exact, compared, unreadable = 0, 0, []
    matches = {}
    for i, work in enumerate(chains):
        if not os.path.isdir(work):
            continue
        written = step_dirs(work)
        if args.steps not in written:
            raise SystemExit(f"{work} did not reach step {args.steps}")
        targets = sorted(written) if args.mode == "chain" else [args.steps]
        matches[i] = {s: equal_checkpoints(written[s], reference[s]) for s in targets}
        compared += len(targets)
        unreadable += [n for n in os.listdir(os.path.join(work, "checkpoints")) if n.startswith("unreadable")]
    for n, kill in enumerate(kills):
        # a kill after the last save (during shut-down) is checked on the final checkpoint the resume found
        after = [s for s in matches[kill["chain"]] if s not in kill["checkpoints_before"]] or [args.steps]
        kill["exact"] = all(matches[kill["chain"]][s] for s in after)
        exact += kill["exact"]
        print(f"kill {n + 1}: " + json.dumps({k: v for k, v in kill.items() if k != "checkpoints_before"}), flush=True)
    quarters, _ = np.histogram([k["chain_step"] for k in kills], bins=4, range=(0, args.steps))
    locks = [w for w in chains if os.path.exists(os.path.join(w, "lock.json"))]
    summary = {
        "mode": args.mode,
        "kills": len(kills),
        "resumed_bit_exactly": exact,
        "steps": args.steps,
        "checkpoints_compared": compared,
        "checkpoints_equal": sum(sum(m.values()) for m in matches.values()),
        "kills_in_startup": sum(k["last_logged_step"] is None for k in kills),
        # a kill before any checkpoint of its chain only proves a fresh start; the ones after test real resumes
        "kills_before_first_save": sum(not k["checkpoints_before"] for k in kills),
        "kills_after_first_save": sum(bool(k["checkpoints_before"]) for k in kills),
        "kill_steps": sorted(k["chain_step"] for k in kills),  # 0: in the start-up of a fresh chain
        "kills_per_quarter_of_run": quarters.tolist(),
        "kills_during_save": sum(k["during_save"] for k in kills),
        "unreadable_set_aside": unreadable,
        "locks_left": len(locks),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    print(f"resumed bit-exactly: {exact}/{len(kills)}")
    if args.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if exact == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
