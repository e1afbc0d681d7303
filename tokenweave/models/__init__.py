"""The models layer: where models come from (:mod:`.registry`) and the LM-head plumbing shared by code that applies
the head itself (:mod:`.heads`).

``from tokenweave.models import ...`` gives the public names of both.
"""

from .heads import (
    LOGIT_TRANSFORM_ATTRIBUTES,
    HeadFn,
    causal_lm,
    check_direct_head_calls,
    check_lm_heads,
    final_hidden_states,
    head_calls_are_collective,
    lm_head_functions,
)
from .registry import (
    BUILTIN_MODELS,
    CHATML_TEMPLATE,
    SMOLLM2_135M,
    SMOLLM2_GGUF_FILE,
    TINY_LLAMA,
    build_tiny_llama,
    build_tiny_tokenizer,
    cache_dir,
    public_model_id,
    resolve_model,
    smollm2_gguf_path,
)

__all__ = [
    "BUILTIN_MODELS",
    "CHATML_TEMPLATE",
    "LOGIT_TRANSFORM_ATTRIBUTES",
    "SMOLLM2_135M",
    "SMOLLM2_GGUF_FILE",
    "TINY_LLAMA",
    "HeadFn",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "cache_dir",
    "causal_lm",
    "check_direct_head_calls",
    "check_lm_heads",
    "final_hidden_states",
    "head_calls_are_collective",
    "lm_head_functions",
    "public_model_id",
    "resolve_model",
    "smollm2_gguf_path",
]
