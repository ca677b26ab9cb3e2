"""trigflow-export's files: the .pt and the diffusers pipeline folder, each with a model card README.md and metadata
(the .pt's extra/metadata.json, the safetensors __metadata__), written 0644 whatever the umask (issue 23 item 7)."""

import json
import os
import stat
import zipfile

import jax
import numpy as np
import pytest

from configs import predict25_4step
from trigflow_distill.core import sampling
from trigflow_distill.inference import export
from trigflow_distill.models import cosmos_dit
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import restore

NET = cosmos_dit.get_preset("tiny", num_blocks=2)
TEACHER = "hf://nvidia/Cosmos-Predict2.5-2B/base/pre-trained/d20b7120_ema_bf16.pt"


@pytest.fixture
def run(monkeypatch):
    """restore.load_student_at giving a tiny EMA student at step 12 of a run with known settings."""
    config = predict25_4step.get_config("tiny")
    config.teacher.path = TEACHER
    config.data.path = "/data/robot_clips"
    config.distill.guidance = 3.5
    params = jax.tree.map(np.asarray, cosmos_dit.init_params(NET, jax.random.key(0)))
    student = {"net": {k: v for k, v in params.items() if k != "crossattn_proj"}, "text_proj": params["crossattn_proj"]}
    monkeypatch.setattr(restore, "load_student_at", lambda workdir, which="ema": (12, config, NET, student))
    old = os.umask(0o077)  # a strict umask: the export still publishes 0644
    yield config, params
    os.umask(old)


def _modes(folder):
    return {
        os.path.relpath(os.path.join(root, f), folder): stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode)
        for root, _, files in os.walk(folder)
        for f in files
    }


def _check_metadata(meta, config):
    assert meta["teacher"] == TEACHER and meta["method"] == "dmd2" and meta["steps"] == "4"
    assert meta["guidance"] == "3.5" and meta["guidance_conditioned"] == "False" and meta["step"] == "12"
    assert meta["data"] == "/data/robot_clips" and meta["weights"] == "ema"
    assert json.loads(meta["student_rf_times"]) == pytest.approx([1.0, 0.9375, 0.833333, 0.625])
    assert "NVIDIA Open Model License" in meta["license"]
    assert json.loads(meta["recipe"]) == json.loads(config.to_json())


def _check_card(text, file):
    assert text.startswith("---\nlicense: other\n") and "base_model: nvidia/Cosmos-Predict2.5-2B\n" in text
    assert "a 4-step distilled student" in text and "| method | dmd2" in text and "CFG scale 3.5" in text
    assert "| training data | /data/robot_clips |" in text and f"| base model (teacher) | {TEACHER} |" in text
    assert "NVIDIA Open Model License" in text and export.LICENSE_URL in text
    assert f"trigflow-generate --student={file} " in text
    assert ("guidance_scale=1.0" in text) == (file == "student")  # the diffusers call, for the folder only


def test_torch_export_has_a_card_and_metadata_and_loads_as_before(run, tmp_path):
    config, params = run
    out = tmp_path / "pub" / "student.pt"
    assert export.main(["--workdir=RUN", f"--out={out}"]) == 0
    assert _modes(tmp_path / "pub") == {"student.pt": 0o644, "README.md": 0o644}
    _check_card((tmp_path / "pub" / "README.md").read_text(), "student.pt")
    with zipfile.ZipFile(out) as zf:
        _check_metadata(json.loads(zf.read("archive/extra/metadata.json")), config)
    net_config, back = convert.load_torch_checkpoint(out)  # the metadata member does not disturb the reader
    assert net_config == NET
    np.testing.assert_allclose(
        np.asarray(back["x_embedder"]["kernel"], np.float32), params["x_embedder"]["kernel"], atol=1e-2, rtol=1e-2
    )
    torch = pytest.importorskip("torch")
    sd = torch.load(out, weights_only=True)
    assert all(k.startswith("net.") for k in sd) and "net.x_embedder.proj.1.weight" in sd

    assert export.main(["--workdir=RUN", f"--out={out}"]) == 1  # no silent replacement
    assert export.main(["--workdir=RUN", f"--out={out}", "--overwrite"]) == 0


def test_diffusers_export_is_a_pipeline_folder_with_card_and_metadata(run, tmp_path, capsys):
    config, params = run
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export.main(["--workdir=RUN", f"--out={out}", "--format=diffusers"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2_5_PredictBasePipeline"
    assert index["transformer"] == ["diffusers", "CosmosTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"] and index["vae"] == [None, None]
    assert index["_trigflow_components"]["text_encoder"] == {
        "repo": "nvidia/Cosmos-Predict2.5-2B",
        "revision": "diffusers/base/post-trained",
        "subfolder": "text_encoder",
    }
    assert _modes(out) == {
        "notes.txt": 0o600,  # not ours: left as it was
        "model_index.json": 0o644,
        "README.md": 0o644,
        "transformer/config.json": 0o644,
        "transformer/diffusion_pytorch_model.safetensors": 0o644,
        "scheduler/scheduler_config.json": 0o644,
    }
    _check_card((out / "README.md").read_text(), "student")
    from safetensors import safe_open

    with safe_open(out / "transformer" / "diffusion_pytorch_model.safetensors", framework="np") as st:
        meta = st.metadata()
        assert meta["format"] == "pt"
        _check_metadata(meta, config)
    net_config, back = convert.load_diffusers_folder(out)  # generate --student reads the folder
    assert net_config.num_blocks == NET.num_blocks
    np.testing.assert_allclose(
        np.asarray(back["x_embedder"]["kernel"], np.float32), params["x_embedder"]["kernel"], atol=1e-2, rtol=1e-2
    )

    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(4)
    student_t = sampling.shifted_rf_times(4, 5.0)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), student_t, atol=1.5e-3)  # the 4 times, then 0

    class NoChecker:  # the real one needs cosmos_guardrail
        def to(self, *a, **k):
            return self

    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16)  # stands for the base model's VAE (a pointer)
    pipe = diffusers.Cosmos2_5_PredictBasePipeline.from_pretrained(
        out, vae=vae, text_encoder=None, tokenizer=None, safety_checker=NoChecker()
    )
    assert isinstance(pipe.transformer, diffusers.CosmosTransformer3DModel)
    assert isinstance(pipe.scheduler, diffusers.UniPCMultistepScheduler)

    capsys.readouterr()
    assert export.main(["--workdir=RUN", f"--out={out}", "--format=diffusers"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export.main(["--workdir=RUN", f"--out={out}", "--format=diffusers", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("fmt", ["torch", "diffusers"])
def test_export_to_a_remote_path_writes_the_same_files(run, tmp_path, monkeypatch, fmt):
    from tests import remote_fs

    root = tmp_path / "gcs"
    root.mkdir()
    remote_fs.serve_gs(root, monkeypatch)
    name = "student.pt" if fmt == "torch" else "student"
    assert export.main(["--workdir=RUN", f"--out=gs://bucket/pub/{name}", f"--format={fmt}"]) == 0
    pub = root / "bucket" / "pub"
    want = {"student.pt", "README.md"} if fmt == "torch" else {"student/README.md", "student/model_index.json"}
    assert want <= set(_modes(pub))
    if fmt == "diffusers":
        assert {"student/transformer/config.json", "student/scheduler/scheduler_config.json"} <= set(_modes(pub))
