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
    BUILTIN_BASE_FILE,
    BUILTIN_MODELS,
    CHATML_TEMPLATE,
    SMOLLM2_135M,
    SMOLLM2_GGUF_FILE,
    SMOLLM2_PUBLIC_ID,
    TINY_LLAMA,
    adapter_base_model,
    alias_in_hub_cache,
    build_tiny_llama,
    build_tiny_tokenizer,
    builtin_model_name,
    cache_dir,
    is_hub_id,
    make_peft_model_portable,
    portable_base_model,
    public_model_id,
    register_in_hub_cache,
    resolve_model,
    smollm2_gguf_path,
)

__all__ = [
    "BUILTIN_BASE_FILE",
    "BUILTIN_MODELS",
    "CHATML_TEMPLATE",
    "LOGIT_TRANSFORM_ATTRIBUTES",
    "SMOLLM2_135M",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PUBLIC_ID",
    "TINY_LLAMA",
    "HeadFn",
    "adapter_base_model",
    "alias_in_hub_cache",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "builtin_model_name",
    "cache_dir",
    "causal_lm",
    "check_direct_head_calls",
    "check_lm_heads",
    "final_hidden_states",
    "head_calls_are_collective",
    "is_hub_id",
    "lm_head_functions",
    "make_peft_model_portable",
    "portable_base_model",
    "public_model_id",
    "register_in_hub_cache",
    "resolve_model",
    "smollm2_gguf_path",
]
