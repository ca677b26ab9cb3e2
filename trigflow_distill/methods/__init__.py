"""Distillation methods (docs/algorithm.md §4-6, §14), the Video2World conditioning and the shared train state."""
