"""Preference pairs that share a prefix: each rejected trajectory against a correct continuation of itself from just
before its lowest-scored token (cDPO's rollout test, turned into pairs).

With pairs of independent samples, the chosen and the rejected response differ everywhere, so a token-level weight
has many tokens to spread over; with a shared prefix they differ only from the critical token on, so the tokens
that decide the outcome are the tokens where the pair differs. ``tokenweave evidence`` compares the two kinds of pairs
in learning (issue 25).

:func:`prefix_pairs`, from a scored pairs dataset (the critical-token pipeline's ``pairs/``: ``rejected``,
``rejected_scores``, ``answer``): for each pair whose rejected message tokens are found, the position ``t`` of the
lowest-scored message token; ``num_rollouts`` continuations sampled from the prompt and the rejected trajectory's
tokens before ``t``, with its token ``t`` forbidden at the first position
(:func:`tokenweave.inference.rollout.rollout_continuations`); the first correct one makes the chosen response: the
text of the rejected tokens before ``t`` and the continuation. Pairs without a correct continuation are left out.
The rows keep the pair's ``question_id``, ``prompt``, ``rejected``, ``answer`` and ``solution`` and get
``chosen_source: "prefix"``, ``prefix_position`` (``t``, in the rejected tokens) and ``pair_row`` (the pair's row in
``pairs``); the token columns of the scores
are left out, for scoring again (:func:`tokenweave.inference.scoring.score_with_models`).
"""

from __future__ import annotations

from datasets import Dataset

from ..data.token_columns import tokenize_like_dpo
from ..inference.rollout import rollout_continuations
from .localization import message_tokens

KEPT_COLUMNS = ("question_id", "prompt", "rejected", "answer", "solution")


def prefix_pairs(
    pairs: Dataset, model, tokenizer, *, num_rollouts: int = 8, temperature: float = 0.8, max_new_tokens: int = 48,
    batch_size: int = 32, seed: int = 0,
) -> Dataset:
    """The prefix-sharing pairs of ``pairs`` (module docstring); ``tokenizer`` is the one the pairs were scored with
    (left padding)."""
    tested = []  # (row, position, prompt ids, rejected ids)
    for row, example in enumerate(pairs):
        tokenized = tokenize_like_dpo(example, tokenizer)
        ids, scores = tokenized["rejected_ids"], example["rejected_scores"]
        if len(ids) != len(scores):
            raise ValueError(f"Row {row}: {len(scores)} rejected scores for {len(ids)} rejected tokens: the pairs were "
                             "scored with another tokenizer.")
        content = message_tokens(example)
        if content is not None and content.end > content.first:
            position = min(range(content.first, content.end), key=scores.__getitem__)
            tested.append((row, position, tokenized["prompt_ids"], ids))
    continuations = rollout_continuations(
        model, tokenizer, [prompt + ids[:position] for _, position, prompt, ids in tested],
        [ids[position] for _, position, _, ids in tested], [len(prompt) for _, _, prompt, _ in tested],
        [pairs[row]["answer"] for row, _, _, _ in tested], num_rollouts=num_rollouts, temperature=temperature,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, desc="prefix pairs",
    )
    rows = []
    for (row, position, _, ids), options in zip(tested, continuations, strict=True):
        correct = next((tokens for tokens, is_right in options if is_right), None)
        if correct is None:
            continue
        example = pairs[row]
        text = tokenizer.decode(ids[:position] + correct, skip_special_tokens=True)
        rows.append({key: example[key] for key in KEPT_COLUMNS if key in example}
                    | {"chosen": [{"role": "assistant", "content": text}], "chosen_source": "prefix",
                       "prefix_position": position, "pair_row": row})
    return Dataset.from_list(rows)
