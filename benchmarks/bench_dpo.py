"""Step time and peak memory of token-weighted DPO (cDPO), TDPO2, TGDPO and T-REG against TRL's own DPOTrainer
(sigmoid).

::

    python benchmarks/bench_dpo.py                                   # SmolLM2-135M-Instruct + LoRA, ~6 min
    python benchmarks/bench_dpo.py --model tiny-llama --max_length 512 --rounds 20   # the tiny random Llama, ~1 min

Three methods, the same model, LoRA config, batches and optimizer; they differ only in the loss:

- ``dpo``: TRL's ``DPOTrainer`` with ``loss_type: sigmoid`` (the baseline);
- ``weighted-dpo``: ``TokenDPOTrainer`` with ``loss_type: cdpo`` and a weight on every completion token (chosen 1,
  rejected a random number in [0, 1], from ``chosen_weights`` / ``rejected_weights`` columns);
- ``tdpo2``: ``TokenDPOTrainer`` with ``loss_type: tdpo2`` (full-vocabulary KL in chunks of
  ``--tdpo_kl_chunk_size`` positions);
- ``tgdpo``: ``loss_type: tgdpo`` with precomputed token rewards (``chosen_token_rewards`` / ``rejected_token_rewards``
  columns, uniform in [−1, 1]);
- ``tgdpo-online``: ``loss_type: tgdpo`` with the reward model online (``tgdpo_reward_model_path``: the same model,
  a third one in memory; one more no-grad forward per step);
- ``treg``: ``loss_type: treg`` with precomputed token rewards (the same columns, in (−½, ½));
- ``aligndistil``: ``loss_type: aligndistil``, both teachers the same model (a third and a fourth in memory: their
  values do not change the work, two more no-grad forwards and three LM heads over the chosen positions in chunks).

The fourth, ``dpo-again``, is a second TRL ``DPOTrainer`` identical to ``dpo``, timed only: its ratio to ``dpo`` (1 in
a noiseless world) shows how finely this machine resolves a ratio. The measurement is :mod:`step_bench`'s (memory in
one child process per method, step time interleaved round by round); a step is the forward of policy and reference,
the loss, the backward and the optimizer step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tokenweave from this checkout
from step_bench import Bench, main  # noqa: E402

METHODS = ("dpo", "weighted-dpo", "tdpo2", "tgdpo", "tgdpo-online", "treg", "aligndistil")
# Timed only: a second, identical TRL DPOTrainer. Its ratio to "dpo" is the noise floor of the time measurement.
CONTROL = "dpo-again"
TARGETS = {"weighted-dpo": {"time": 1.02, "memory": 1.02}, "tdpo2": {"time": 1.25, "memory": 1.15},
           "tgdpo": {"time": 1.02, "memory": 1.02}}
TOKEN_COLUMNS = ("chosen_weights", "rejected_weights", "chosen_token_rewards", "rejected_token_rewards")
# the per-token columns each method reads (the others are removed from its dataset)
METHOD_COLUMNS = {"weighted-dpo": TOKEN_COLUMNS[:2], "tgdpo": TOKEN_COLUMNS[2:], "treg": TOKEN_COLUMNS[2:]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="tokenweave model name or a local model directory")
    parser.add_argument("--batch_size", type=int, default=1, help="preference pairs per step (2x rows)")
    parser.add_argument("--max_length", type=int, default=128, help="DPOConfig.max_length (prompt + completion)")
    parser.add_argument("--difficulty", default="easy", choices=("easy", "medium", "hard"),
                        help="arithmetic task difficulty: hard has ~2x longer completions (SmolLM2: ~44 vs ~21 tokens)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each method per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory_steps", type=int, default=2, help="steps of each memory child")
    parser.add_argument("--tdpo_kl_chunk_size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--no_lora", action="store_true", help="full fine-tuning with a separate reference model")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Trainers and batches
# ---------------------------------------------------------------------------------------------------------------------
def load(args):
    """The base model, its tokenizer and the preference pairs, which every method's trainer shares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenweave.models import resolve_model

    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, preference_data(args, tokenizer)


def preference_data(args, tokenizer):
    """Arithmetic preference pairs with cDPO weights columns (chosen 1, rejected uniform in [0, 1], seeded) and token
    reward columns (uniform in [−0.5, 0.5), seeded)."""
    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.data.token_columns import tokenize_like_dpo

    num_pairs = args.batch_size * max(args.warmup + args.rounds, args.memory_steps)
    dataset = load_arithmetic("train", "preference", num_examples=num_pairs, difficulty=args.difficulty)
    generator = torch.Generator().manual_seed(0)

    def add_weights(row):
        tokenized = tokenize_like_dpo(row, tokenizer)  # the completion tokens DPOTrainer will see
        chosen, rejected = len(tokenized["chosen_ids"]), len(tokenized["rejected_ids"])
        return {
            "chosen_weights": [1.0] * chosen,
            "rejected_weights": torch.rand(rejected, generator=generator).tolist(),
            "chosen_token_rewards": (torch.rand(chosen, generator=generator) - 0.5).tolist(),
            "rejected_token_rewards": (torch.rand(rejected, generator=generator) - 0.5).tolist(),
        }

    return dataset.map(add_weights)


def build_trainer(method, loaded, args, output_dir):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tokenweave.trainers.dpo import TokenDPOConfig, TokenDPOTrainer

    base_model, tokenizer, dataset = loaded
    common = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        activation_checkpointing=False,
        beta=0.1,
        learning_rate=5e-5,
        seed=0,
    )
    if method in ("dpo", CONTROL):
        trainer_class, config = DPOTrainer, DPOConfig(loss_type=["sigmoid"], **common)
    elif method == "weighted-dpo":
        trainer_class, config = TokenDPOTrainer, TokenDPOConfig(loss_type="cdpo", **common)
    elif method == "tdpo2":
        config = TokenDPOConfig(loss_type="tdpo2", tdpo_kl_chunk_size=args.tdpo_kl_chunk_size, **common)
        trainer_class = TokenDPOTrainer
    elif method == "aligndistil":
        config = TokenDPOConfig(loss_type="aligndistil", aligndistil_teacher_model_path=args.model,
                                aligndistil_reverse_model_path=args.model, **common)
        trainer_class = TokenDPOTrainer
    elif method == "tgdpo-online":
        trainer_class, config = TokenDPOTrainer, TokenDPOConfig(loss_type="tgdpo", tgdpo_reward_model_path=args.model,
                                                                **common)
    else:
        trainer_class, config = TokenDPOTrainer, TokenDPOConfig(loss_type=method, **common)
    peft_config = None
    if not args.no_lora:
        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    torch.manual_seed(0)  # the same LoRA initialisation for every method
    trainer = trainer_class(
        model=copy.deepcopy(base_model),
        ref_model=None if peft_config else copy.deepcopy(base_model),
        args=config,
        train_dataset=dataset.remove_columns([name for name in TOKEN_COLUMNS
                                              if name not in METHOD_COLUMNS.get(method, ())]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, which the benchmark steps without
    return trainer


def batches(trainer, args, count):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    if len(rows) < count * args.batch_size:  # DPOTrainer drops pairs whose prompt alone fills max_length
        raise SystemExit(f"only {len(rows)} pairs fit in --max_length {args.max_length}: raise it")
    return [trainer.data_collator(rows[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(count)]


def header(args, trainers, method_batches) -> str:
    dpo_batches = method_batches["dpo"]
    shape = {
        "rows": int(dpo_batches[0]["input_ids"].shape[0]),
        "mean_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in dpo_batches),
        "mean_completion_tokens_per_batch": statistics.mean(int(b["completion_mask"].sum()) for b in dpo_batches),
        "max_row_length": max(int(b["input_ids"].shape[1]) for b in dpo_batches),
    }
    return (f"\nmodel {args.model} (vocabulary {trainers['dpo'].model.config.vocab_size}), batch {shape}, "
            f"{args.threads} thread(s), {'full fine-tuning' if args.no_lora else 'LoRA r16 all-linear'}, "
            f"{args.rounds} timed rounds")


BENCH = Bench(METHODS, CONTROL, TARGETS, load, build_trainer, batches, header,
              same_keys=("input_ids", "completion_mask"))

if __name__ == "__main__":
    main(str(Path(__file__).resolve()), BENCH, parse_args(sys.argv[1:]), sys.argv[1:])
