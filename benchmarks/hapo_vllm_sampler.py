"""HAPO's adaptive temperature on both samplers, on a GPU: transformers' ``generate`` with
``AdaptiveTemperatureLogitsProcessor`` and vLLM's engine with ``HapoTemperatureProcessor`` (``trainers/hapo_vllm.py``).

::

    pip install vllm   # a version TRL 1.16 supports (0.22 - 0.31); Model Runner V2 (vLLM's default from 0.31)
    python benchmarks/hapo_vllm_sampler.py --model Qwen/Qwen2.5-0.5B-Instruct --output hapo_vllm.json
    python benchmarks/hapo_vllm_sampler.py --model /path/to/local/model --num_prompts 64 --tau 0.3

Needs a GPU and vLLM; a CPU machine stops at the start. One process:

1. **Statistics**: the model answers ``--num_prompts`` arithmetic questions at T_base (transformers); the entropies
   of its own completions (one forward, float32) give HAPO's statistics, as the trainer's previous generation would.
2. **transformers**: each question sampled with the transformers processor holding those statistics; it records
   each token's temperature.
3. **vLLM**: the same questions through vLLM with the processor registered and the statistics in every request's
   ``extra_args`` (temperature 1, ``logprobs_mode: processed_logprobs``, as TRL's colocate mode builds it); vLLM
   returns each sampled token's log-probability after the processor.
4. **Check**: one float32 transformers forward over vLLM's completions gives each position's entropy at T_base and
   HAPO's temperature there; the log-probability of vLLM's token at that temperature must equal what vLLM returned
   (its difference at T_base instead shows that the processor changed the distribution). Reported: per path, the
   mean and spread of the per-token temperatures and entropies; the largest and mean log-probability differences.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from tokenweave.data.loading import load_run_dataset  # noqa: E402
from tokenweave.inference.generation import chat_prompt_ids  # noqa: E402
from tokenweave.inference.loading import load_model_and_tokenizer  # noqa: E402
from tokenweave.inference.vllm_sampling import import_vllm  # noqa: E402
from tokenweave.models import resolve_model  # noqa: E402
from tokenweave.tokens.entropy import adaptive_temperature, entropy_stats  # noqa: E402
from tokenweave.trainers.hapo import AdaptiveTemperatureLogitsProcessor  # noqa: E402
from tokenweave.trainers.hapo_vllm import PROCESSOR_PATH, hapo_extra_args  # noqa: E402


@torch.no_grad()
def completion_logits(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """``[len(completion), V]`` float32 logits that predicted each completion token."""
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    return model(ids).logits[0, len(prompt_ids) - 1 : -1].float()


def entropies_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.special.entr(probs).sum(-1)


def summary(values: torch.Tensor) -> dict:
    values = values.float()
    return {"mean": values.mean().item(), "std": values.std().item(), "min": values.min().item(),
            "max": values.max().item(), "count": values.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="A local model directory or hub id.")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--base_temperature", type=float, default=1.0)
    parser.add_argument("--tau", type=float, default=0.3, help="HAPO's τ (recipes: 0.05; larger shows more).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Both engines' dtype.")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="hapo_vllm_sampler.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a GPU (vLLM's engine).")
    vllm = import_vllm()

    path = resolve_model(args.model)
    model, tokenizer = load_model_and_tokenizer(path, dtype=getattr(torch, args.dtype))
    model.to("cuda")
    prompts = list(load_run_dataset("arithmetic", "train", "grpo", num_examples=args.num_prompts)["prompt"])
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id

    def sample_transformers(processor=None, temperature=args.base_temperature):
        torch.manual_seed(args.seed)
        completions, temperatures = [], []
        for ids in prompt_ids:
            output = model.generate(torch.tensor([ids], device="cuda"), do_sample=True, top_p=1.0, top_k=0,
                                    temperature=temperature, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                                    logits_processor=LogitsProcessorList([processor] if processor else []))
            completion = output[0, len(ids):].tolist()
            completions.append(completion)
            if processor is not None:
                temperatures.append(processor.pop_temperatures()[0, : len(completion)])
        return completions, temperatures

    # 1. statistics from the model's own completions at T_base
    first, _ = sample_transformers()
    entropies = [entropies_at(completion_logits(model, ids, c), args.base_temperature) for ids, c in
                 zip(prompt_ids, first) if c]
    padded = torch.nn.utils.rnn.pad_sequence(entropies, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(e) for e in entropies], batch_first=True)
    stats = entropy_stats(padded, mask)

    # 2. transformers' processor
    processor = AdaptiveTemperatureLogitsProcessor(stats, args.base_temperature, args.tau, record_temperatures=True)
    transformers_completions, transformers_temperatures = sample_transformers(processor, temperature=1.0)
    transformers_entropies = torch.cat([entropies_at(completion_logits(model, ids, c), args.base_temperature)
                                        for ids, c in zip(prompt_ids, transformers_completions) if c])

    # 3. vLLM's processor
    engine = vllm.LLM(model=path, dtype=args.dtype, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                      logits_processors=[PROCESSOR_PATH], logprobs_mode="processed_logprobs")
    params = vllm.SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, logprobs=0,
                                 seed=args.seed, extra_args=hapo_extra_args(stats, args.base_temperature, args.tau))
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)

    # 4. vLLM's log-probabilities against HAPO's temperature recomputed by transformers
    vllm_temperatures, vllm_entropies, at_hapo, at_base = [], [], [], []
    for ids, output in zip(prompt_ids, outputs):
        choice = output.outputs[0]
        tokens = list(choice.token_ids)
        if not tokens:
            continue
        returned = torch.tensor([step[token].logprob for step, token in zip(choice.logprobs, tokens)], device="cuda")
        logits = completion_logits(model, ids, tokens)
        entropy = entropies_at(logits, args.base_temperature)
        temperature = adaptive_temperature(entropy, stats, args.base_temperature, args.tau)
        index = torch.tensor(tokens, device="cuda")[:, None]
        hapo_logprob = torch.log_softmax(logits / temperature[:, None], -1).gather(-1, index)[:, 0]
        base_logprob = torch.log_softmax(logits / args.base_temperature, -1).gather(-1, index)[:, 0]
        vllm_temperatures.append(temperature)
        vllm_entropies.append(entropy)
        at_hapo.append((returned - hapo_logprob).abs())
        at_base.append((returned - base_logprob).abs())
    at_hapo, at_base = torch.cat(at_hapo), torch.cat(at_base)
    report = {
        "model": args.model, "dtype": args.dtype, "vllm_version": vllm.__version__, "tau": args.tau,
        "base_temperature": args.base_temperature, "prompts": args.num_prompts,
        "transformers": {"temperature": summary(torch.cat(transformers_temperatures)),
                         "entropy": summary(transformers_entropies)},
        "vllm": {"temperature (recomputed)": summary(torch.cat(vllm_temperatures)),
                 "entropy (recomputed)": summary(torch.cat(vllm_entropies))},
        "vllm logprob - logprob at HAPO's temperature": {"max": at_hapo.max().item(), "mean": at_hapo.mean().item()},
        "vllm logprob - logprob at T_base": {"max": at_base.max().item(), "mean": at_base.mean().item()},
    }
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
