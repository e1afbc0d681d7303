"""Inference: model loading for generation, batched sampling, scoring and evaluation (no training)."""
