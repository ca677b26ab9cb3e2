"""The toy video world and everything built on it (tools layer: the trainer never imports this package).

world     the data: one moving Gaussian blob per clip, prompt = direction (its API is re-exported here)
metrics   analytic evaluator of generated clips (prompt / motion accuracy, Frechet distances, ...)
pretrain  trains the tiny toy teacher shipped as assets/toy_teacher.pt
evaluate  teacher and student samplers side by side on a finished run
"""

from trigflow_distill.toy.world import (
    REFERENCE_SEED,
    STREAM_PROJECTION,
    RecordSource,
    World,
    WorldConfig,
    check_latents,
    colour_projection,
    grid_image,
    make_world,
    reference_set,
    render_blobs,
    sample_videos,
    save_gif,
    save_grid_png,
    to_rgb,
)

__all__ = [
    "REFERENCE_SEED",
    "STREAM_PROJECTION",
    "RecordSource",
    "World",
    "WorldConfig",
    "check_latents",
    "colour_projection",
    "grid_image",
    "make_world",
    "reference_set",
    "render_blobs",
    "sample_videos",
    "save_gif",
    "save_grid_png",
    "to_rgb",
]
