"""The GRPO test harness: a TokenGRPOTrainer on the tiny model, a hand-made generation batch, and the loss and
gradients a batch gives. Used by the trainer tests (``test_grpo_trainer.py``, ``test_hapo_pinned.py``), the
2-process probe (``distributed/grpo_invariance_probe.py``) and its test (``distributed/test_grpo.py``).

The batch: 8 completions (2 prompts × 4) as ``_generate_and_score_completions`` returns them, off-policy (old and
reference log-probs are the model's shifted by N(0, 0.3²), so ratios leave the clip ranges), with unequal lengths
(:data:`LENGTHS`), so a per-micro-batch or per-process token mean would differ from the global one. TRL's split of it
over 2 processes gives rows 0-3 and 4-7, whose token counts differ (21 vs 18).
"""

from __future__ import annotations

import pytest
import torch

LENGTHS = [6, 3, 5, 1, 6, 2, 4, 6]
PROMPT_LENGTH = 5


def digit_reward(completions, **kwargs):
    """The share of digits in the completion: varied rewards even for a random model (character tokenizer)."""
    texts = [completion[-1]["content"] for completion in completions]
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in texts]


def train_dataset():
    """16 arithmetic prompts (the dataset every harness trainer gets)."""
    from tokenweave.data.arithmetic import load_arithmetic

    return load_arithmetic("train", "prompt", 16)


def make_trainer(model_dir, output_dir, trainer_class=None, config_class=None, **overrides):
    """A ``TokenGRPOTrainer`` (or ``trainer_class`` with ``config_class``, e.g. TRL's) on the tiny model, in training
    mode: batch 8, 4 generations per prompt, completions of at most ``max(LENGTHS)`` tokens, unless overridden
    (``peft_config``: a LoRA policy)."""
    from tokenweave.trainers import TokenGRPOConfig, TokenGRPOTrainer

    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=max(LENGTHS),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    peft_config = overrides.pop("peft_config", None)
    config = (config_class or TokenGRPOConfig)(**(kwargs | overrides))
    trainer = (trainer_class or TokenGRPOTrainer)(
        model=model_dir, reward_funcs=[digit_reward], args=config, train_dataset=train_dataset(),
        peft_config=peft_config,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps  # set by Trainer when training
    return trainer


def token_logps_and_entropies(trainer, batch):
    """The policy's per-token log-probs and entropies ``[B, T]`` of a batch's completions, without gradient."""
    with torch.no_grad():
        logps, entropies, _ = trainer.completion_logps_and_entropies(trainer.model, batch, compute_entropy=True)
    return logps, entropies


def make_batch(trainer, lengths=LENGTHS, seed: int = 0, log_ratio_std: float = 0.3) -> dict:
    """The hand-made generation batch (deterministic given the model's weights); see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    pad = trainer.processing_class.pad_token_id
    prompt_mask = (torch.arange(PROMPT_LENGTH) >= torch.tensor([0, 2] * (n // 2)).unsqueeze(1)).long()  # left pad
    completion_mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    batch = {
        "prompt_ids": torch.randint(4, 100, (n, PROMPT_LENGTH), generator=generator).masked_fill(prompt_mask == 0, pad),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(4, 100, (n, width), generator=generator).masked_fill(completion_mask == 0, pad),
        "completion_mask": completion_mask,
        "advantages": torch.randn(n, generator=generator),
        "num_items_in_batch": completion_mask.sum(),  # TRL: the global token count of the generation batch
    }
    logps, _ = token_logps_and_entropies(trainer, batch)
    batch["old_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    batch["ref_per_token_logps"] = logps + log_ratio_std * torch.randn(logps.shape, generator=generator)
    return batch


def with_generation_signals(trainer, batch: dict) -> dict:
    """``batch`` with the per-token columns the trainer's token signals add after generation that a hand-made batch
    can carry (HAPO: ``entropy_signal``, ĥ under the statistics of the whole generation batch, gathered over
    processes; Rank-GRPO: ``rank_ids``, :func:`hand_made_rank_ids`), as ``_generate_and_score_completions`` adds
    them. A collective under several processes (HAPO)."""
    from tokenweave.trainers.rollout import Generation

    if "rank_grpo" in trainer.signals:
        batch = batch | {"rank_ids": hand_made_rank_ids(batch, trainer.args.rank_list_length)}
    hapo = trainer.signals.get("hapo")
    if hapo is None or not hapo.entropy_signal_from_generation:
        return batch
    entropies = Generation(trainer, batch, training=True, captured=[], inputs=[]).old_policy_entropies()
    return batch | {"entropy_signal": hapo.entropy_statistics(entropies, batch["completion_mask"])[1]}


def hand_made_rank_ids(batch: dict, num_ranks: int) -> torch.Tensor:
    """Rank-GRPO's span ids for a hand-made batch: items of 2 tokens (token t has rank t // 2, overflow from rank
    ``num_ranks`` on), the same for every row, so any process slice gets the rows' own ids."""
    positions = torch.arange(batch["completion_ids"].size(1)).expand_as(batch["completion_ids"])
    return (positions // 2).clamp(max=num_ranks)


def process_slice(batch: dict, rank: int, num_processes: int = 2) -> dict:
    """Process ``rank``'s rows of the generation batch, completions trimmed to its own longest one (TRL pads each
    process's completions to the local maximum); ``num_items_in_batch`` stays the global count."""
    rows = len(batch["advantages"]) // num_processes
    local = {key: value[rank * rows:(rank + 1) * rows] for key, value in batch.items() if key != "num_items_in_batch"}
    width = int(local["completion_mask"].sum(-1).max())
    for key in ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps"):
        local[key] = local[key][:, :width]
    local["num_items_in_batch"] = batch["num_items_in_batch"]
    return local


def loss_and_grads(trainer, batches: list[dict]) -> tuple[float, list[torch.Tensor]]:
    """Σ of the micro-batch losses (as Trainer accumulates them, through the public ``compute_loss``), and the
    accumulated gradients."""
    trainer.model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        total += loss.item()
    return total, [param.grad.detach().clone() for param in trainer.model.parameters()]


def assert_same_update(actual, expected, atol=1e-5):
    """Two ``(loss, gradients)`` pairs agree within ``atol``."""
    assert actual[0] == pytest.approx(expected[0], abs=atol)
    for grad, expected_grad in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=0)


def rank_answers(request: dict) -> list[str]:
    """8 hand-written answers to one recommendation request (one group of 8), of unequal lengths: hits at different
    ranks, a history item, a malformed line, a repeat, an overflowing list."""
    relevant, history = request["relevant_items"], request["history_items"]
    others = [item for item in request["candidate_items"] if item not in relevant and item not in history]
    return [
        "\n".join([relevant[0], others[0], relevant[1]]),
        "\n".join([others[0], relevant[0]]),
        "\n".join([history[0], "Not a movie", relevant[1], relevant[0]]),
        relevant[1],
        "\n".join([relevant[0], relevant[0], others[1], others[2], others[3], relevant[1]]),  # 6 items: overflow
        "\n".join(others[:3]),
        "\n".join([relevant[1], relevant[0], others[1]]) + "\n",
        "\n".join([others[2], others[1], relevant[0], relevant[1], others[0]]),
    ]


def rank_generation(trainer, rows: slice = slice(None)) -> tuple[dict, list[dict]]:
    """``(output, inputs)`` as TRL's ``_generate_and_score_completions`` gives the rank_grpo signal for ``rows`` of the
    8 :func:`rank_answers` to the first training request (EOS on all but answer 3, padded to the rows' longest)."""
    from tokenweave.data.recommendation import load_recommendation

    request = load_recommendation("train", num_examples=1)[0]
    tokenizer = trainer.processing_class
    answers = rank_answers(request)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + ([] if i == 3 else [tokenizer.eos_token_id])
           for i, text in enumerate(answers)][rows]
    width = max(map(len, ids))
    completion_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    completion_mask = (torch.arange(width) < torch.tensor([len(row) for row in ids]).unsqueeze(1)).long()
    output = {"completion_ids": completion_ids, "completion_mask": completion_mask}
    return output, [dict(request) for _ in ids]


def rank_advantages(trainer, rows: slice = slice(None)) -> torch.Tensor:
    """The rank_grpo signal's token advantages ``[rows, T]`` of :func:`rank_generation` (a collective: the rewards are
    gathered over processes)."""
    from tokenweave.trainers.rollout import Generation

    output, inputs = rank_generation(trainer, rows)
    return trainer.signals["rank_grpo"].after_generation(Generation(trainer, output, True, [], inputs))["advantages"]


ATTENTION_CREDIT = dict(token_signals=["attention_credit"], attention_credit_layers=[0, 1], attention_credit_window=2,
                        attention_credit_horizon=[1, 3], attention_credit_head_fraction=0.25)
"""Attention credit sized for the hand-made batch (completions of at most 6 tokens)."""


def attention_credit_advantages(trainer, batch: dict) -> torch.Tensor:
    """The attention_credit signal's advantages ``[B, T]`` for a hand-made generation batch (a collective: the head
    spans are reduced over processes)."""
    from tokenweave.trainers.rollout import Generation

    generation = Generation(trainer, batch, True, [], [])
    return trainer.signals["attention_credit"].after_generation(generation)["advantages"]


def rlsd_trainer(model_dir, output_dir, perturb_teacher=True, **overrides):
    """A trainer with the rlsd signal (``policy_loss: grpo`` unless overridden); the frozen teacher's weights moved
    away from the policy's (so that δ is far from 0 and the clip acts at both ends), the same way on every process."""
    trainer = make_trainer(model_dir, output_dir, token_signals=["rlsd"], **({"policy_loss": "grpo"} | overrides))
    if perturb_teacher and trainer.args.rlsd_teacher == "frozen":
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in trainer.frozen_models.loaded["history"].parameters():
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return trainer


def rlsd_rows() -> list[dict]:
    """The dataset rows of the hand-made batch's 8 completions (2 prompts x 4): the rlsd teacher's answers."""
    dataset = train_dataset()
    return [dataset[0]] * 4 + [dataset[1]] * 4


def rlsd_generation_columns(trainer, batch: dict, rows: slice = slice(None)) -> dict:
    """What the rlsd signal adds to the generation batch (``after_generation`` on the hand-made batch, or on the
    process's ``rows`` of it)."""
    from tokenweave.trainers.rollout import Generation

    return trainer.signals["rlsd"].after_generation(Generation(trainer, batch, True, [], rlsd_rows()[rows]))
