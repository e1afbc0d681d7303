"""TL-Training's key tokens of a tool call (EMNLP Findings 2025, arXiv 2412.15495), on the answer's characters.

TL-Training's released code (``code/pkt/utils.py``, ``ToolTrainer.compute_loss`` and ``GCELoss``) weighs the tokens
where a model picks *which tool* it calls. For an answer ``gold_name(args...)`` and the other tools of the example:

- the key tokens are the first token of the answer and, for each other tool whose name shares a non-empty prefix with
  the gold name, the token where the gold name diverges from it: the first one after their longest common prefix (the
  ``(`` after the name when the gold name is a prefix of the other one); a token is counted once;
- with ``N_key`` key tokens and ``N_other`` other label tokens, each key token weighs ``min(N_other / N_key,
  max_weight)`` (``max_weight`` 9) when ``N_key < N_other``, and 1 otherwise; every other label token weighs 1.

The paper also re-weights the parameter tokens; the released code collects them (its ``para`` tokens: CodeLlama token
strings such as ``',`` and ``')``) but multiplies them by 1, and only the tool-name tokens above get the weight: this
module follows the code. Two differences from that code, both made so that the rule does not depend on one tokenizer:

- the divergence is found on the names' *characters* (:func:`key_characters`), and the key token is the token that
  holds that character; the code compares the names' token lists, which gives the same token unless the tokenizer
  splits the shared prefix of the two names differently;
- ``N_other`` counts every label token that is not a key token; the code also leaves its ``para`` tokens out of the
  count (they keep weight 1), so its weight is ``min((N_other - N_para) / N_key, max_weight)``.

The functions here are pure (strings and counts). The ``weight_rules`` token signal
(:mod:`tokenweave.trainers.weight_rules`, ``weight_rule_set: tl_key_tokens``) maps the characters to the tokens a
trainer sees and computes the per-token weights with :func:`key_token_weights`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def tool_names(tools: Any) -> list[str]:
    """The tool names of an example's ``tools`` column, as TRL's chat template reads it: a list (or its JSON string) of
    JSON schemas, each ``{"type": "function", "function": {"name": ...}}`` or ``{"name": ...}``. ``ValueError`` (a
    message that follows "row N of the dataset ...") when there are none or one has no name."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"has a tools value that is not JSON ({err}): {tools[:60]!r}") from err
    if not tools or not isinstance(tools, (list, tuple)):
        raise ValueError(f"has no tools (a list of the tools the example may call, as JSON schemas), got {tools!r}")
    names = []
    for tool in tools:
        function = (tool.get("function") or tool) if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"has a tool without a name: {str(tool)[:80]!r} (expected a JSON schema "
                             '{"type": "function", "function": {"name": ...}} or {"name": ...})')
        names.append(name)
    return names


def called_tool(answer: str, names: Sequence[str]) -> tuple[int, str]:
    """``(offset, name)``: the tool ``answer`` calls, ``name(`` at its start (leading whitespace skipped), and where the
    name starts; ``ValueError`` (a message that follows "row N of the dataset ...") when it calls none of ``names``."""
    start = len(answer) - len(answer.lstrip())
    for name in names:
        if answer.startswith(name + "(", start):
            return start, name
    raise ValueError(f"has an answer that does not start with a call name(...) of one of its tools {list(names)}: "
                     f"{answer[:60]!r}")


def key_characters(answer: str, names: Sequence[str]) -> list[int]:
    """The characters of ``answer`` (offsets, ascending) that TL-Training's key tokens hold (module docstring): the
    answer's first (non-whitespace) character and, for each other tool name that shares a non-empty prefix with the
    called one, the character of the answer right after that prefix."""
    start, gold = called_tool(answer, names)
    keys = {start}
    for other in names:
        if other != gold:
            shared = len(os.path.commonprefix([gold, other]))
            if shared:
                keys.add(start + shared)
    return sorted(keys)


def key_token_weight(num_key: int, num_other: int, max_weight: float = 9.0) -> float:
    """The weight of each key token: ``min(num_other / num_key, max_weight)`` when ``num_key < num_other``, else 1."""
    if num_key == 0 or num_key >= num_other:
        return 1.0
    return float(min(num_other / num_key, max_weight))


def key_token_weights(is_key: Sequence[bool], max_weight: float = 9.0) -> list[float]:
    """Per-token weights of one sequence's label tokens, from which of them are key tokens: the key tokens'
    :func:`key_token_weight` (``N_key`` = the key tokens, ``N_other`` = the others), 1 for the others."""
    num_key = sum(map(bool, is_key))
    weight = key_token_weight(num_key, len(is_key) - num_key, max_weight)
    return [weight if key else 1.0 for key in is_key]
