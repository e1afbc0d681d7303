"""Step time and step memory of TokenSFTTrainer with no token signal against TRL's own SFTTrainer.

::

    python benchmarks/bench_sft.py                                   # SmolLM2-135M-Instruct + LoRA, ~5 min
    python benchmarks/bench_sft.py --model tiny-llama --rounds 30    # the tiny random Llama, ~1 min

Two methods, the same model, LoRA config, batches and optimizer:

- ``sft``: TRL's ``SFTTrainer`` (the baseline);
- ``token-sft``: ``TokenSFTTrainer`` with no token signal: its loss is the labelled mirror of TRL's (fused LM head,
  ``token_weighted_nll`` with no weights, TRL's metrics), and the signal host around it has nothing to do;
- ``sft-again`` (timed only): a second TRL ``SFTTrainer``, the A/A control.

The measurement is :mod:`step_bench`'s (memory in one child process per method, step time interleaved round by
round). Targets: ``token-sft`` within 1.02x of ``sft`` in step time (ratio of the medians, wall and CPU) and 1.01x in
step memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tokenweave from this checkout
from step_bench import Bench, main  # noqa: E402

METHODS = ("sft", "token-sft")
CONTROL = "sft-again"
TARGETS = {"token-sft": {"time": 1.02, "memory": 1.01}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="tokenweave model name or a local model directory")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per step")
    parser.add_argument("--difficulty", default="medium", choices=("easy", "medium", "hard"),
                        help="arithmetic task difficulty (longer worked solutions at medium and hard)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of each method per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory_steps", type=int, default=2, help="steps of each memory child")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load(args):
    """The base model and its tokenizer, which every method's trainer copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenweave.models import resolve_model

    path = resolve_model(args.model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def build_trainer(method, loaded, args, output_dir):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer

    base_model, tokenizer = loaded
    num_examples = args.batch_size * max(args.warmup + args.rounds, args.memory_steps)
    dataset = load_arithmetic("train", "sft", num_examples=num_examples, difficulty=args.difficulty)
    common = dict(output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                  per_device_train_batch_size=args.batch_size, activation_checkpointing=False, learning_rate=5e-5,
                  seed=0, shuffle_dataset=False)
    trainer_class, config = ((TokenSFTTrainer, TokenSFTConfig(**common)) if method == "token-sft"
                             else (SFTTrainer, SFTConfig(**common)))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)  # the same LoRA initialisation for every method
    trainer = trainer_class(model=copy.deepcopy(base_model), args=config, train_dataset=dataset,
                            processing_class=tokenizer, peft_config=lora)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop, which the benchmark steps without
    return trainer


def batches(trainer, args, count):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return [trainer.data_collator(rows[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(count)]


def header(args, trainers, method_batches) -> str:
    tokens = [int(batch["attention_mask"].sum()) for batch in method_batches["sft"]]
    return (f"\nmodel {args.model} (vocabulary {trainers['sft'].model.config.vocab_size}), batch {args.batch_size} "
            f"({sum(tokens) / len(tokens):.0f} tokens a batch on average), {args.threads} thread(s), LoRA r16 "
            f"all-linear, {args.rounds} timed rounds")


BENCH = Bench(METHODS, CONTROL, TARGETS, load, build_trainer, batches, header,
              same_keys=("input_ids", "labels"), time_statistic="ratio_of_medians")

if __name__ == "__main__":
    main(str(Path(__file__).resolve()), BENCH, parse_args(sys.argv[1:]), sys.argv[1:])
