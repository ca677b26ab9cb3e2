"""Export the distilled student of a training run for the PyTorch ecosystem.

  trigflow-export --workdir=/tmp/run --out=/tmp/student.pt             # native Cosmos .pt (bf16)
  trigflow-export --workdir=gs://bucket/run --out=gs://bucket/student --format=diffusers

The EMA weights are exported unless --raw; the frozen text projection is taken from the teacher, so the file
is a complete Cosmos DiT that loads like the teacher it came from (and samples in 4 steps without guidance). A
guidance-conditioned student (docs/algorithm.md §15) keeps its CFG-scale projection as `guidance_embedder.linear.weight`
(native format only: diffusers' CosmosTransformer3DModel has no guidance input); this project's convert and generate
read it back.
A student with a NaN or inf in any weight (in the exported bfloat16) is refused, naming the step: no format is written.
Beside every export: a model card `README.md` (base model, method, steps, guidance, data, the teacher's license
notice, how to sample) and the metadata (teacher, steps, guidance, method, data, step, the run's config as `recipe`)
in the file itself: the safetensors header's `__metadata__`, and in the `.pt` the zip member
`<archive>/extra/metadata.json` (torch.load ignores it; the torch-free writer stores tensors only). The diffusers
export is a pipeline folder for `Cosmos2_5_PredictBasePipeline`: `model_index.json`, `transformer/` and a
`scheduler/` config of the student's 4 steps; the VAE and text encoder are pointers in the card and
`model_index.json` (not copied; docs/generate.md#export). Local files are written 0644.
Only the exported student is read from the checkpoint (`restore.load_student`: a partial restore into host memory, no
optimizer state), so exporting a 2B run reads 8.2 GB of fp32 weights, not the whole ~56 GB TrainState. Workdir and
output may be local or remote (gs://, through etils.epath); an existing output is replaced only with --overwrite.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile

import jax
import ml_dtypes
import numpy as np
from etils import epath

from trigflow_distill.common import cli, errors, paths
from trigflow_distill.core import sampling
from trigflow_distill.models.cosmos_dit import convert
from trigflow_distill.training import restore

EXPORT_DTYPE = ml_dtypes.bfloat16  # what convert.export_torch / export_diffusers write by default


def non_finite(params, dtype=EXPORT_DTYPE) -> list[str]:
    """Names of the leaves of `params` holding a NaN or inf once cast to `dtype` (a finite fp32 value near the
    limit rounds to inf in bfloat16), one leaf at a time so that the peak is one leaf's copy."""
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(x)
        if (x.dtype.kind == "f" or x.dtype == EXPORT_DTYPE) and not np.isfinite(x.astype(dtype, copy=False)).all():
            bad.append("/".join(str(getattr(k, "key", k)) for k in path))
    return bad


PIPELINE_CLASS = "Cosmos2_5_PredictBasePipeline"  # diffusers' Predict2.5 pipeline (transformer, vae, text encoder)
METADATA_MEMBER = "extra/metadata.json"  # in the .pt's zip archive, beside data.pkl
CARD = "README.md"
FILE_MODE = 0o644
# The base model's diffusers revision holds its VAE, text encoder (Cosmos-Reason1) and tokenizer as subfolders.
BASE_REPO, BASE_REVISION = "nvidia/Cosmos-Predict2.5-2B", "diffusers/base/post-trained"
LICENSE_NAME = "NVIDIA Open Model License"
LICENSE_URL = "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/"


def _hf_repo(source: str) -> str | None:
    """OWNER/NAME of an hf:// source, None for other paths."""
    if not source.startswith("hf://"):
        return None
    parts = source[len("hf://") :].split("/")
    return "/".join(parts[:2]).split("@")[0] if len(parts) >= 2 else None


def export_metadata(config, step: int, use_ema: bool) -> dict[str, str]:
    """What the exported student is (string values, as the safetensors header takes): teacher, method, steps,
    guidance, schedule, data, step, weights, license pointer, and the run's whole config as `recipe`."""
    d = config.distill
    conditioned = bool(d.get("guidance_conditioned", False))
    steps = int(d.num_student_steps)
    rf_times = sampling.shifted_rf_times(steps, float(d.timestep_shift))[:steps]  # the k times the student takes
    return {
        "teacher": str(config.teacher.path),
        "method": str(d.get("method", "dmd2")),
        "steps": str(steps),
        "guidance": str(float(d.guidance)),
        "guidance_conditioned": str(conditioned),
        "guidance_range": json.dumps([float(g) for g in d.get("guidance_range", ())]) if conditioned else "",
        "timestep_shift": str(float(d.timestep_shift)),
        "student_rf_times": json.dumps([round(float(t), 6) for t in rf_times]),
        "replace_gt_timesteps": str(bool(d.get("replace_gt_timesteps", True))),
        "scaling": str(config.teacher.scaling),
        "data": str(config.data.get("path", "")),
        "step": str(step),
        "weights": "ema" if use_ema else "raw",
        "license": f"{LICENSE_NAME} (the Cosmos teacher's): {LICENSE_URL}",
        "exporter": "trigflow-distill trigflow-export",
        "recipe": config.to_json(),
    }


def model_card(meta: dict[str, str], fmt: str, name: str) -> str:
    """The README.md beside an export: what it is, its license notice (a pointer) and how to sample it."""
    base = _hf_repo(meta["teacher"])
    guidance = (
        f"guidance-conditioned: pass the CFG scale in {meta['guidance_range']} (default {meta['guidance']})"
        if meta["guidance_conditioned"] == "True"
        else f"CFG scale {meta['guidance']} distilled in; sample without guidance"
    )
    front = ["---", "license: other", "license_name: nvidia-open-model-license", f"license_link: {LICENSE_URL}"]
    front += [f"base_model: {base}"] if base else []
    front += ["library_name: diffusers"] if fmt == "diffusers" else []
    front += ["pipeline_tag: image-to-video", "tags:", "- cosmos", "- video-generation", "- distillation", "---"]
    student = name if fmt == "diffusers" else f"{name} (native Cosmos .pt, net.-prefixed)"
    diffusers_part = (
        [
            "",
            "diffusers (a `Cosmos2_5_PredictBasePipeline` folder; give it the base model's VAE and text encoder):",
            "",
            "```python",
            "import torch",
            "from diffusers import AutoencoderKLWan, Cosmos2_5_PredictBasePipeline",
            "from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration",
            "",
            f'base = dict(pretrained_model_name_or_path="{BASE_REPO}", revision="{BASE_REVISION}")',
            "pipe = Cosmos2_5_PredictBasePipeline.from_pretrained(",
            f'    "{name}",',
            '    vae=AutoencoderKLWan.from_pretrained(**base, subfolder="vae"),',
            '    text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(**base, subfolder="text_encoder"),',
            '    tokenizer=AutoTokenizer.from_pretrained(**base, subfolder="tokenizer"),',
            "    torch_dtype=torch.bfloat16,",
            ")",
            f'video = pipe(prompt="...", num_inference_steps={meta["steps"]}, guidance_scale=1.0).frames[0]',
            "```",
            "",
            "The scheduler config is a first-order flow solver (UniPC, no corrector) on the student's times (within",
            "1e-3): diffusers steps with the noise the current state implies, the student re-noises with its initial",
            "noise, so the videos are close to, not the same as, trigflow-generate's (the reference).",
        ]
        if fmt == "diffusers"
        else []
    )
    lines = front + [
        f"# {name}: a {meta['steps']}-step distilled student",
        "",
        f"Distilled with trigflow-distill from {meta['teacher'] or 'its teacher'}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model (teacher) | {meta['teacher']} |",
        f"| method | {meta['method']} (TrigFlow parameterisation) |",
        f"| steps | {meta['steps']} network evaluations; RF times {meta['student_rf_times']} (shift "
        f"{meta['timestep_shift']}) |",
        f"| guidance | {guidance} |",
        f"| training data | {meta['data'] or '(not recorded)'} |",
        f"| weights | {meta['weights']} student of training step {meta['step']}, bfloat16 |",
        f"| file | {student} |",
        "",
        "The run's full config is the `recipe` entry of the file's metadata.",
        "",
        "## License",
        "",
        "These weights are derived from the teacher and carry its license. For NVIDIA Cosmos teachers",
        f"(Cosmos-Predict2.5) that is the {LICENSE_NAME}: {LICENSE_URL}. Read it before using or",
        "redistributing the weights.",
        "",
        "## How to sample",
        "",
        "trigflow-distill (CLI, or `from trigflow_distill.inference import Pipeline` in Python):",
        "",
        "```bash",
        f'trigflow-generate --student={name} --prompt "A robot arm stacks red cubes" --out=videos',
        "```",
        *diffusers_part,
        "",
    ]
    return "\n".join(lines)


def _set_safetensors_metadata(path: str, metadata: dict[str, str]) -> None:
    """Adds `metadata` to a safetensors file's `__metadata__` (the header is rewritten; tensor offsets are relative to
    the data, so the data is copied as is)."""
    with open(path, "rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(n))
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        with open(path + ".tmp", "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(path + ".tmp", path)


def _add_pt_metadata(path: str, metadata: dict[str, str]) -> None:
    """Appends `<archive>/extra/metadata.json` to a .pt's zip (stored, nothing else moves): torch.load reads only
    the records data.pkl names, so the file loads as before."""
    with zipfile.ZipFile(path, "a") as zf:
        root = next(n for n in zf.namelist() if n.endswith("/data.pkl")).split("/")[0]
        info = zipfile.ZipInfo(f"{root}/{METADATA_MEMBER}", date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, json.dumps(metadata, indent=2))


def _write_diffusers_pipeline(params, net_config, folder: str, metadata: dict[str, str]) -> None:
    """`transformer/` (+ metadata), `scheduler/scheduler_config.json` and `model_index.json` in a local folder."""
    transformer = os.path.join(folder, "transformer")
    convert.export_diffusers(params, net_config, transformer, overwrite=True)
    _set_safetensors_metadata(os.path.join(transformer, "diffusion_pytorch_model.safetensors"), metadata)
    with open(os.path.join(transformer, "config.json")) as f:
        version = json.load(f)["_diffusers_version"]
    steps = int(metadata["steps"])
    # First-order UniPC without corrector on flow sigmas shifted by the student's shift = Euler on the student's RF
    # times (within 1e-3: diffusers' grid ends at 1/1000): the stock scheduler nearest the student's sampler.
    scheduler = {
        "_class_name": "UniPCMultistepScheduler",
        "_diffusers_version": version,
        "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": float(metadata["timestep_shift"]),
        "solver_order": 1,
        "lower_order_final": True,
        "disable_corrector": list(range(steps)),
        "final_sigmas_type": "zero",
    }
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    # VAE, text encoder and tokenizer are the base model's, not copied: null entries, given to from_pretrained.
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": version,
        "_trigflow_components": {
            part: {"repo": BASE_REPO, "revision": BASE_REVISION, "subfolder": part}
            for part in ("vae", "text_encoder", "tokenizer")
        },
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "vae": [None, None],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "safety_checker": [None, None],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _chmod_files(path: str) -> None:
    """0644 on a file or every file under a folder (whatever the umask: others read what is published)."""
    for root, _, files in os.walk(path) if os.path.isdir(path) else [("", None, [path])]:
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)


def export_student(workdir: str, out: str, fmt: str = "torch", use_ema: bool = True, overwrite: bool = False) -> None:
    if fmt not in ("torch", "diffusers"):
        raise ValueError(f"--format={fmt!r}: use 'torch' or 'diffusers'.")
    step, config, net_config, student = restore.load_student_at(workdir, "ema" if use_ema else "raw")
    # The file holds a complete Cosmos DiT: the student's weights and the teacher's frozen text projection.
    params = {**student["net"], **({"crossattn_proj": student["text_proj"]} if student["text_proj"] else {})}
    bad = non_finite(params, EXPORT_DTYPE)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(
            f"the {'EMA' if use_ema else 'raw'} student of step {step} in {workdir} has non-finite values ({shown}) "
            "in the export's bfloat16; nothing was written. Retrain from an earlier checkpoint with lower learning "
            "rates, then export again."
        )
    dst = epath.Path(out)
    card = dst / CARD if fmt == "diffusers" else dst.parent / CARD
    for path in (dst, card) if fmt == "torch" else (dst / "model_index.json", dst / "transformer", card):
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it, or export into a folder of its own"
            )
    metadata = export_metadata(config, step, use_ema)
    name = dst.name
    # Written in a local folder, then moved (local) or copied (remote): an export is complete or absent.
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent if paths.is_local(dst) else None) as tmp:
        local = os.path.join(tmp, name)
        if fmt == "torch":
            convert.export_torch(params, net_config, local, overwrite=True)
            _add_pt_metadata(local, metadata)
        else:
            _write_diffusers_pipeline(params, net_config, local, metadata)
        card_local = os.path.join(local if fmt == "diffusers" else tmp, CARD)
        with open(card_local, "w") as f:
            f.write(model_card(metadata, fmt, name))
        _chmod_files(tmp)
        if paths.is_local(dst) and fmt == "torch":
            os.replace(local, dst)
            os.replace(card_local, card)
        elif paths.is_local(dst):  # only the entries written here are replaced; other files in the folder stay
            dst.mkdir(exist_ok=True)
            for entry in os.listdir(local):
                target = dst / entry
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(os.path.join(local, entry), target)
        else:
            _copy_tree(local, dst)
            if fmt == "torch":
                epath.Path(card_local).copy(card, overwrite=True)


def _copy_tree(local: str, dst: epath.Path) -> None:
    """A local file or folder copied to a remote path."""
    if not os.path.isdir(local):
        epath.Path(local).copy(dst, overwrite=True)
        return
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        target = dst if rel == "." else dst / rel
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            epath.Path(root, f).copy(target / f, overwrite=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="trigflow-export",
        description=__doc__,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="training workdir (its latest checkpoint is exported)")
    parser.add_argument("--out", required=True, help="output .pt file (torch) or folder (diffusers)")
    parser.add_argument("--format", default="torch", choices=("torch", "diffusers"))
    parser.add_argument("--raw", action="store_true", help="export the raw student instead of its EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        export_student(args.workdir, args.out, args.format, use_ema=not args.raw, overwrite=args.overwrite)
    except errors.CLI_ERRORS as e:
        return errors.fail(e)
    print(
        f"exported the {'raw' if args.raw else 'EMA'} student of {args.workdir} to {args.out} "
        f"({args.format}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


def run() -> None:
    """The console-script entry point: `main()` with the process exit code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
