"""Step time of TokenGRPOTrainer with HAPO (every part on) or Rank-GRPO against TRL's GRPOTrainer, and of
attention credit and RLSD on against off.

::

    python benchmarks/bench_grpo.py      # tiny-llama, 2 x (5 + 50) steps: ~1.5 min on 2 shared CPU cores
    python benchmarks/bench_grpo.py --model smollm2-135m --steps 6 --warmup 1 --batch_size 4 \
        --max_completion_length 16       # SmolLM2-135M-Instruct: ~16 s a step there, ~5 min in all
    python benchmarks/bench_grpo.py --method rank_grpo     # Rank-GRPO on the recommendation task
    python benchmarks/bench_grpo.py --method attention_credit --model smollm2-135m --steps 8 --warmup 1
    python benchmarks/bench_grpo.py --method rlsd --model smollm2-135m --steps 8 --warmup 1   # target <= 1.15x

One process, one run: the two trainers get the same model, the same prompts (same sampler seed), the same rewards
and the same generation / batch settings, and differ only in the method:

- ``--method hapo`` (the arithmetic task, rewards correctness, format, closeness):
  - ``hapo``: ``TokenGRPOTrainer`` with ``policy_loss: hapo``: adaptive-temperature sampling (a logits processor in
    ``generate``), token-level group advantages, advantage redistribution, adaptive clip bounds, dual clip 10, plus
    tokenweave's entropy quantile metrics;
  - ``trl-dapo``: TRL's ``GRPOTrainer`` with ``loss_type: dapo`` (ε 0.2 / 0.28).
- ``--method rank_grpo`` (the recommendation task, reward ndcg, lists of 5):
  - ``rank_grpo``: ``TokenGRPOTrainer`` with ``policy_loss: rank_grpo``: after generation the completions' rank
    spans (decoding, bisection over prefixes), per-rank gains, rewards and group advantages with length shaping;
    the rank-level ratio in the loss (ε 0.06 / 0.08);
  - ``trl-sequence``: TRL's ``GRPOTrainer`` with ``loss_type: dapo``, ``importance_sampling_level: sequence``
    (ε 0.06 / 0.08): the same loss with one span per completion.
- ``--method attention_credit`` (the arithmetic task, as hapo), the component on against off:
  - ``attention_credit``: ``TokenGRPOTrainer`` with ``loss_type: dapo`` and ``token_signals: [attention_credit]``
    (the paper's defaults: after each generation one no-grad banded forward of 5 middle layers, head groups,
    WAAD, FAI and the coupled γ);
  - ``no-credit``: the same trainer and loss without the signal.
- ``--method rlsd`` (the arithmetic task, as hapo), the component on against off (the issue's target: <= 1.15x):
  - ``rlsd``: ``TokenGRPOTrainer`` with ``policy_loss: dapo`` and ``token_signals: [rlsd]`` (the released recipe's
    frozen teacher, re-synced every 20 steps, but λ held at 0.5 (``rlsd_lambda_decay_steps: 0``) so that every step
    pays for the teacher: one no-grad forward over teacher prompt + completion after each generation, the factor in
    the loss);
  - ``dapo``: the same trainer and loss without the signal (a plain GRPO step).

Each trainer runs its own ``train()`` in a thread; a baton passed in callbacks lets exactly one of them run at a
time and alternates them step by step (A, B, A, B, ...), so both see the same machine load. A step is timed from
``on_step_begin`` to ``on_step_end``: generation, rewards, advantages, forward / backward and the optimizer step
(one generation per step: ``steps_per_generation`` = GA = 1). The first ``--warmup`` steps of each are dropped;
reported are medians over ``--steps`` steps and the median of the paired ratios (step i of hapo / step i of
trl-dapo). HAPO's sampler changes what is sampled, and generation time follows completion lengths, so by default
every completion is generated to ``--max_completion_length`` tokens (``min_new_tokens``) for both trainers;
``--natural_lengths`` lets them stop at EOS (mean lengths are reported either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from tokenweave.data.arithmetic import load_arithmetic  # noqa: E402
from tokenweave.data.recommendation import load_recommendation  # noqa: E402
from tokenweave.models import resolve_model  # noqa: E402
from tokenweave.rewards import get_reward_func  # noqa: E402
from tokenweave.trainers import TokenGRPOConfig, TokenGRPOTrainer  # noqa: E402

REWARDS = ("correctness", "format", "closeness")


class Baton:
    """Lets one named runner go at a time, in round-robin order; a finished runner is skipped."""

    def __init__(self, names):
        self.names = list(names)
        self.turn = 0
        self.finished = set()
        self.condition = threading.Condition()

    def wait(self, name):
        with self.condition:
            self.condition.wait_for(lambda: self.names[self.turn] == name)

    def release(self, name, finished=False):
        with self.condition:
            if finished:
                self.finished.add(name)
            if self.names[self.turn] == name and len(self.finished) < len(self.names):
                self.turn = (self.turn + 1) % len(self.names)
                while self.names[self.turn] in self.finished:
                    self.turn = (self.turn + 1) % len(self.names)
            self.condition.notify_all()


class InterleavedTimer(TrainerCallback):
    """Times each optimizer step and hands the baton over after it; holds the baton between steps (logging, data)."""

    def __init__(self, name, baton):
        self.name, self.baton = name, baton
        self.step_times = []
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.baton.wait(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.started)
        print(f"[{self.name}] step {state.global_step}: {self.step_times[-1]:.3f} s", file=sys.stderr, flush=True)
        self.baton.release(self.name)
        self.baton.wait(self.name)

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.release(self.name, finished=True)


def build_trainers(args, model_path, output_root):
    common = dict(
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        beta=0.0,
        temperature=1.0,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )
    if not args.natural_lengths:
        common["generation_kwargs"] = {"min_new_tokens": args.max_completion_length}
    if args.method == "hapo":
        common.update(epsilon=0.2, epsilon_high=0.28)
        dataset = load_arithmetic("train", "prompt", args.num_prompts)
        rewards = [get_reward_func(name) for name in REWARDS]
        configs = {
            "hapo": (TokenGRPOTrainer, TokenGRPOConfig(
                output_dir=os.path.join(output_root, "hapo"), policy_loss="hapo", dual_clip_c=10.0, **common)),
            "trl-dapo": (GRPOTrainer, GRPOConfig(
                output_dir=os.path.join(output_root, "trl-dapo"), loss_type="dapo", **common)),
        }
        hapo_args = configs["hapo"][1]
        assert hapo_args.hapo_adaptive_temperature and hapo_args.hapo_token_advantage
        assert hapo_args.hapo_adaptive_advantage and hapo_args.hapo_adaptive_clip
    elif args.method == "attention_credit":
        common.update(epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
        dataset = load_arithmetic("train", "prompt", args.num_prompts)
        rewards = [get_reward_func(name) for name in REWARDS]
        configs = {
            "attention_credit": (TokenGRPOTrainer, TokenGRPOConfig(
                output_dir=os.path.join(output_root, "attention_credit"), token_signals=["attention_credit"],
                **common)),
            "no-credit": (TokenGRPOTrainer, TokenGRPOConfig(
                output_dir=os.path.join(output_root, "no-credit"), **common)),
        }
    elif args.method == "rlsd":
        common.update(epsilon=0.2, epsilon_high=0.28, policy_loss="dapo")
        dataset = load_arithmetic("train", "prompt", args.num_prompts)
        rewards = [get_reward_func(name) for name in REWARDS]
        configs = {
            "rlsd": (TokenGRPOTrainer, TokenGRPOConfig(
                output_dir=os.path.join(output_root, "rlsd"), token_signals=["rlsd"], rlsd_lambda_decay_steps=0,
                **common)),
            "dapo": (TokenGRPOTrainer, TokenGRPOConfig(output_dir=os.path.join(output_root, "dapo"), **common)),
        }
    else:
        common.update(epsilon=0.06, epsilon_high=0.08)
        dataset = load_recommendation("train", num_examples=args.num_prompts)
        rewards = [get_reward_func("ndcg")]
        configs = {
            "rank_grpo": (TokenGRPOTrainer, TokenGRPOConfig(
                output_dir=os.path.join(output_root, "rank_grpo"), policy_loss="rank_grpo", rank_list_length=5,
                rank_catalog="recommendation", **common)),
            "trl-sequence": (GRPOTrainer, GRPOConfig(
                output_dir=os.path.join(output_root, "trl-sequence"), loss_type="dapo",
                importance_sampling_level="sequence", **common)),
        }
    trainers = {}
    for name, (trainer_class, config) in configs.items():
        torch.manual_seed(args.seed)
        trainers[name] = trainer_class(model=model_path, reward_funcs=rewards, args=config, train_dataset=dataset)
        trainers[name].remove_callback(PrinterCallback)  # the logs stay in trainer.state.log_history
    return trainers


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as output_root:
        trainers = build_trainers(args, model_path, output_root)
        baton = Baton(trainers)
        timers = {}
        errors = {}

        def train(name, trainer):
            try:
                trainer.train()
            except BaseException as error:  # re-raised in the main thread
                errors[name] = error
                baton.release(name, finished=True)

        threads = []
        for name, trainer in trainers.items():
            timers[name] = InterleavedTimer(name, baton)
            trainer.add_callback(timers[name])
            threads.append(threading.Thread(target=train, args=(name, trainer), name=name))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        if errors:
            raise next(iter(errors.values()))

    result = {"model": args.model, "wall_seconds": wall, "trainers": {}}
    for name, trainer in trainers.items():
        times = timers[name].step_times[args.warmup:]
        logs = [entry for entry in trainer.state.log_history if "loss" in entry][args.warmup:]
        result["trainers"][name] = {
            "median_s": statistics.median(times),
            "mean_s": statistics.fmean(times),
            "min_s": min(times),
            "max_s": max(times),
            "step_times_s": times,
            "mean_completion_length": statistics.fmean(entry["completions/mean_length"] for entry in logs),
            "trl_step_time_median_s": statistics.median(entry["step_time"] for entry in logs),
        }
    ours, trl = result["trainers"].values()  # tokenweave's first, as built
    result["ratio_of_medians"] = ours["median_s"] / trl["median_s"]
    result["median_paired_ratio"] = statistics.median(
        h / t for h, t in zip(ours["step_times_s"], trl["step_times_s"], strict=True)
    )
    return result


def markdown(args, result) -> str:
    command = "python benchmarks/bench_grpo.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{command.strip()}`",
        "",
        f"model `{args.model}`, batch {args.batch_size} completions ({args.num_generations} per prompt), "
        f"{args.max_completion_length} completion tokens"
        f"{' (natural lengths)' if args.natural_lengths else ' (every completion generated to this length)'}, "
        f"{args.warmup} warm-up + {args.steps} measured steps each, interleaved; torch threads {args.threads}; "
        f"{os.cpu_count()} CPUs visible ({platform.machine()}); wall {result['wall_seconds']:.0f} s",
        "",
        "| trainer | median step (s) | mean (s) | min-max (s) | TRL `step_time` median (s) | mean completion length |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["trainers"].items():
        lines.append(
            f"| {name} | {row['median_s']:.3f} | {row['mean_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} "
            f"| {row['trl_step_time_median_s']:.3f} | {row['mean_completion_length']:.1f} |"
        )
    lines += [
        "",
        f"ratio {' / '.join(result['trainers'])}: **{result['ratio_of_medians']:.3f}x** (ratio of medians), "
        f"{result['median_paired_ratio']:.3f}x (median of paired step ratios)",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="hapo", choices=["hapo", "rank_grpo", "attention_credit", "rlsd"], help="the method timed (above)")
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, smollm2-135m or a local model directory")
    parser.add_argument("--steps", type=int, default=50, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="steps per trainer dropped before measuring")
    parser.add_argument("--batch_size", type=int, default=8, help="completions per step")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--natural_lengths", action="store_true", help="let completions stop at EOS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the full result (every step time) to this file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print(markdown(args, result))
    return result


if __name__ == "__main__":
    main()
