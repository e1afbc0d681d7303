"""Batched generation from chat prompts, shared by evaluation, trajectory sampling and the rollout test.

Progress is shown while a batch generates, not only when it is done (:class:`GenerationProgress`): on a CPU one batch
of 32 prompts can take minutes, and a bar that moves once per batch sits at 0 all that time.
"""

from __future__ import annotations

from typing import Self

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from .shards import Shard, batch_seed


class GenerationProgress(StoppingCriteria):
    """A tqdm bar over the generated tokens of ``completions`` completions, each counted as its budget
    ``max_new_tokens``. At every step of ``generate`` (which calls it as a stopping criterion; it stops nothing) it
    counts one token for each completion still running, and the rest of the budget of one that has just ended (its
    newest token is ``eos_token_id``); at a batch's end (:meth:`end_batch`), what the batch has not counted yet (a
    completion that ended another way). So the bar moves within a batch and ends at its total exactly. The postfix
    counts the completions done.

    Used as a context manager (the bar closes on exit), and passed to :func:`generate_with_shared_prefix` for each
    batch; ``disable`` hides the bar (the processes of a shard but the first)."""

    def __init__(self, completions: int, max_new_tokens: int, eos_token_id: int, *, desc: str,
                 unit: str = "token", disable: bool = False):
        self.bar = tqdm(total=completions * max_new_tokens, desc=desc, unit=unit, disable=disable)
        self.completions = completions
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.done = 0
        self._prompt_width = self._rows = self._counted = 0
        self._running: torch.Tensor | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()

    def start_batch(self, prompt_width: int, rows: int) -> None:
        """A batch of ``rows`` completions after prompts ``prompt_width`` tokens wide starts generating."""
        self._prompt_width, self._rows, self._counted, self._running = prompt_width, rows, 0, None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        step = input_ids.shape[1] - self._prompt_width
        if self._running is None:
            self._running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ended = self._running & (input_ids[:, -1] == self.eos_token_id)
        running, ending = torch.stack([self._running.sum(), ended.sum()]).tolist()
        self._running &= ~ended
        self._advance(running + ending * (self.max_new_tokens - step), ending)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def end_batch(self) -> None:
        """The batch is done: its completions count in full."""
        running = self._rows if self._running is None else int(self._running.sum())
        self._advance(self._rows * self.max_new_tokens - self._counted, running)

    def _advance(self, tokens: int, ended: int) -> None:
        self._counted += tokens
        if ended:
            self.done += ended
            self.bar.set_postfix_str(f"{self.done}/{self.completions} completions", refresh=False)
        if tokens:
            self.bar.update(tokens)


@torch.no_grad()
def generate_with_shared_prefix(model, input_ids, attention_mask, num_samples: int, *,
                                progress: GenerationProgress | None = None, **generate_kwargs):
    """``model.generate`` of ``num_samples`` continuations per row of a left-padded batch, the prompt read once.

    ``generate(num_return_sequences=K)`` repeats every prompt K times before its first forward, so the prompt is
    computed K times. Here all prompt tokens but the last go through one forward per row (positions from the
    attention mask, as ``generate`` derives them for left padding); the cache is repeated K times and ``generate``
    continues from it. The rows come out in ``generate``'s order (row ``i``'s samples at ``i·K .. i·K + K − 1``).
    ``progress`` advances at every generated token (:class:`GenerationProgress`).
    """
    if progress is None:
        return _generate_with_shared_prefix(model, input_ids, attention_mask, num_samples, **generate_kwargs)
    progress.start_batch(input_ids.shape[1], input_ids.shape[0] * num_samples)
    criteria = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), progress])
    output = _generate_with_shared_prefix(model, input_ids, attention_mask, num_samples, stopping_criteria=criteria,
                                          **generate_kwargs)
    progress.end_batch()
    return output


def _generate_with_shared_prefix(model, input_ids, attention_mask, num_samples: int, **generate_kwargs):
    """:func:`generate_with_shared_prefix` without the progress."""
    if num_samples == 1 or input_ids.shape[1] < 2:
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=num_samples, **generate_kwargs
        )
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        cache=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    ).cache
    cache.batch_repeat_interleave(num_samples)
    return model.generate(
        input_ids=input_ids.repeat_interleave(num_samples, 0),
        attention_mask=attention_mask.repeat_interleave(num_samples, 0),
        cache=cache,
        **generate_kwargs,
    )


def chat_prompt_ids(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """The token ids of each chat prompt with the generation prompt, as every sampler here tokenises it (the chat
    template's text, tokenised without adding special tokens again)."""
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    desc: str = "generating",
    shard: Shard = Shard(),
) -> list[list[str]]:
    """Complete each chat ``prompt`` ``num_samples`` times; returns one list of texts per prompt.

    Greedy when ``temperature`` is None, otherwise sampling at that temperature, each batch seeded by
    :func:`.shards.batch_seed`. Prompts are batched by length (left padding) and the results are returned in the input
    order. Special tokens are stripped from the texts. With a ``shard`` of several processes, each generates its
    batches and every process returns all the texts (:mod:`.shards`: the same texts whatever the number of processes).
    A bar ``desc`` over the generated tokens moves at every step (:class:`GenerationProgress`).
    """
    if tokenizer.padding_side != "left":
        raise ValueError("Batched generation needs a tokenizer with padding_side='left'.")
    encoded = chat_prompt_ids(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    if temperature is None:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    device = next(model.parameters()).device
    prompts_per_batch = max(1, batch_size // num_samples)
    batches = [order[start : start + prompts_per_batch] for start in range(0, len(order), prompts_per_batch)]
    generated = []  # (prompt index, its texts) of this process's batches
    mine = shard.batches(len(batches))
    completions_here = num_samples * sum(len(batches[b]) for b in mine)
    with GenerationProgress(completions_here, max_new_tokens, tokenizer.eos_token_id, desc=desc,
                            disable=not shard.is_main) as progress:
        for batch_index in mine:
            indices = batches[batch_index]
            if temperature is not None:
                torch.manual_seed(batch_seed(seed, batch_index))
            batch = tokenizer.pad({"input_ids": [encoded[index] for index in indices]}, return_tensors="pt").to(device)
            output = generate_with_shared_prefix(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                num_samples,
                progress=progress,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for position, index in enumerate(indices):
                rows = decoded[position * num_samples : (position + 1) * num_samples]
                generated.append((index, [text.strip() for text in rows]))
    completions: list[list[str]] = [[] for _ in prompts]
    for index, prompt_texts in shard.gather(generated):
        completions[index] = prompt_texts
    return completions
