"""Model loading for inference (evaluation, sampling, scoring): a built-in name, a model directory, a hub id, or a
LoRA adapter directory on its base model, with a tokenizer that pads on the left."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import adapter_base_model, resolve_model


def load_model_and_tokenizer(name_or_path: str, adapter: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer for inference (evaluation, sampling, scoring).

    ``name_or_path`` goes through :func:`resolve_model`. A directory holding a PEFT adapter
    (``adapter_config.json``) is loaded on top of its base model; ``adapter`` adds one explicitly. The adapter is
    merged into the weights (inference needs no separate LoRA matmuls: generation steps are faster). The tokenizer
    pads on the left, as batched generation needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter is None and adapter_config.exists():
        adapter = path
        path = resolve_model(adapter_base_model(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def save_merged_model(adapter: str, output_dir: str) -> None:
    """Merge the LoRA adapter directory ``adapter`` into its base model and save the result, with the base model's
    tokenizer as it is on disk (its own padding side), to ``output_dir``: a plain model directory."""
    from transformers import AutoTokenizer

    model, _ = load_model_and_tokenizer(adapter)  # merged
    base = resolve_model(adapter_base_model(adapter))
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer_config.json").exists() else base).save_pretrained(
        output_dir
    )
