"""config.data.kind -> what the trainer gets for it: the record source, an optional sample writer and an optional
evaluation of the finished run. main.py picks from here, so the trainer never imports a particular data set.
"""

import os
from typing import Callable, NamedTuple

from trigflow_distill import data, toy
from trigflow_distill.toy import evaluate as toy_evaluate
from trigflow_distill.training import video_samples


class DataKind(NamedTuple):
    # config -> (random-access record source, write_samples or None); write_samples(samples_bcthw, batch, path,
    # writer) is a train.SampleWriter
    open: Callable
    evaluate: Callable | None  # workdir -> evaluation of the finished run (writes into workdir)


def _toy(config):
    world = toy_evaluate.world_from_config(config)

    def write_samples(x_bcthw, batch, path, writer=None):
        toy.save_grid_png(world, x_bcthw, batch["prompt"], path, per_prompt=2)
        if writer is not None:  # the same grid to TensorBoard / W&B; the file is named after the step
            step = int(os.path.splitext(os.path.basename(path))[0])
            writer.write_images(step, {"samples": toy.grid_image(world, x_bcthw, batch["prompt"], per_prompt=2)})

    return toy.RecordSource(world, seed=config.data.seed), write_samples


def _synthetic(config):
    return data.make_synthetic_source(
        4096,
        tuple(config.data.latent_shape),
        tuple(config.data.text_shape),
        seed=config.data.seed,
        num_cond_probs=tuple(config.distill.cond_frame_probs),
    ), None


def _dir(config):
    # Decoded sample videos need the VAE (config.vae.path); without it no samples are written.
    writer = video_samples.VideoSamples(config.vae.path) if config.vae.path else None
    return data.NpyDirSource(config.data.path), writer


KINDS = {
    "dir": DataKind(_dir, None),
    "synthetic": DataKind(_synthetic, None),
    "toy": DataKind(_toy, toy_evaluate.evaluate_run),
}


def get(config) -> DataKind:
    """The DataKind of config.data.kind, or a ValueError naming the choices."""
    kind = KINDS.get(config.data.kind)
    if kind is None:
        raise ValueError(f"config.data.kind={config.data.kind!r}: use one of {sorted(KINDS)}.")
    return kind
