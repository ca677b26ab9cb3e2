"""Training metrics: clu.metrics aggregation, TensorBoard (tensorboardX, no TensorFlow), a JSONL file, a console line.

Only process 0 writes (the caller passes `enabled=False` elsewhere).
"""
import json
import os
import time

import numpy as np
from clu import metrics as clu_metrics


class Aggregator:
    """Averages per-step scalar metrics between two log points with clu.metrics.Average."""

    def __init__(self):
        self._avg = {}

    def add(self, step_metrics):
        for name, value in step_metrics.items():
            m = clu_metrics.Average.from_model_output(np.asarray(value, np.float32))
            self._avg[name] = self._avg[name].merge(m) if name in self._avg else m

    def compute_and_reset(self):
        out = {name: float(m.compute()) for name, m in self._avg.items()}
        self._avg = {}
        return out


class Writer:
    """Writes scalars to `workdir/tensorboard` and `workdir/metrics.jsonl`, and a progress line to stdout."""

    def __init__(self, workdir: str, total_steps: int, tokens_per_step: int, enabled: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self._last = None
        if enabled:
            from tensorboardX import SummaryWriter  # optional heavy import kept local
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = None
        if self._last is not None and step > self._last[0]:
            rate = (step - self._last[0]) / (now - self._last[1])
            scalars = dict(scalars, steps_per_sec=rate, tokens_per_sec=rate * self.tokens_per_step)
        self._last = (step, now)
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        eta = f"{(self.total_steps - step) / rate:6.0f}s" if rate else "     ?"
        shown = " ".join(f"{k}={v:.4g}"
                         for k, v in sorted(scalars.items()) if k.endswith(("loss", "grad_norm")))
        speed = f"{rate:.2f} it/s {rate * self.tokens_per_step:.3g} tok/s" if rate else "warm-up"
        print(f"[{step:6d}/{self.total_steps}] {speed} eta {eta} | {shown}", flush=True)

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()

