"""Reward functions with TRL's GRPO signature, and a registry to pick them by name from a config.

`get_reward_func("correctness")` returns a registered function; `get_reward_func("pkg.module:fn")`
imports any other function with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .math import closeness_reward, completion_to_text, correctness_reward, extract_answer, format_reward, is_correct
from .ranking import ndcg_reward, recall_reward

__all__ = [
    "REWARD_FUNCS",
    "closeness_reward",
    "completion_to_text",
    "correctness_reward",
    "extract_answer",
    "format_reward",
    "get_reward_func",
    "is_correct",
    "ndcg_reward",
    "recall_reward",
]

REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "correctness": correctness_reward,
    "format": format_reward,
    "closeness": closeness_reward,
    "ndcg": ndcg_reward,  # ranked-list answers (rewards.ranking): NDCG@N and Recall@N of the whole list
    "recall": recall_reward,
}


def get_reward_func(name: str) -> Callable[..., list[float | None]]:
    """The reward function registered as `name`, or the function at the dotted path
    `package.module:function`.

    Raises:
        ValueError: for an unknown name, or a dotted path that does not lead to a callable.
    """
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if ":" not in name:
        raise ValueError(
            f"Unknown reward function {name!r}. Registered: {', '.join(sorted(REWARD_FUNCS))}; "
            "or give a dotted path 'package.module:function'."
        )
    module_name, _, attribute = name.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Cannot load reward function {name!r}: {err}") from err
    if not callable(func):
        raise ValueError(f"The reward function {name!r} is not callable.")
    return func
