"""The first run on one's own data (issue 23): data checks before the mesh plan that name the field to change, no
plan with one possible mesh, --print_config, the documented smoke command on a 2-record set, a failed first start
that does not bind the corrected rerun, fixed validation samples with samples/<step>.json."""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from trigflow_distill import data, train_main
from trigflow_distill.models import cosmos_dit
from trigflow_distill.training import loop, plan, run_config

import predict25_4step  # configs/ is on the pytest pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENTS, TEXT = (16, 4, 4, 6), (8, 96)  # the tiny teacher's patches and raw text width
CAPTIONS = ["a red car drives", "a cat sleeps"]


def _write_set(out, buckets=((2, LATENTS),)):
    """A prepared-style set: (records, latent shape) per bucket, with captions as `prepare` stores them."""
    rng = np.random.default_rng(0)
    writer = data.DatasetWriter(str(out))
    k = 0
    for n, shape in buckets:
        info = [{"caption": f"clip {k + i}", "source": f"clip_{k + i}.mp4", "frames": [0, 5]} for i in range(n)]
        if len(buckets) == 1:
            info = [{**row, "caption": CAPTIONS[i]} if i < len(CAPTIONS) else row for i, row in enumerate(info)]
        writer.write_shard(
            rng.normal(size=(n, *shape)).astype(np.float32),
            rng.normal(size=(n, *TEXT)).astype(np.float32),
            bucket=f"{shape[2] * 8}x{shape[3] * 8}",
            info=info,
        )
        k += n
    writer.close()
    return out


def _config(teacher, dataset, variant="", **overrides):
    c = predict25_4step.get_config(variant)
    c.teacher.path, c.data.kind, c.data.path = str(teacher), "dir", str(dataset)
    c.eval.at_end = False
    for k, v in overrides.items():
        section, _, field = k.rpartition(".")
        (c[section] if section else c)[field] = v
    return c


@pytest.fixture
def no_plan(monkeypatch):
    def planned(*args, **kwargs):
        raise AssertionError("the mesh was planned")

    monkeypatch.setattr(plan, "compile_updates", planned)
    monkeypatch.setattr(plan, "choose_mesh", planned)


def test_too_few_records_are_refused_before_the_mesh_plan_naming_the_batch_size(teacher_pt, tmp_path, no_plan):
    """The README's command (batch 8, mesh auto) on a 2-record set: one line naming --config.data.batch_size=2 (a
    batch the 8 test devices can split), before any plan; today it came after a compile-only plan."""
    config = _config(teacher_pt, _write_set(tmp_path / "set"))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the dataset has 2 records, fewer than one batch of 8 (config.data.batch_size): "
            "set --config.data.batch_size=2, or add records."
        ),
    ):
        loop.train(config, str(tmp_path / "run"), data.NpyDirSource(str(tmp_path / "set")))


def test_no_bucket_holding_a_batch_names_the_largest(teacher_pt, tmp_path, no_plan):
    dataset = _write_set(tmp_path / "set", buckets=((2, LATENTS), (2, (16, 4, 4, 8))))
    config = _config(teacher_pt, dataset, **{"data.batch_size": 4})
    with pytest.raises(ValueError, match=r"no bucket holds a whole batch of 4 .*the largest holds 2: set "):
        loop.train(config, str(tmp_path / "run"), data.NpyDirSource(str(dataset)))
    # buckets smaller than a batch while another holds one: a note, not an error
    assert loop.check_batches(data.NpyDirSource(str(dataset)), 2) == []
    uneven = _write_set(tmp_path / "uneven", buckets=((3, LATENTS), (1, (16, 4, 4, 8))))
    (note,) = loop.check_batches(data.NpyDirSource(str(uneven)), 2)
    assert "{'32x64': 1}" in note and "never trained on" in note
    # the value named is the largest the devices split: 3 records on a mesh of 2 data shards -> 2
    with pytest.raises(ValueError, match=r"set --config.data.batch_size=2,"):
        loop.check_batches(data.NpyDirSource(str(uneven)), 4, fits=lambda b: b % 2 == 0)


def test_one_possible_mesh_needs_no_plan_and_no_device_memory(no_plan):
    """One CPU device and every mesh size at 0: the only mesh, without `mesh.device_memory_gib` (which CPU devices
    do not report; today: an error asking for it) and without compiling."""
    config = predict25_4step.get_config()
    net = cosmos_dit.get_preset("tiny", num_blocks=1)
    lines = []
    mesh = plan.run_mesh(config, net, LATENTS, 8, 1, None, jax.devices()[:1], log=lines.append)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "seq": 1}
    assert lines[0].startswith("mesh auto: data:1,fsdp:1,seq:1, the only mesh of 1 device(s)")


def test_print_config_lists_every_field_with_its_doc_and_default(tmp_path):
    """Every field of both variants has a one-line doc from the config file's comments (its own or its section's);
    main.py --print_config prints them with the overrides applied and needs no --workdir."""
    path = os.path.join(ROOT, "configs", "predict25_4step.py")
    docs = train_main.field_docs(path)
    for variant in ("", "tiny"):
        listing = train_main.config_listing(predict25_4step.get_config(variant), path)
        rows = listing.splitlines()[1:]
        flat = run_config._flatten(predict25_4step.get_config(variant).to_dict())
        assert len(rows) == len(flat)
        for name, value in flat.items():
            (row,) = [r for r in rows if r.strip().startswith(f"{name} = ")]
            assert f"{name} = {value!r}" in row and re.search(r"  # \S", row), row
    assert docs["data.batch_size"] == "global batch" and docs["wandb.mode"] == "online | offline"
    assert train_main.field_doc(docs, "student_optim.lr").startswith("The student's optimizer: AdamW")
    out = subprocess.run(
        [sys.executable, "main.py", "--config=configs/predict25_4step.py", "--print_config", "--config.seed=7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^  seed = 7 +# ", out.stdout, re.M) and "sample.records = ()" in out.stdout


def test_failed_first_start_does_not_bind_the_corrected_rerun(teacher_pt, tmp_path):
    """A start that fails on its data after writing config.json (batch 8 on 2 records) leaves a workdir without a
    checkpoint: the corrected config replaces it (today: refused as another run). With a checkpoint, a changed
    config is still refused."""
    dataset = _write_set(tmp_path / "set")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        loop.train(_config(teacher_pt, dataset, "tiny"), str(workdir), data.NpyDirSource(str(dataset)))
    assert json.loads((workdir / "config.json").read_text())["data"]["batch_size"] == 32
    corrected = _config(teacher_pt, dataset, "tiny", **{"data.batch_size": 1})
    note = run_config.resume_config(corrected, workdir)
    assert "has no checkpoint: the config of an earlier start that trained nothing is replaced" in note
    assert "data.batch_size: 32 -> 1" in note
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["batch_size"] == 1 and saved["allow_config_change"] is False
    # once a checkpoint exists the workdir holds work: another config is refused, nothing is written
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds a run with another config.*data.batch_size: 1 -> 2"):
        run_config.resume_config(_config(teacher_pt, dataset, "tiny", **{"data.batch_size": 2}), workdir)
    assert json.loads((workdir / "config.json").read_text()) == saved


def test_another_teacher_file_before_the_first_checkpoint_is_accepted(teacher_pt, tmp_path):
    """A wrong teacher file replaced at the same path before anything was trained: recorded anew, not refused."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_pt.read_bytes())
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_config.resume_config(_config(teacher, tmp_path), workdir)
    teacher.write_bytes(teacher_pt.read_bytes() + b"\0")
    assert "teacher file changed" in run_config.resume_config(_config(teacher, tmp_path), workdir)
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    teacher.write_bytes(teacher_pt.read_bytes())
    with pytest.raises(ValueError, match="is not the one"):
        run_config.resume_config(_config(teacher, tmp_path), workdir)


def _documented(marker: str) -> list[str]:
    """The command of the bash block after `marker` in docs/own_data.md, as argv."""
    text = open(os.path.join(ROOT, "docs", "own_data.md"), encoding="utf-8").read()
    block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.slow
def test_documented_cpu_smoke_command_trains_a_two_record_set(teacher_pt, tmp_path):
    """The README's real-recipe command fails in seconds on a 2-record set, naming the batch size; the CPU smoke
    command of docs/own_data.md then trains 20 steps at the first try, in the same workdir."""
    dataset = _write_set(tmp_path / "set")
    workdir = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
    readme = [
        sys.executable,
        "main.py",
        "--config=configs/predict25_4step.py",
        f"--workdir={workdir}",
        f"--config.teacher.path={teacher_pt}",
        f"--config.data.path={dataset}",
    ]
    out = subprocess.run(readme, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "planning the mesh" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: the dataset has 2 records, fewer than one batch of 8 (config.data.batch_size): "
        "set --config.data.batch_size=2, or add records."
    )
    substitute = {"TEACHER.pt": str(teacher_pt), "/data/my_set": str(dataset), "/tmp/smoke": str(workdir)}
    cmd = _documented("<!-- smoke-cpu")
    assert cmd[:2] == ["python", "main.py"] and "--config.data.batch_size=1" in cmd and "--config.total_steps=20" in cmd
    cmd = [sys.executable] + [
        re.sub("|".join(map(re.escape, substitute)), lambda m: substitute[m.group(0)], a) for a in cmd[1:]
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "has no checkpoint: the config of an earlier start that trained nothing is replaced" in out.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20
    losses = [r[k] for r in rows for k in ("critic/loss", "student/loss") if k in r]
    assert len(losses) >= 4 and np.isfinite(losses).all()
    assert os.listdir(workdir / "checkpoints")


def test_validation_samples_are_fixed_records_described_in_step_json(teacher_pt, tmp_path, capsys):
    """sample.records=(1,): every sample call sees record 1 (not the batch trained on; padded to the 8 devices'
    batch, one sample handed on), with conditioning frames drawn once with sample.seed; samples/<step>.json names
    its caption, record, conditioning and seed, and the log says when samples are written."""
    dataset = _write_set(tmp_path / "set", buckets=((8, LATENTS),))
    config = _config(
        teacher_pt,
        dataset,
        "tiny",
        total_steps=4,
        sample_every=2,
        log_every=2,
        checkpoint_every=4,
        **{"data.batch_size": 8, "sample.records": (1,), "sample.seed": 3},
    )
    source = data.NpyDirSource(str(dataset))
    seen = []

    def write_samples(x, batch, path, writer):
        seen.append((x.shape, batch["latents"], batch["num_cond_frames"], path))

    loop.train(config, str(tmp_path / "run"), source, write_samples)
    assert len(seen) == 2
    drawn = int(np.random.default_rng(3).choice(3, size=1, p=predict25_4step.get_config().distill.cond_frame_probs)[0])
    for shape, latents, num_cond, _ in seen:
        assert shape == (1, *LATENTS)
        np.testing.assert_array_equal(latents, source[1]["latents"][None])
        assert num_cond.tolist() == [drawn]
    described = json.loads((tmp_path / "run" / "samples" / "0000004.json").read_text())
    assert described["step"] == 4 and described["seed"] == 3
    (sample,) = described["samples"]
    assert sample["record"] == 1 and sample["caption"] == CAPTIONS[1] and sample["source"] == "clip_1.mp4"
    assert sample["num_cond_frames"] == drawn and "drawn" in sample["num_cond_frames_from"]
    out = capsys.readouterr().out
    assert re.search(r"writing samples -> .*samples/0000002\.png \(1 samples; 0000002\.json says what each is\)", out)


def test_sample_records_are_checked_at_start(tmp_path):
    source = data.NpyDirSource(str(_write_set(tmp_path / "set", buckets=((2, LATENTS), (2, (16, 4, 4, 8))))))
    assert loop.check_sample_records(source, (3, 2)) == (3, 2)
    with pytest.raises(ValueError, match=r"config.sample.records=\(0, 4\): give record indices in \[0, 4\)"):
        loop.check_sample_records(source, (0, 4))
    with pytest.raises(ValueError, match="come from several buckets .* pick records of one bucket"):
        loop.check_sample_records(source, (0, 2))
