"""Test set-up: offline hub, no telemetry, and shared helpers for runs of the tiny model."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
LAUNCH = REPO_ROOT / "launch"
PYTHON = sys.executable
