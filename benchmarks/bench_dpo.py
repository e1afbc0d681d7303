"""Step time and peak memory of token-weighted DPO (cDPO) and TDPO2 against TRL's own DPOTrainer (sigmoid).

::

    python benchmarks/bench_dpo.py                                   # SmolLM2-135M-Instruct + LoRA, ~6 min
    python benchmarks/bench_dpo.py --model tiny-llama --max_length 512 --rounds 20   # the tiny random Llama, ~1 min

Three methods, the same model, LoRA config, batches and optimizer; they differ only in the loss:

- ``dpo``: TRL's ``DPOTrainer`` with ``loss_type: sigmoid`` (the baseline);
- ``weighted-dpo``: ``TokenDPOTrainer`` with ``loss_type: cdpo`` and a weight on every completion token (chosen 1,
  rejected a random number in [0, 1], from ``chosen_weights`` / ``rejected_weights`` columns);
- ``tdpo2``: ``TokenDPOTrainer`` with ``loss_type: tdpo2`` (full-vocabulary KL in chunks of
  ``--tdpo_kl_chunk_size`` positions).

One run of this script does both measurements:

**Memory** (first, so the other measurement's models do not share the machine's RAM): each method runs in a fresh
child process (this script with ``--child METHOD``), which loads the model, builds its trainer, collates its batches
and creates the optimizer, then resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), reads its
RSS (the baseline), runs ``--memory_steps`` training steps, and reads the peak RSS (``VmHWM``). Reported: the growth
``peak - baseline``, i.e. what the steps add on top of the loaded model (activations, logits, KL chunks, gradients and
optimizer state, the latter tiny with LoRA), and the total peak. The children run with ``MALLOC_MMAP_THRESHOLD_``
fixed at 128 KiB, so glibc serves every large tensor with its own mmap and returns it to the system when freed: RSS
then follows live memory, instead of keeping freed blocks in the heap. (``tracemalloc`` does not see torch's tensors,
and CPU torch has no ``max_memory_allocated``.)

**Step time** (in this process): the trainers are built side by side (each on its own copy of the model, LoRA
initialised with the same seed) and run round after round on the same batch each round, the order rotated every
round (A B C D, B C D A, ...), so all see the same machine load. The fourth, ``dpo-again``, is a second TRL
``DPOTrainer`` identical to ``dpo``: its ratio to ``dpo`` (1 in a noiseless world) shows how finely this machine
resolves a ratio. A step is ``training_step`` (forward of policy and reference, loss, backward) plus the optimizer
step. Each step records its wall time and the CPU time of this process (``time.process_time``; with one torch
thread, the step's own computation, without the time it waited for a core held by other jobs on a shared machine,
though still slowed by the caches and memory bandwidth they share). The first ``--warmup`` rounds are dropped;
reported are, for each clock, the median step time of each method and the median (and range) over rounds of the
per-round ratio method / dpo.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

METHODS = ("dpo", "weighted-dpo", "tdpo2")
# Timed only: a second, identical TRL DPOTrainer. Its ratio to "dpo" is the noise floor of the time measurement.
CONTROL = "dpo-again"
TIMED = (*METHODS, CONTROL)
TARGETS = {"weighted-dpo": {"time": 1.02, "memory": 1.02}, "tdpo2": {"time": 1.25, "memory": 1.15}}
MMAP_THRESHOLD = str(128 * 1024)


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
def load_base(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenweave.models import resolve_model

    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def preference_data(args, tokenizer):
    """Arithmetic preference pairs with cDPO weights columns (chosen 1, rejected uniform in [0, 1], seeded)."""
    from tokenweave.data.arithmetic import load_arithmetic
    from tokenweave.data.token_columns import tokenize_like_dpo

    num_pairs = args.batch_size * max(args.warmup + args.rounds, args.memory_steps)
    dataset = load_arithmetic("train", "preference", num_examples=num_pairs, difficulty=args.difficulty)
    generator = torch.Generator().manual_seed(0)

    def add_weights(row):
        tokenized = tokenize_like_dpo(row, tokenizer)  # the completion tokens DPOTrainer will see
        return {
            "chosen_weights": [1.0] * len(tokenized["chosen_ids"]),
            "rejected_weights": torch.rand(len(tokenized["rejected_ids"]), generator=generator).tolist(),
        }

    return dataset.map(add_weights)


def build_trainer(method, base_model, tokenizer, dataset, args, output_dir):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tokenweave.trainers.dpo import TokenDPOConfig, TokenDPOTrainer

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
    else:
        config = TokenDPOConfig(loss_type="tdpo2", tdpo_kl_chunk_size=args.tdpo_kl_chunk_size, **common)
        trainer_class = TokenDPOTrainer
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
        train_dataset=dataset if method == "weighted-dpo" else dataset.remove_columns(
            ["chosen_weights", "rejected_weights"]),
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


def train_step(trainer, batch) -> tuple[float, float]:
    """One optimizer step on ``batch``: forward (policy and reference), loss, backward, AdamW step.

    Returns (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------------------------------
# Memory: one child process per method
# ---------------------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def child(args) -> None:
    """Build one method's trainer, then report the RSS growth of ``--memory_steps`` steps as JSON on stdout."""
    torch.set_num_threads(args.threads)
    base_model, tokenizer = load_base(args)
    dataset = preference_data(args, tokenizer)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args.child, base_model, tokenizer, dataset, args, output_dir)
        del base_model
        steps = batches(trainer, args, args.memory_steps)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        baseline = _status_kib("VmRSS")
        seconds = [train_step(trainer, batch)[0] for batch in steps]
        peak = _status_kib("VmHWM")
    tokens = [int(batch["attention_mask"].sum()) for batch in steps]
    print(json.dumps({"method": args.child, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024,
                      "growth_mib": (peak - baseline) / 1024, "seconds": seconds, "tokens": tokens}))


def measure_memory(args, argv) -> dict:
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(args.threads)}
    for method in METHODS:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", method]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[memory] {method}: +{results[method]['growth_mib']:.0f} MiB over {results[method]['baseline_mib']:.0f}"
              f" MiB (peak {results[method]['peak_mib']:.0f} MiB)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Step time: the three trainers in this process, interleaved
# ---------------------------------------------------------------------------------------------------------------------
def measure_time(args) -> dict:
    torch.set_num_threads(args.threads)
    base_model, tokenizer = load_base(args)
    dataset = preference_data(args, tokenizer)
    num_rounds = args.warmup + args.rounds
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {method: build_trainer(method, base_model, tokenizer, dataset, args, output_dir) for method in TIMED}
        del base_model
        method_batches = {method: batches(trainer, args, num_rounds) for method, trainer in trainers.items()}
        for method, method_batch in method_batches.items():  # the same tokens for every method
            for batch, reference in zip(method_batch, method_batches["dpo"], strict=True):
                assert torch.equal(batch["input_ids"], reference["input_ids"]), method
                assert torch.equal(batch["completion_mask"], reference["completion_mask"]), method
        seconds = {clock: {method: [] for method in TIMED} for clock in ("wall", "cpu")}
        for round_index in range(num_rounds):
            order = TIMED[round_index % len(TIMED) :] + TIMED[: round_index % len(TIMED)]
            for method in order:
                wall, cpu = train_step(trainers[method], method_batches[method][round_index])
                seconds["wall"][method].append(wall)
                seconds["cpu"][method].append(cpu)
            print(f"[time] round {round_index + 1}/{num_rounds} (wall / cpu): "
                  + ", ".join(f"{m} {seconds['wall'][m][-1]:.2f}s / {seconds['cpu'][m][-1]:.2f}s" for m in TIMED),
                  flush=True)
        dpo_batches = method_batches["dpo"]
        shape = {
            "rows": int(dpo_batches[0]["input_ids"].shape[0]),
            "mean_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in dpo_batches),
            "mean_completion_tokens_per_batch": statistics.mean(int(b["completion_mask"].sum()) for b in dpo_batches),
            "max_row_length": max(int(b["input_ids"].shape[1]) for b in dpo_batches),
        }
        vocab = trainers["dpo"].model.config.vocab_size
    results = {"seconds": seconds, "batch": shape, "vocab_size": vocab}
    for clock, clock_seconds in seconds.items():
        timed = {method: values[args.warmup :] for method, values in clock_seconds.items()}
        ratios = {method: [a / b for a, b in zip(timed[method], timed["dpo"], strict=True)] for method in TIMED}
        results[clock] = {
            "median_seconds": {method: statistics.median(values) for method, values in timed.items()},
            "paired_ratio_median": {method: statistics.median(values) for method, values in ratios.items()},
            "paired_ratio_min_max": {method: [min(values), max(values)] for method, values in ratios.items()},
        }
    return results


def machine() -> dict:
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    import peft
    import transformers
    import trl

    return {
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


def report(args, memory: dict, timing: dict) -> str:
    """The results as text: one row per method, then the targets, met or missed."""
    base_growth, base_peak = memory["dpo"]["growth_mib"], memory["dpo"]["peak_mib"]
    lines = [
        f"\nmodel {args.model} (vocabulary {timing['vocab_size']}), batch {timing['batch']}, {args.threads} thread(s), "
        f"{'full fine-tuning' if args.no_lora else 'LoRA r16 all-linear'}, {args.rounds} timed rounds",
        f"{'method':<14}{'wall step':>10}{'wall ratio (min-max)':>24}{'CPU step':>10}{'CPU ratio (min-max)':>24}"
        f"{'step growth':>13}{'ratio':>8}{'peak RSS':>10}{'ratio':>8}",
    ]
    for method in TIMED:
        cells = [f"{method:<14}"]
        for clock in ("wall", "cpu"):
            low, high = timing[clock]["paired_ratio_min_max"][method]
            cells.append(f"{timing[clock]['median_seconds'][method]:>9.2f}s"
                         f"{timing[clock]['paired_ratio_median'][method]:>10.3f}x ({low:.2f}-{high:.2f})")
        if method in memory:
            growth, peak = memory[method]["growth_mib"], memory[method]["peak_mib"]
            cells.append(f"{growth:>9.0f} MiB{growth / base_growth:>7.3f}x{peak:>6.0f} MiB{peak / base_peak:>7.3f}x")
        else:
            cells.append(f"{'(timing control: the noise floor)':>39}")
        lines.append("".join(cells))
    for method, target in TARGETS.items():
        checks = [(f"{clock} time", timing[clock]["paired_ratio_median"][method], target["time"])
                  for clock in ("wall", "cpu")]
        checks.append(("step memory", memory[method]["growth_mib"] / base_growth, target["memory"]))
        verdicts = [f"{name} {value:.3f}x <= {limit}x {'met' if value <= limit else 'MISSED'}"
                    for name, value, limit in checks]
        lines.append(f"target {method}: " + "; ".join(verdicts))
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tokenweave from this checkout
    if args.child:
        child(args)
        return
    started = time.time()
    load_before = os.getloadavg()
    memory = measure_memory(args, argv)
    timing = measure_time(args)
    results = {
        "command": "python benchmarks/bench_dpo.py " + " ".join(argv),
        "machine": machine(),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "wall_seconds": time.time() - started,
        "settings": {key: value for key, value in vars(args).items() if key not in ("child", "output")},
        "memory": memory,
        "time": timing,
    }
    print(report(args, memory, timing))
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
