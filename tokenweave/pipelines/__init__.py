"""Multi-step recipes (the critical-token pipeline, the quickstart): resumable steps that call training and inference
with dataclasses."""
