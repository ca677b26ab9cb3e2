"""Sampling a distilled student (or the teacher): loading a model, conditioning inputs, `generate`, `export`."""
