"""Step time and step memory of TokenSFTTrainer, with no token signal and with each token-weighted SFT method,
against TRL's own SFTTrainer.

::

    python benchmarks/bench_sft.py                                   # SmolLM2-135M-Instruct + LoRA, every method
    python benchmarks/bench_sft.py --methods token-sft               # TRL SFT against the no-signal trainer, ~5 min
    python benchmarks/bench_sft.py --methods weights,dft --rounds 8  # a few methods
    python benchmarks/bench_sft.py --methods rho1-online,rho1-global --gradient_accumulation_steps 2
    python benchmarks/bench_sft.py --model tiny-llama --rounds 30    # the tiny random Llama, ~1-2 min

The same model, LoRA config, batches and optimizer for every method; they differ in the trainer and its signal:

- ``sft``: TRL's ``SFTTrainer`` (the baseline, always run);
- ``token-sft``: ``TokenSFTTrainer`` with no token signal: its loss is the labelled mirror of TRL's (fused LM head,
  ``token_weighted_nll`` with no weights, TRL's metrics), and the signal host around it has nothing to do;
- ``weights``: the ``weights`` signal, a ``token_weights`` column of random weights in [0, 1), one per label token
  (counted with TRL's own dataset preparation, :func:`~tokenweave.pipelines.token_scores.sft_labelled_rows`);
- ``dft``, ``profit``: the policy's own label probabilities (no extra pass), DFT's weight and ProFit's selection at
  their defaults;
- ``rho1-column``: ``rho1`` reading its reference log-probs from a column (``rho1_reference_column``; random values
  in (-5, 0]: a speed test, the selection is meaningless);
- ``token_cleaning``: its label (random 0/1) and score (random normal) columns;
- ``eaft``: EAFT's top-20 entropy, from the signal's own chunked head pass over the final hidden states
  (``eaft_chunk_size`` 1024 label positions, the default); ``eaft-exact``: the fused head's exact entropy instead
  (``eaft_entropy: exact``, no extra head pass);
- ``rho1-online``: ``rho1`` with ``reference_model_path`` the same model loaded a second time (one more forward
  without gradient per micro-batch) and ``rho1_scope: micro_batch``; ``rho1-global`` (not in the default set): the
  same with ``rho1_scope: global_batch``, which differs only with ``--gradient_accumulation_steps`` > 1 (the step's
  micro-batches are scored first: one more policy forward without gradient and the reference's, per micro-batch);
- ``asft``: DFT's weight plus α·KL(π_ref ‖ π_θ) over the whole vocabulary, both heads applied in chunks (the
  reference: the policy with its LoRA adapter off);
- ``sstoken``: the excess loss over the history model (the policy with its adapter off) and the prompt attention of
  the last layer (one more decoder forward without gradient);
- ``sft-again`` (timed only): a second TRL ``SFTTrainer``, the A/A control.

With ``--gradient_accumulation_steps`` G > 1 an optimizer step is G micro-batches of ``--batch_size`` rows, for every
method, run as Trainer's loop runs them (``get_batch_samples``, which lets the signals see the step's micro-batches,
then ``training_step`` on each with the step's ``num_items_in_batch``).

The measurement is :mod:`step_bench`'s (memory in one child process per method, step time interleaved round by round,
the order rotated). Targets (time: the ratio of the medians, wall and CPU; memory: the step's RSS growth):
``token-sft`` 1.02x / 1.01x; ``weights``, ``dft``, ``profit``, ``rho1-column``, ``token_cleaning`` 1.02x / 1.02x;
``eaft`` 1.05x / 1.05x; ``rho1-online`` 1.5x in time. ``eaft-exact``, ``asft``, ``sstoken`` and ``rho1-global`` are
measured, with no target. The header gives the size of one float32 ``[B, T, V]`` logits tensor of the memory steps'
largest batch: a method that built one for the whole batch would grow by about that much over ``sft``.
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
from step_bench import Bench, main, micro_batches  # noqa: E402

BASELINE = "sft"
CONTROL = "sft-again"
# method → (token_signals, TokenSFTConfig options); a callable option takes the args (model paths are resolved late)
SIGNALS = {
    "token-sft": ([], {}),
    "weights": (["weights"], {}),
    "dft": (["dft"], {}),
    "profit": (["profit"], {}),
    "rho1-column": (["rho1"], {"rho1_reference_column": "reference_logps"}),
    "token_cleaning": (["token_cleaning"], {}),
    "eaft": (["eaft"], {"eaft_entropy": "top_k", "eaft_top_k": 20}),
    "eaft-exact": (["eaft"], {"eaft_entropy": "exact"}),
    "rho1-online": (["rho1"], {"rho1_scope": "micro_batch", "reference_model_path": "model"}),
    "rho1-global": (["rho1"], {"rho1_scope": "global_batch", "reference_model_path": "model"}),
    "asft": (["asft"], {}),
    "sstoken": (["sstoken"], {}),
}
METHODS = (BASELINE, *SIGNALS)
DEFAULT_METHODS = tuple(method for method in METHODS if method != "rho1-global")
TARGETS = {
    "token-sft": {"time": 1.02, "memory": 1.01},
    **{method: {"time": 1.02, "memory": 1.02}
       for method in ("weights", "dft", "profit", "rho1-column", "token_cleaning")},
    "eaft": {"time": 1.05, "memory": 1.05},
    "rho1-online": {"time": 1.5},  # no memory target
}


def method_list(value: str) -> tuple[str, ...]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    chosen = [method for name in names for method in (DEFAULT_METHODS if name == "all" else (name,))]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'all'")
    return (BASELINE, *dict.fromkeys(name for name in chosen if name != BASELINE))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="tokenweave model name or a local model directory")
    parser.add_argument("--methods", type=method_list, default=method_list("all"),
                        help=f"comma-separated methods besides the baseline sft; 'all': every one but rho1-global: "
                             f"{', '.join(METHODS[1:])}")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--difficulty", default="medium", choices=("easy", "medium", "hard"),
                        help="arithmetic task difficulty (longer worked solutions at medium and hard)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of each method per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory_steps", type=int, default=2, help="steps of each memory child")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=(*METHODS, CONTROL), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load(args):
    """The base model and its tokenizer, which every method's trainer copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenweave.models import resolve_model

    path = resolve_model(args.model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def random_columns(dataset, tokenizer, config, columns: dict):
    """``dataset`` with per-label-token columns ``{name: draw(n, generator)}``, one value per token TRL's SFTTrainer
    labels in each row (counted with TRL's own dataset preparation, untruncated, as the signals' columns are read),
    drawn with a generator seeded by the row."""
    from tokenweave.pipelines.token_scores import sft_labelled_rows

    counts = [sum(label != -100 for label in row["labels"])
              for row in sft_labelled_rows(dataset, tokenizer, config)]
    for name, draw in columns.items():
        dataset = dataset.add_column(
            name, [draw(n, torch.Generator().manual_seed(1000 + row)).tolist() for row, n in enumerate(counts)])
    return dataset


COLUMNS = {
    "weights": {"token_weights": lambda n, g: torch.rand(n, generator=g)},
    "rho1-column": {"reference_logps": lambda n, g: -5 * torch.rand(n, generator=g)},
    "token_cleaning": {"token_cleaning_labels": lambda n, g: (torch.rand(n, generator=g) < 0.6).long(),
                       "token_cleaning_scores": lambda n, g: torch.randn(n, generator=g)},
}


def build_trainer(method, loaded, args, output_dir):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.models import resolve_model
    from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer

    base_model, tokenizer = loaded
    steps = max(args.warmup + args.rounds, args.memory_steps)
    num_examples = args.batch_size * args.gradient_accumulation_steps * steps
    dataset = load_arithmetic("train", "sft", num_examples=num_examples, difficulty=args.difficulty)
    common = dict(output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                  per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.gradient_accumulation_steps, activation_checkpointing=False,
                  learning_rate=5e-5, seed=0, shuffle_dataset=False)
    if method in (BASELINE, CONTROL):
        trainer_class, config = SFTTrainer, SFTConfig(**common)
    else:
        signals, options = SIGNALS[method]
        options = {key: resolve_model(args.model) if key == "reference_model_path" else value
                   for key, value in options.items()}
        trainer_class, config = TokenSFTTrainer, TokenSFTConfig(**common, token_signals=signals, **options)
        if method in COLUMNS:
            dataset = random_columns(dataset, tokenizer, config, COLUMNS[method])
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(0)  # the same LoRA initialisation for every method
    trainer = trainer_class(model=copy.deepcopy(base_model), args=config, train_dataset=dataset,
                            processing_class=tokenizer, peft_config=lora)
    trainer.create_optimizer()
    # set by Trainer's train loop, which the benchmark steps without
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def batches(trainer, args, count):
    """``count`` steps: each a collated batch, or with gradient accumulation a list of its micro-batches."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    micro = [trainer.data_collator(rows[i * args.batch_size : (i + 1) * args.batch_size])
             for i in range(count * args.gradient_accumulation_steps)]
    if args.gradient_accumulation_steps == 1:
        return micro
    size = args.gradient_accumulation_steps
    return [micro[i * size : (i + 1) * size] for i in range(count)]


def header(args, trainers, method_batches) -> str:
    tokens = [sum(int(batch["attention_mask"].sum()) for batch in micro_batches(step))
              for step in method_batches[BASELINE]]
    vocabulary = trainers[BASELINE].model.config.vocab_size
    memory_batches = [batch for step in method_batches[BASELINE][: args.memory_steps] for batch in micro_batches(step)]
    largest = max(memory_batches, key=lambda batch: batch["input_ids"].numel())["input_ids"].shape
    logits_mib = largest.numel() * vocabulary * 4 / 2**20
    accumulation = (f" x {args.gradient_accumulation_steps} micro-batches (gradient accumulation)"
                    if args.gradient_accumulation_steps > 1 else "")
    return (f"\nmodel {args.model} (vocabulary {vocabulary}), batch {args.batch_size}{accumulation} "
            f"({sum(tokens) / len(tokens):.0f} tokens a step on average), {args.threads} thread(s), LoRA r16 "
            f"all-linear, {args.rounds} timed rounds; one float32 [B, T, V] logits tensor of the memory steps' "
            f"largest micro-batch [{largest[0]}, {largest[1]}, {vocabulary}]: {logits_mib:.0f} MiB")


def bench(args) -> Bench:
    return Bench(args.methods, CONTROL, {method: TARGETS[method] for method in args.methods if method in TARGETS},
                 load, build_trainer, batches, header, same_keys=("input_ids", "labels"),
                 time_statistic="ratio_of_medians")


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    main(str(Path(__file__).resolve()), bench(arguments), arguments, sys.argv[1:])
