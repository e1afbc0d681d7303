"""Per-token dataset columns aligned to the tokens TRL 1.16's trainers see, for SFT and DPO alike.

A per-token column (critical-token scores, cDPO weights, a user's weights) holds one value per *completion token* as
the trainer tokenises it, not per raw position of ``question + response`` (methods.md, cDPO ambiguity 3):

- DPO: one value per token of ``chosen_ids`` / ``rejected_ids`` (the tokens of ``prompt + completion`` after the
  tokenised prompt, template tokens and EOS included), in a chosen and a rejected column;
- SFT: one value per token TRL labels (``labels != -100``: the completion tokens of a prompt-completion example, the
  assistant tokens with ``assistant_only_loss``, every token of a language-modelling example), before truncation.

Contents, top to bottom:

* :func:`tokenize_like_dpo`: TRL's tokenisation of a conversational example (prompt and completion ids).
* :func:`token_texts`: the text each token adds to the decoded sequence (for the heatmap).
* :func:`content_tokens`: which of a completion's tokens carry its message text (not the template, not EOS), and
  which token holds a given character of that text.
* :func:`completion_token_counts` and :func:`check_token_columns`: the completion tokens of an example, and a
  ``dataset.map`` check that every per-token column has one value per token of them.
* :func:`labelled_positions`: an SFT column's values at its example's labelled positions.
* :func:`token_char_spans`, :func:`message_texts` and :func:`rule_weights`: span rules, a regular expression on
  the assistant's text → a weight for the completion tokens that carry a match.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
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


def completion_token_counts(example: Mapping[str, Any], kind: str) -> list[int]:
    """The number of completion tokens of a tokenised example, one per completion (module docstring): SFT, its
    labelled tokens; DPO, its chosen and rejected tokens."""
    if kind == "dpo":
        return [len(example["chosen_ids"]), len(example["rejected_ids"])]
    return [sum(label != -100 for label in example["labels"])]


def check_token_columns(example: dict[str, Any], index: int, *, columns: Mapping[str, Sequence[str]], kind: str,
                        dataset_name: str) -> dict:
    """``dataset.map`` check: each of ``columns`` (batch key → dataset column names, one per completion) has one
    number per completion token of the tokenised ``example`` (:func:`completion_token_counts`). A ``ValueError``
    names the row, the column, the counts and what the values must align with."""
    counts = completion_token_counts(example, kind)
    sides = ("chosen", "rejected") if kind == "dpo" else ("",)
    for names in columns.values():
        for name, count, side in zip(names, counts, sides, strict=True):
            value = example.get(name)
            if value is None or len(value) != count:
                found = "no value" if value is None else f"{len(value)} values"
                if kind == "dpo":
                    has = (f"its {side} completion has {count} tokens ({side}_ids). Per-token values must align "
                           "with the completion tokens as DPOTrainer tokenises them (after the prompt, template "
                           "tokens and EOS included)")
                else:
                    has = (f"it has {count} labelled tokens. Per-token values must align with the tokens "
                           "SFTTrainer labels (labels != -100), before truncation")
                raise ValueError(f"row {index} of the tokenised {dataset_name} dataset has {found} in column "
                                 f"{name!r}, but {has}. Prompt: {str(example.get('prompt'))[:80]!r}")
    return {}


def labelled_positions(values: Sequence[float], labels: Sequence[int]) -> list[float]:
    """An SFT column's values (one per labelled token) at their positions of the sequence: ``labels``' length, 0
    where the label is -100."""
    remaining = iter(values)
    return [next(remaining) if label != -100 else 0.0 for label in labels]


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the decoded sequence ``ids`` and each token's ``[start, end)`` characters in it.

    From the fast tokenizer's offsets of the decoded text when it tokenises back to ``ids`` (the usual case: a chat
    template's text); otherwise from :func:`token_texts`, exact but quadratic in the length."""
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(ids):
            return text, [tuple(span) for span in encoded["offset_mapping"]]
    pieces = token_texts(tokenizer, ids)
    ends = list(itertools.accumulate(len(piece) for piece in pieces))
    return "".join(pieces), list(zip([0, *ends[:-1]], ends, strict=True))


def message_texts(completion: Any) -> list[str]:
    """The assistant's texts of a completion: the contents of its assistant messages (conversational), or the
    string itself."""
    if isinstance(completion, str):
        return [completion]
    return [message["content"] for message in completion if message.get("role") == "assistant"
            and isinstance(message.get("content"), str)]


@dataclass(frozen=True)
class RuleMatches:
    """What :func:`rule_weights` found: a weight per token, and the tokens of each match (to check truncation)."""

    weights: list[float]
    matches: list[tuple[str, int, int]]
    """``(pattern, first token, last token + 1)`` of each match."""


def rule_weights(text: str, spans: Sequence[tuple[int, int]], contents: Sequence[str], rules: Mapping[str, float],
                 first_content_char: int = 0) -> RuleMatches:
    """Span rules (ms-swift's ``loss_scale`` idea): each token of ``spans`` (its characters in ``text``) gets the
    weight of the first rule (a regular expression → a weight, in order) with a match in the assistant's ``contents``
    that overlaps the token's characters; 1 for a token that no match overlaps. The contents are found in ``text`` in
    order, from ``first_content_char`` (after the prompt); a content missing from the text is a ``ValueError``."""
    weights: list[float | None] = [None] * len(spans)
    matches = []
    position = first_content_char
    for content in contents:
        start = text.find(content, position)
        if start < 0:
            raise ValueError(f"weight rules: the assistant's text {content[:60]!r} is not in the tokenised sequence.")
        position = start + len(content)
        for pattern, weight in rules.items():
            for match in re.finditer(pattern, content):
                low, high = start + match.start(), start + match.end()
                tokens = [i for i, (begin, end) in enumerate(spans) if begin < high and end > low]
                if tokens:
                    matches.append((pattern, tokens[0], tokens[-1] + 1))
                for i in tokens:
                    if weights[i] is None:
                        weights[i] = float(weight)
    return RuleMatches([1.0 if weight is None else weight for weight in weights], matches)
