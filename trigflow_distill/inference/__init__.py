"""Sampling a distilled student (or the teacher): loading a model, conditioning inputs, `generate`, `export`.

`Pipeline` is the Python API for sampling (`Pipeline.load(student=...).generate(prompts)`); `trigflow-generate` is
built on it."""

from trigflow_distill.inference.pipeline import Pipeline

__all__ = ["Pipeline"]
