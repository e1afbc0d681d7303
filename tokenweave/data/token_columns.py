"""Per-token dataset columns aligned to the completion tokens TRL 1.16's DPOTrainer sees.

A per-token column (critical-token scores, cDPO weights) holds one value per token of the completion *as
DPOTrainer tokenises it* (its ``chosen_ids``/``rejected_ids``: the tokens of ``prompt + completion`` after the
tokenised prompt, template tokens and EOS included), not per raw position of ``question + response``
(methods.md, cDPO ambiguity 3).

Contents, top to bottom:

* :func:`tokenize_like_dpo`: TRL's tokenisation of a conversational example (prompt and completion ids).
* :func:`token_texts`: the text each token adds to the decoded sequence (for the heatmap).
* :func:`content_tokens`: which of a completion's tokens carry its message text (not the template, not EOS), and
  which token holds a given character of that text.
* :func:`completion_token_weights`: a ``dataset.map`` function that checks cDPO's per-token weights (or
  scores, turned into weights) against the tokenised completions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trl.data_utils import _tokenize, common_prefix_length, is_conversational


def tokenize_like_dpo(example: dict, tokenizer, completion_columns: Sequence[str] = ("chosen", "rejected")) -> dict:
    """Tokenise a conversational example exactly as TRL 1.16's ``DPOTrainer._prepare_dataset`` does.

    ``prompt + completion`` and the prompt alone (with the generation prompt) go through the chat template;
    the completion starts where the two token lists first differ, the *shortest* such common prefix over
    all ``completion_columns`` (TRL: over chosen and rejected). Returns ``prompt_ids`` and one
    ``{column}_ids`` list per completion column: with ``("chosen", "rejected")``, TRL's own ``prompt_ids``,
    ``chosen_ids`` and ``rejected_ids``. The ``tools`` and ``chat_template_kwargs`` columns are honoured as
    TRL honours them.
    """
    if not is_conversational(example):
        raise ValueError(
            "Critical-token scoring needs conversational examples (lists of role/content messages), got "
            f"{str(example.get('prompt'))[:80]!r}."
        )
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    template_kwargs = {"tools": tools, **example.get("chat_template_kwargs", {})}
    prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True, **template_kwargs)["input_ids"]
    full_ids = {
        column: _tokenize(tokenizer, example["prompt"] + example[column], **template_kwargs)["input_ids"]
        for column in completion_columns
    }
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in full_ids.values())
    return {
        "prompt_ids": prompt_ids[:prompt_length],
        **{f"{column}_ids": ids[prompt_length:] for column, ids in full_ids.items()},
    }


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence (special tokens kept).

    Decoded incrementally: token ``i`` gets ``decode(ids[:i+1])`` minus ``decode(ids[:i])``, so the texts
    concatenate to ``decode(ids)`` and a byte-level token that only completes a multi-byte character carries
    that character (the tokens before it get ``""``) instead of a replacement character. Should a decoded
    prefix not be a prefix of the next one (some SentencePiece clean-ups), that token is decoded alone.
    """
    texts, decoded = [], ""
    for end in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
        if end < len(ids) and current.endswith("\ufffd"):  # an incomplete character: wait for its next bytes
            texts.append("")
            continue
        if current.startswith(decoded):
            texts.append(current[len(decoded) :])
        else:
            texts.append(tokenizer.decode(ids[end - 1 : end], clean_up_tokenization_spaces=False))
        decoded = current
    return texts



@dataclass(frozen=True)
class ContentTokens:
    """Where a completion's message text lies in its tokens (:func:`content_tokens`).

    ``start`` is the text's character offset in the concatenated token texts; tokens ``first .. end - 1`` overlap
    it (the candidates a token signal ranks: not the template tokens around the text, not EOS).
    """

    start: int
    first: int
    end: int
    token_ends: tuple[int, ...]  # the character offset where each token's text ends

    def token_at(self, offset: int) -> int:
        """The token holding character ``offset`` of the message text."""
        position = self.start + offset
        return next(index for index, end in enumerate(self.token_ends) if end > position)


def content_tokens(tokens: Sequence[str], content: str) -> ContentTokens | None:
    """The tokens (texts, as :func:`token_texts` gives them) that carry the message text ``content``; None when
    ``content`` is empty or not found in their concatenation."""
    joined = "".join(tokens)
    start = joined.find(content) if content else -1
    if start < 0:
        return None
    ends = tuple(itertools.accumulate(len(token) for token in tokens))
    first = next(index for index, end in enumerate(ends) if end > start)
    end = next(index for index, token_end in enumerate(ends) if token_end >= start + len(content)) + 1
    return ContentTokens(start, first, end, ends)


# (chosen_values, rejected_values, chosen_ids, rejected_ids) -> (chosen_weights, rejected_weights), lists.
ScoresToWeights = Callable[[list, list, list, list], tuple[list[float], list[float]]]


def completion_token_weights(
    example: dict[str, Any],
    index: int,
    weights_columns: tuple[str, str],
    scores_columns: tuple[str, str],
    scores_to_weights: ScoresToWeights,
    dataset_name: str,
) -> dict[str, list[float]]:
    """cDPO weights of one tokenised example, checked against its completion tokens (``dataset.map`` function).

    Reads the weights columns, or else the scores columns turned into weights by ``scores_to_weights``
    (called with the chosen and rejected scores and ``chosen_ids``/``rejected_ids``; the DPO trainer passes
    cDPO's ``critical_token_weights``); returns them under the weights column names. Raises ``ValueError``
    naming the row and column when a column is missing, a value is None, or its length is not the number
    of tokens in ``chosen_ids``/``rejected_ids``.
    """
    if all(column in example for column in weights_columns):
        columns = weights_columns
    elif all(column in example for column in scores_columns):
        columns = scores_columns
    else:
        raise ValueError(
            f"loss_type 'cdpo': the {dataset_name} dataset has no per-token weights: it needs columns "
            f"{list(weights_columns)} (weights) or {list(scores_columns)} (critical-token scores), with one value "
            "per completion token."
        )
    values = []
    for side, column in zip(("chosen", "rejected"), columns, strict=True):
        num_tokens = len(example[f"{side}_ids"])
        value = example[column]
        if value is None or len(value) != num_tokens:
            found = "no value" if value is None else f"{len(value)} values"
            raise ValueError(
                f"loss_type 'cdpo': row {index} of the tokenised {dataset_name} dataset has {found} in column "
                f"{column!r}, but its {side} completion has {num_tokens} tokens ({side}_ids). Per-token values "
                "must align with the completion tokens as DPOTrainer tokenises them (after the prompt, template "
                f"tokens and EOS included). Prompt: {str(example.get('prompt'))[:80]!r}"
            )
        values.append([float(v) for v in value])
    if columns == scores_columns:
        values = scores_to_weights(*values, example["chosen_ids"], example["rejected_ids"])
    return dict(zip(weights_columns, values, strict=True))
