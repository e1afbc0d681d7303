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
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..checks import ConfigError
from ..data.token_columns import message_texts, rule_weights, token_char_spans
from .signals import TokenBatch, TokenSignal, register_token_signal


@dataclass
class WeightRulesConfig:
    """The ``weight_rules`` signal's field of ``TokenSFTConfig`` and ``TokenDPOConfig`` (a mixin)."""

    weight_rules: dict | str | None = field(
        default=None,
        metadata={"help": "weight_rules signal: {regular expression: weight}, in order (a mapping in YAML, JSON on "
                  "the command line). A completion token gets the weight of the first rule with a match in the "
                  "assistant's text that overlaps it, else 1."},
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


@register_token_signal("weight_rules")
class WeightRulesSignal(TokenSignal):
    """Span rules (module docstring)."""

    supports = frozenset({"sft", "dpo"})
    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("weights/",)
    option_prefixes = ("weight_rules",)

    @classmethod
    def configure(cls, args) -> bool:
        """The command line's JSON parsed; every pattern compiles, every weight is finite and >= 0."""
        if isinstance(args.weight_rules, str):
            args.weight_rules = json.loads(args.weight_rules)
        if not args.weight_rules:
            raise ConfigError("the weight_rules signal needs weight_rules: {regular expression: weight, ...}.")
        for pattern, weight in args.weight_rules.items():
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
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name: str):
        from datasets import Dataset

        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        rules = args.weight_rules

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
            return {"rule_weights": [found.weights[i] for i in labelled]}

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
