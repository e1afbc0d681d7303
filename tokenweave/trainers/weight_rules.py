"""The ``weight_rules`` token signal: span rules, a regular expression on the assistant's text → a weight for the
completion tokens that carry a match (ms-swift's ``loss_scale`` idea), in SFT and DPO.

``weight_rules`` maps each pattern to its weight, in order: a completion token gets the weight of the first rule with a
match (Python ``re``, on each assistant message's text) that overlaps the token's characters, and 1 when no match
does; tokens outside the assistant's text (template tokens, EOS) keep 1. The weights are computed once, when the
dataset is prepared (:func:`~tokenweave.data.token_columns.rule_weights` on the tokens' characters,
:func:`~tokenweave.data.token_columns.token_char_spans`), into the columns ``rule_weights`` (SFT) or
``chosen_rule_weights`` / ``rejected_rule_weights`` (DPO), and then go through the per-token column code every
trainer shares, like a weight column's (``weights``). A match that truncation to ``max_length`` would cut in two is
refused, naming the row and the pattern: its weight would land on part of the span only. Metrics: ``weights/*``.

Rule sets (``weight_rule_set``), named rules that a regular expression cannot say, computed in the same place into the
same column (so everything after the dataset's preparation is unchanged). A rule set turns the signal on (it need not
be listed in ``token_signals``):

- ``tl_key_tokens``, SFT only: TL-Training's key-token weighting of tool calls (EMNLP Findings 2025, arXiv 2412.15495),
  as its released code computes it (:mod:`tokenweave.data.key_tokens`): the answer's first token, and the token where
  the called tool's name diverges from each other tool name that shares a prefix with it, each weigh
  ``min(N_other / N_key, key_token_max_weight)`` (default 9) when ``N_key < N_other``, else 1; every other label token
  weighs 1. The paper re-weights the parameter tokens too; the code does not (they weigh 1), and neither does this.
  ``N_key`` and ``N_other`` count the label tokens that truncation to ``max_length`` keeps. Data contract, checked
  when the dataset is loaded (a ``ValueError`` names the row): prompt-completion rows whose completion's (first)
  assistant text starts with the call ``name(``, ``name`` one of the row's ``tools`` (TRL's column, which the chat
  template renders: a list, or its JSON string, of JSON schemas ``{"type": "function", "function": {"name": ...}}`` or
  ``{"name": ...}``); the other tools of that list are the names the call's name is compared with. Calls given as
  structured ``tool_calls`` messages are not read.

  Normalisation: TL-Training's loss is a weighted mean per sequence, ``Σ w·ℓ / Σ w``. tokenweave's SFT loss divides
  ``Σ w·ℓ`` by TRL's ``num_items_in_batch`` by default (the label tokens of the optimizer step), so the key tokens'
  weight also scales the step; ``token_weight_normalizer: micro_batch`` takes the weighted mean of each micro-batch,
  which is TL-Training's loss at per-device batch 1, gradient accumulation 1, one process (its code only runs with
  batch 1).

``weight_rules`` and a rule set combine: a token's weight is its rule's weight (1 without a match) times its rule-set
weight (1 for a token that is not a key token), e.g. a regular expression on the parameters with ``tl_key_tokens`` for
the paper's parameter weighting. ``N_other`` counts tokens, not weights, whatever the regular expressions give.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

from ..checks import AT_LEAST_ONE, ConfigError
from ..data.key_tokens import key_characters, key_token_weights, tool_names
from ..data.token_columns import message_texts, rule_weights, token_char_spans
from .signals import TokenBatch, TokenSignal, register_token_signal


@dataclass
class WeightRulesConfig:
    """The ``weight_rules`` signal's fields of ``TokenSFTConfig`` and ``TokenDPOConfig`` (a mixin)."""

    option_ranges: ClassVar[dict] = {"key_token_max_weight": AT_LEAST_ONE}  # tokenweave.checks reads them

    weight_rules: dict | str | None = field(
        default=None,
        metadata={"help": "weight_rules signal: {regular expression: weight}, in order (a mapping in YAML, JSON on "
                  "the command line). A completion token gets the weight of the first rule with a match in the "
                  "assistant's text that overlaps it, else 1."},
    )
    weight_rule_set: str | None = field(
        default=None,
        metadata={"help": "weight_rules signal (which it turns on): a named rule set, alone or with weight_rules (the "
                  "weights multiply). "
                  "'tl_key_tokens' (SFT): TL-Training's key tokens of a tool call, the answer's first token and where "
                  "the called tool's name diverges from each other tool name sharing a prefix with it, weigh "
                  "min(N_other / N_key, key_token_max_weight) when N_key < N_other; needs prompt-completion rows "
                  "whose answer starts with name( of one of the row's tools (TRL's tools column).",
                  "choices": ["tl_key_tokens"]},
    )
    key_token_max_weight: float = field(
        default=9.0,
        metadata={"help": "weight_rule_set tl_key_tokens: the largest weight of a key token (TL-Training's "
                  "max_weight, 9)."},
    )


def _kept(length: int, args) -> range:
    """The positions of a ``length``-token sequence that truncation to ``max_length`` keeps."""
    if args.max_length is None or length <= args.max_length:
        return range(length)
    if getattr(args, "truncation_mode", "keep_start") == "keep_end":
        return range(length - args.max_length, length)
    return range(args.max_length)


def _check_not_cut(matches, length: int, args, index: int, dataset_name: str) -> None:
    kept = _kept(length, args)
    for pattern, first, end in matches:
        inside = sum(position in kept for position in range(first, end))
        if 0 < inside < end - first:
            raise ValueError(f"weight_rules: truncation to max_length {args.max_length} cuts the match of "
                             f"{pattern!r} in row {index} of the {dataset_name} dataset (tokens {first}-{end - 1} of "
                             f"{length}): raise max_length, or shorten the row.")


def _answer(example) -> str:
    """The answer of a prompt-completion row: its completion's first assistant text."""
    if example.get("completion") is None:
        raise ValueError("has no completion: weight_rule_set tl_key_tokens reads prompt-completion rows, the "
                         "completion being the tool call")
    texts = message_texts(example["completion"])
    if not texts:
        raise ValueError("has no assistant text in its completion (calls in tool_calls messages are not read)")
    return texts[0]


def _key_chars(example) -> tuple[str, list[int]]:
    """A raw row's answer and the characters of it that its key tokens hold."""
    answer = _answer(example)
    return answer, key_characters(answer, tool_names(example.get("tools")))


def _row_error(index: int, dataset_name: str, err: ValueError) -> ValueError:
    return ValueError(f"weight_rule_set tl_key_tokens: row {index} of the {dataset_name} dataset {err}")


def _tl_key_token_weights(example, index, text, spans, labelled, args, dataset_name) -> dict[int, float]:
    """TL-Training's weight of each labelled position of a tokenised SFT row (:mod:`tokenweave.data.key_tokens`):
    counted over the labelled tokens that truncation keeps (those it drops weigh 1, and are dropped)."""
    try:
        answer, chars = _key_chars(example)
    except ValueError as err:
        raise _row_error(index, dataset_name, err) from err
    start = text.find(answer, spans[labelled[0]][0]) if labelled else -1
    if start < 0:
        raise _row_error(index, dataset_name, ValueError(f"has an answer {answer[:60]!r} that is not in its label "
                                                         "tokens"))
    kept = _kept(len(spans), args)
    counted = [i for i in labelled if i in kept]
    keys = set()
    for char in chars:
        position = next((i for i in labelled if spans[i][1] > start + char), None)
        if position is None or spans[position][0] > start + char:
            raise _row_error(index, dataset_name, ValueError(f"has no label token holding character {char} of its "
                                                             f"answer {answer[:60]!r}"))
        keys.add(position)
    weights = key_token_weights([i in keys for i in counted], args.key_token_max_weight)
    return dict(zip(counted, weights, strict=True))


@register_token_signal("weight_rules")
class WeightRulesSignal(TokenSignal):
    """Span rules (module docstring)."""

    supports = frozenset({"sft", "dpo"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("weight_rules", "weight_rule_set", "key_token_")

    @classmethod
    def implied(cls, args) -> bool:
        """A ``weight_rule_set`` turns the signal on."""
        return getattr(args, "weight_rule_set", None) is not None

    @classmethod
    def configure(cls, args) -> bool:
        """The command line's JSON parsed; every pattern compiles, every weight is finite and >= 0; a rule set is one
        for this trainer."""
        if isinstance(args.weight_rules, str):
            args.weight_rules = json.loads(args.weight_rules)
        if args.weight_rule_set is not None and args.trainer_kind != "sft":
            raise ConfigError(f"weight_rule_set {args.weight_rule_set!r} (TL-Training's key tokens) is for the sft "
                              f"trainer, not {args.trainer_kind}.")
        if not args.weight_rules and args.weight_rule_set is None:
            raise ConfigError("the weight_rules signal needs weight_rules: {regular expression: weight, ...}, or a "
                              "weight_rule_set.")
        for pattern, weight in (args.weight_rules or {}).items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"weight_rules: {pattern!r} is not a regular expression ({err}).") from err
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise ConfigError(f"weight_rules: the weight of {pattern!r} must be a finite number >= 0, got "
                                  f"{weight!r}.")
        return True

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        if args.trainer_kind == "dpo":
            return {"rule_weights": ("chosen_rule_weights", "rejected_rule_weights")}
        return {"rule_weights": ("rule_weights",)}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """``tl_key_tokens``: every row has a completion that calls one of its tools (module docstring); a streamed
        dataset is checked as it is prepared."""
        from datasets import Dataset

        if args.weight_rule_set != "tl_key_tokens" or not isinstance(dataset, Dataset):
            return
        for column in ("completion", "tools"):
            if column not in dataset.column_names:
                raise ValueError(f"weight_rule_set tl_key_tokens: row 0 of the {dataset_name} dataset has no "
                                 f"{column} (the dataset has no {column!r} column; it has {dataset.column_names}).")
        for index, example in enumerate(dataset.select_columns(["completion", "tools"])):
            try:
                _key_chars(example)
            except ValueError as err:
                raise _row_error(index, dataset_name, err) from err

    @classmethod
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name: str):
        from datasets import Dataset

        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        rules = args.weight_rules or {}

        def sft_weights(example, index):
            ids, labels = example["input_ids"], example["labels"]
            text, spans = token_char_spans(tokenizer, ids)
            labelled = [i for i, label in enumerate(labels) if label != -100]
            if "completion" in example:
                contents = message_texts(example["completion"])
            elif "messages" in example:
                contents = message_texts(example["messages"])
            else:
                contents = [example[args.dataset_text_field]]
            found = rule_weights(text, spans, contents, rules, spans[labelled[0]][0] if labelled else 0)
            _check_not_cut(found.matches, len(ids), args, index, dataset_name)
            weights = found.weights
            if args.weight_rule_set == "tl_key_tokens":
                keys = _tl_key_token_weights(example, index, text, spans, labelled, args, dataset_name)
                weights = [weight * keys.get(i, 1.0) for i, weight in enumerate(weights)]
            return {"rule_weights": [weights[i] for i in labelled]}

        def dpo_weights(example, index):
            columns = {}
            prompt = list(example["prompt_ids"])
            for side in ("chosen", "rejected"):
                ids = prompt + list(example[f"{side}_ids"])
                text, spans = token_char_spans(tokenizer, ids)
                start = spans[len(prompt)][0] if len(ids) > len(prompt) else len(text)
                found = rule_weights(text, spans, message_texts(example[side]), rules, start)
                _check_not_cut(found.matches, len(ids), args, index, dataset_name)
                columns[f"{side}_rule_weights"] = found.weights[len(prompt):]
            return columns

        map_kwargs = {"with_indices": True}
        if isinstance(dataset, Dataset):
            map_kwargs |= {"num_proc": args.dataset_num_proc, "desc": f"Weight rules on {dataset_name}"}
        return dataset.map(dpo_weights if args.trainer_kind == "dpo" else sft_weights, **map_kwargs)

    def token_inputs(self, batch: TokenBatch) -> dict:
        return {"token_weights": batch.columns["rule_weights"]}
