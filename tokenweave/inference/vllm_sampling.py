"""Sampling with vLLM's offline engine (``sampler: vllm`` of the critical-token pipeline, ``tokenweave sample``).

Each chat prompt is tokenised as on the ``transformers`` path (:func:`.generation.chat_prompt_ids`) and sent as token
ids; it is sampled ``num_samples`` times (``SamplingParams.n``) with a seed of its own (:func:`.shards.batch_seed` of
the run's seed and the prompt's index), so its samples do not depend on how the engine batches the requests. Top-p 1
and no top-k, as on the ``transformers`` path; the texts come back the same way (special tokens skipped, stripped).
The engine takes ``tensor_parallel_size`` GPUs of this process; vLLM is not a dependency (``pip install vllm``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from .generation import chat_prompt_ids
from .shards import batch_seed


def vllm_is_installed() -> bool:
    """Whether ``import vllm`` would find it, without importing it (a module already imported counts)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    """The ``vllm`` module, or an ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError("sampler 'vllm' needs vLLM, which is not installed: pip install vllm (on a GPU machine)."
                          ) from error


def vllm_completions(
    model_path: str,
    prompts: list[list[dict[str, str]]],
    *,
    num_samples: int,
    temperature: float | None,
    max_new_tokens: int,
    seed: int = 0,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
) -> list[list[str]]:
    """``num_samples`` completions of each chat prompt (greedy when ``temperature`` is None), one list per prompt, in
    the input order (module docstring)."""
    vllm = import_vllm()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = vllm.LLM(
        model=model_path,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    requests = [{"prompt_token_ids": ids} for ids in chat_prompt_ids(tokenizer, prompts)]
    parameters = [
        vllm.SamplingParams(
            n=num_samples,
            temperature=0.0 if temperature is None else temperature,
            top_p=1.0,
            max_tokens=max_new_tokens,
            seed=batch_seed(seed, index),
            skip_special_tokens=True,
        )
        for index in range(len(requests))
    ]
    outputs = engine.generate(requests, parameters, use_tqdm=True)
    return [[choice.text.strip() for choice in output.outputs] for output in outputs]
