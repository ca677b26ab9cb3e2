"""`prepare`: videos + captions -> a latent dataset (clips, encoders, the sharded job; docs/algorithm.md §9-12).

`prepare_videos([(path, caption), ...], out, vae=..., text_encoder=..., teacher=..., **options)` is the job from
Python; `python -m trigflow_distill.prepare` (`trigflow-prepare`) the same job from the command line."""

from trigflow_distill.prepare.job import prepare_videos

__all__ = ["prepare_videos"]
