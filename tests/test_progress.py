"""Start-up and progress output: timestamped phase lines, it/s and ETA without compile steps, the end-of-run
evaluation's progress, and the hint when JAX misses the machine's accelerator."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from trigflow_distill import toy
from trigflow_distill.common import cli
from trigflow_distill.models import cosmos_dit
from trigflow_distill.toy import evaluate
from trigflow_distill.training import builder, loop, metrics

import predict25_4step  # configs/ is on the pytest pythonpath

STAMP = r"\[\d\d:\d\d:\d\d\] "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rate_leaves_compile_steps_out():
    rate = metrics.Rate()
    rate.start(0, now=0.0)
    rate.exclude(30.0)  # step 1 compiled for 30 s; steps 2..10 took 1 s each
    assert rate.update(10, now=39.0) == (1.0, 1.0)
    rate.exclude(60.0)  # a new bucket: step 11 compiled for 60 s; steps 12..20 took 0.5 s each
    interval, overall = rate.update(20, now=39.0 + 60.0 + 4.5)
    assert interval == pytest.approx(2.0) and overall == pytest.approx(18 / 13.5)
    rate.exclude(5.0)  # an interval of compile steps only has no rate of its own; the overall one stays
    assert rate.update(21, now=39.0 + 60.0 + 4.5 + 5.0) == (None, pytest.approx(18 / 13.5))


def test_progress_line_is_timestamped_and_its_eta_ignores_compiles(tmp_path, monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    writer = metrics.Writer(str(tmp_path), total_steps=100, tokens_per_step=10)
    writer.start(0)
    writer.exclude(30.0)  # the first step compiled
    clock[0] += 30.0 + 9.0
    writer.write(10, {"student/loss": 0.5})
    clock[0] += 60.0 + 9.0  # a second bucket compiled for 60 s
    writer.exclude(60.0)
    writer.write(20, {"student/loss": 0.25})
    writer.close()
    first, second = capsys.readouterr().out.splitlines()
    assert re.fullmatch(STAMP + r"\[    10/100\] 1\.00 it/s 10 tok/s eta 1m30s \| student/loss=0\.5", first)
    assert re.fullmatch(STAMP + r"\[    20/100\] 1\.00 it/s 10 tok/s eta 1m20s \| student/loss=0\.25", second)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["steps_per_sec"] for x in logged] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_say_prefixes_the_time(capsys):
    cli.say("planning the mesh ...")
    assert re.fullmatch(STAMP + r"planning the mesh \.\.\.\n", capsys.readouterr().out)


@pytest.mark.parametrize(
    "backend, smi, env, tpu, extra",
    [
        ("cpu", "/usr/bin/nvidia-smi", {}, [], "gpu"),
        ("cpu", None, {"CUDA_VISIBLE_DEVICES": "0,1"}, [], "gpu"),
        ("cpu", None, {}, ["/dev/accel0"], "tpu"),
        ("cpu", None, {}, [], None),  # a CPU machine: nothing to say
        ("cpu", None, {"CUDA_VISIBLE_DEVICES": ""}, [], None),  # GPUs hidden on purpose
        ("cpu", "/usr/bin/nvidia-smi", {"JAX_PLATFORMS": "cpu"}, [], None),  # the CPU asked for
        ("gpu", "/usr/bin/nvidia-smi", {"CUDA_VISIBLE_DEVICES": "0"}, [], None),
        ("tpu", None, {}, ["/dev/accel0"], None),
    ],
)
def test_accelerator_hint(backend, smi, env, tpu, extra):
    hint = cli.accelerator_hint(backend, env=env, which=lambda name: smi, tpu_devices=tpu)
    if extra is None:
        assert hint is None
    else:
        assert "\n" not in hint and "JAX sees only the CPU" in hint and f'pip install -e ".[{extra}]"' in hint


def test_accelerator_hint_asks_jax(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert "GPU" in cli.accelerator_hint(env={}, which=lambda name: "/usr/bin/nvidia-smi", tpu_devices=[])


def test_training_command_prints_the_hint(tmp_path):
    """main.py on a machine that looks like it has a GPU (CUDA_VISIBLE_DEVICES) with the CPU jaxlib: the hint on
    stderr at start-up, before the config's own error."""
    if importlib.util.find_spec("jax_cuda12_plugin") or importlib.util.find_spec("libtpu"):
        pytest.skip("an accelerator jaxlib is installed: JAX would not fall back to the CPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["CUDA_VISIBLE_DEVICES"] = "0"
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/predict25_4step.py:tiny", f"--workdir={workdir}"]
        + ["--config.data.kind=nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    hint, error = proc.stderr.strip().splitlines()[-2:]
    assert hint.startswith("warning: this machine has an NVIDIA GPU but JAX sees only the CPU")
    assert 'pip install -e ".[gpu]"' in hint and error.startswith("error: config.data.kind='nope'")
    assert proc.returncode == 1 and not workdir.exists()


@pytest.mark.slow  # compiles the toy world's metrics: ~30 s on 2 cores
def test_evaluation_says_which_sampler_runs(tmp_path, monkeypatch):
    world = toy.make_world(toy.WorldConfig(scale_samples=256))
    net_config = cosmos_dit.get_preset(
        "tiny",
        model_channels=32,
        num_blocks=1,
        num_heads=2,
        mlp_ratio=2.0,
        adaln_lora_dim=8,
        crossattn_emb_channels=16,
        crossattn_proj_in_channels=world.config.text_width,
    )
    teacher = builder.split_teacher(cosmos_dit.init_params(net_config, jax.random.PRNGKey(0)))
    # sampling itself is tested in test_pretrain_eval.py; here every sampler returns the conditioning clips
    monkeypatch.setattr(evaluate, "_generate", lambda fn, params, inputs, bs: (np.asarray(inputs["gt"]), 1e-3))
    lines = []
    evaluate.evaluate(
        world, net_config, teacher, {"student_ema": teacher["net"]}, str(tmp_path), num_samples=8, log=lines.append
    )
    progress = [line for line in lines if "evaluating sampler" in line]
    n = len(evaluate.TEACHER_ROWS) + 3  # the teacher rows, then the student's 1, 2 and 4 steps
    assert len(progress) == n
    for k, line in enumerate(progress, 1):
        assert re.match(STAMP + rf"evaluating sampler {k}/{n}: ", line)
    assert progress[-1].endswith("student_ema4 ...")


@pytest.mark.slow
def test_training_prints_its_phases(teacher_pt, tmp_path, capsys):
    config = predict25_4step.get_config("tiny")
    config.teacher.path = str(teacher_pt)
    config.data.batch_size = 8
    config.total_steps = 2
    config.log_every = 1
    config.sample_every = 2
    config.checkpoint_every = 2
    config.eval.at_end = False
    source = toy.RecordSource(toy.make_world())
    loop.train(config, str(tmp_path), source, lambda *args: None)
    loop.train(config, str(tmp_path), source, lambda *args: None)  # finished: restores, trains nothing
    out = capsys.readouterr().out
    phases = [
        "loading the teacher",
        "planning the mesh",
        "initialising the student and critic",
        r"compiling the student update for bucket 8x8 \(4 latent frames\)",
        r"\[     1/2\] compiling eta \?",  # a step that compiled gives no rate
        r"compiling the critic update for bucket 8x8 \(4 latent frames\)",
        f"writing samples -> {re.escape(str(tmp_path))}/samples/0000002.png",
        "restoring step 2",
        "Resumed from .* at step 2",
    ]
    for phase in phases:
        assert re.search(f"^{STAMP}{phase}", out, re.M), phase
    assert out.count("compiling the") == 2  # each update compiled once, nothing on the resume
