"""Critical-token scoring with models: the positive and negative models of cDPO read a dataset's completions.

"Critical Tokens Matter" (Lin et al., ICML 2025, arXiv 2411.19943). The score math (``s_t``, the probability
of token ``y_t`` under the contrastive distribution ``softmax((1 + b)·z_pos − b·z_neg)``) is
:mod:`tokenweave.tokens.critical`; the completion tokens are DPOTrainer's
(:func:`tokenweave.data.token_columns.tokenize_like_dpo`). This module loads the models and runs them.

Contents, top to bottom:

* :class:`ScoringModel`, :func:`load_contrastive_models`: a positive or negative model (a causal LM or one
  named adapter of a PEFT model); two LoRA adapters of one base share that base, loaded once.
* :func:`score_sequences`: scores of the completion tokens of a batch of token sequences.
* :func:`score_dataset`: a conversational dataset in, one score list (and one token-text list) per
  completion out, with a progress bar; split over processes by a :class:`~.shards.Shard`.
* :func:`score_with_models`: the same from the two models' directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.token_columns import token_texts, tokenize_like_dpo
from ..models import adapter_base_model, causal_lm, check_direct_head_calls, resolve_model
from .loading import load_model_and_tokenizer
from .shards import Shard
from ..tokens.critical import chunked_contrastive_scores


@dataclass(frozen=True)
class ScoringModel:
    """One side of the contrast: a causal LM, or one named adapter of a PEFT model.

    Two ``ScoringModel`` objects may share one ``PeftModel`` with two adapters (``adapter`` names the one
    to activate); every call activates it first.
    """

    model: nn.Module
    adapter: str | None = None

    def __post_init__(self):
        if self.adapter is not None and not isinstance(self.model, PeftModel):
            raise ValueError(f"adapter {self.adapter!r} given for a model that is not a PeftModel.")
        check_direct_head_calls(self._causal_lm(), "Critical-token scoring")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _causal_lm(self) -> nn.Module:
        """The transformers causal LM (:func:`tokenweave.models.causal_lm`), with this side's adapter active."""
        if self.adapter is not None:
            self.model.set_adapter(self.adapter, inference_mode=True)
        return causal_lm(self.model)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The backbone's final hidden states ``[B, L, H]`` (after the final norm: what the LM head reads)."""
        backbone = self._causal_lm().base_model
        return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """LM-head logits ``[..., V]`` of hidden states ``[..., H]``, in the model's dtype."""
        return self._causal_lm().get_output_embeddings()(hidden)


def load_contrastive_models(
    positive: str, negative: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[ScoringModel, ScoringModel, object]:
    """Load the positive and negative models for scoring; returns ``(positive, negative, tokenizer)``.

    Each is anything :func:`.loading.load_model_and_tokenizer` loads: a model directory, a built-in name, or a
    LoRA adapter directory. Two adapters of the same base model (cDPO's set-up) share one base,
    loaded once, as adapters ``"positive"`` and ``"negative"`` of one ``PeftModel``, and the tokenizer is
    that base model's (the one a DPO run of the base model tokenises with); otherwise it is the positive
    model's. The models are put on ``device``.
    """
    positive_base, negative_base = _adapter_base(positive), _adapter_base(negative)
    if positive_base is not None and positive_base == negative_base:
        base, tokenizer = load_model_and_tokenizer(positive_base, dtype=dtype)
        model = PeftModel.from_pretrained(base, positive, adapter_name="positive")
        model.load_adapter(negative, adapter_name="negative")
        model.to(device).eval()
        return ScoringModel(model, "positive"), ScoringModel(model, "negative"), tokenizer
    positive_model, tokenizer = load_model_and_tokenizer(positive, dtype=dtype)
    negative_model, _ = load_model_and_tokenizer(negative, dtype=dtype)
    return ScoringModel(positive_model.to(device)), ScoringModel(negative_model.to(device)), tokenizer


def _adapter_base(path: str) -> str | None:
    """The resolved base model of a PEFT adapter directory, or None when ``path`` is not one."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.exists():
        return None
    return resolve_model(adapter_base_model(adapter_config.parent))


@torch.no_grad()
def score_sequences(
    positive: ScoringModel,
    negative: ScoringModel,
    sequences: Sequence[Sequence[int]],
    completion_starts: Sequence[int],
    *,
    pad_token_id: int,
    b: float = 1.0,
    chunk_size: int = 256,
) -> list[list[float]]:
    """Scores ``s_t`` of the completion tokens of a batch of token sequences (one forward per model).

    ``sequences[i][completion_starts[i]:]`` are the completion tokens of sequence ``i``; its scores come
    back as a list of the same length, in order. Token ``j`` is scored from the hidden state at position
    ``j − 1``, so a completion must not start at position 0.
    """
    if any(start < 1 for start in completion_starts):
        raise ValueError("A completion must start after at least one token: its first token needs a context.")
    device = positive.device
    lengths = torch.tensor([len(sequence) for sequence in sequences], device=device)
    starts = torch.tensor(list(completion_starts), device=device)
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(list(sequence), device=device)
    attention_mask = (torch.arange(width, device=device) < lengths[:, None]).long()
    # Entry t of the shifted tensors is about token t + 1, predicted from position t.
    predicted = torch.arange(1, width, device=device)
    mask = (predicted >= starts[:, None]) & (predicted < lengths[:, None])
    scores = chunked_contrastive_scores(
        positive.hidden_states(input_ids, attention_mask)[:, :-1],
        negative.hidden_states(input_ids, attention_mask)[:, :-1],
        positive.logits,
        negative.logits,
        input_ids[:, 1:],
        mask,
        b=b,
        chunk_size=chunk_size,
    )
    return [row_scores[row_mask].tolist() for row_scores, row_mask in zip(scores, mask, strict=True)]


def score_dataset(
    dataset: Dataset,
    positive: ScoringModel,
    negative: ScoringModel,
    tokenizer,
    *,
    completion_columns: Sequence[str] = ("chosen", "rejected"),
    b: float = 1.0,
    batch_size: int = 8,
    chunk_size: int = 256,
    shard: Shard = Shard(),
) -> Dataset:
    """Score every completion token of a conversational dataset; returns it with two columns per completion.

    ``dataset`` has a ``prompt`` column and the ``completion_columns`` (message lists): preference pairs
    (``chosen``, ``rejected``) or prompt/completion rows (``completion_columns=("completion",)``). Each is
    tokenised by :func:`tokenize_like_dpo` (for pairs: exactly as DPOTrainer does), and gains:

    * ``{column}_scores``: one score ``s_t`` per completion token (module docstring), in token order;
    * ``{column}_tokens``: the text of each of those tokens (:func:`token_texts`), for the heatmap.

    Sequences are batched by length, ``batch_size`` at a time, with a progress bar. With a ``shard`` of several
    processes, each scores its batches and every process returns the whole dataset (:mod:`.shards`).
    """
    items = []  # (row, column, token ids, completion start)
    for row, example in enumerate(dataset):
        tokenized = tokenize_like_dpo(example, tokenizer, completion_columns)
        prompt_ids = tokenized["prompt_ids"]
        for column in completion_columns:
            items.append((row, column, prompt_ids + tokenized[f"{column}_ids"], len(prompt_ids)))
    items.sort(key=lambda item: len(item[2]))
    batches = [items[begin : begin + batch_size] for begin in range(0, len(items), batch_size)]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scored = []  # (row, column, scores, token texts) of this process's batches
    mine = shard.batches(len(batches))
    with tqdm(total=sum(len(batches[b]) for b in mine), desc="scoring critical tokens", unit="sequence",
              disable=not shard.is_main) as progress:
        for batch_index in mine:
            batch = batches[batch_index]
            batch_scores = score_sequences(
                positive,
                negative,
                [ids for _, _, ids, _ in batch],
                [start for _, _, _, start in batch],
                pad_token_id=pad_token_id,
                b=b,
                chunk_size=chunk_size,
            )
            for (row, column, ids, start), row_scores in zip(batch, batch_scores, strict=True):
                scored.append((row, column, row_scores, token_texts(tokenizer, ids[start:])))
            progress.update(len(batch))
    scores = {column: [None] * len(dataset) for column in completion_columns}
    texts = {column: [None] * len(dataset) for column in completion_columns}
    for row, column, row_scores, row_texts in shard.gather(scored):
        scores[column][row] = row_scores
        texts[column][row] = row_texts
    for column in completion_columns:
        dataset = dataset.add_column(f"{column}_scores", scores[column])
        dataset = dataset.add_column(f"{column}_tokens", texts[column])
    return dataset


def score_with_models(
    dataset: Dataset,
    positive: str,
    negative: str,
    *,
    b: float = 1.0,
    batch_size: int = 8,
    chunk_size: int = 256,
    dtype: str = "float32",
    shard: Shard = Shard(),
) -> Dataset:
    """:func:`score_dataset` of preference pairs with the positive and negative models at the paths ``positive`` and
    ``negative`` (:func:`load_contrastive_models`, in ``dtype``, on the shard's device)."""
    positive_model, negative_model, tokenizer = load_contrastive_models(
        positive, negative, getattr(torch, dtype), shard.torch_device
    )
    return score_dataset(
        dataset, positive_model, negative_model, tokenizer, b=b, batch_size=batch_size, chunk_size=chunk_size,
        shard=shard,
    )
