"""Batched generation from chat prompts, shared by evaluation and trajectory sampling."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
) -> list[list[str]]:
    """Complete each chat ``prompt`` ``num_samples`` times; returns one list of texts per prompt.

    Greedy when ``temperature`` is None, otherwise sampling at that temperature (seeded). Prompts are
    batched by length (left padding) and the results are returned in the input order. Special tokens
    are stripped from the texts.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("Batched generation needs a tokenizer with padding_side='left'.")
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    if temperature is None:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    if temperature is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    completions: list[list[str]] = [[] for _ in prompts]
    prompts_per_batch = max(1, batch_size // num_samples)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
        for start in range(0, len(order), prompts_per_batch):
            indices = order[start : start + prompts_per_batch]
            batch = tokenizer.pad({"input_ids": [encoded[index] for index in indices]}, return_tensors="pt").to(device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, text in enumerate(decoded):
                completions[indices[row // num_samples]].append(text.strip())
            progress.update(len(indices))
    return completions
