"""Step time and step memory of tokenweave trainers against TRL's, measured the same way for every trainer: the
machinery of ``bench_dpo.py`` and ``bench_sft.py`` (each builds its trainers and batches; this module measures).

**Memory** (first, so the other measurement's models do not share the machine's RAM): each method runs in a fresh
child process (the benchmark script with ``--child METHOD``), which loads the model, builds its trainer, collates its
batches and creates the optimizer, then resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), reads
its RSS (the baseline), runs its training steps, and reads the peak RSS (``VmHWM``). Reported: the growth ``peak -
baseline``, i.e. what the steps add on top of the loaded model (activations, logits, KL chunks, gradients and
optimizer state, the latter tiny with LoRA), and the total peak. The children run with ``MALLOC_MMAP_THRESHOLD_``
fixed at 128 KiB, so glibc serves every large tensor with its own mmap and returns it to the system when freed: RSS
then follows live memory, instead of keeping freed blocks in the heap. (``tracemalloc`` does not see torch's tensors,
and CPU torch has no ``max_memory_allocated``.)

**Step time** (in the benchmark's process): the trainers are built side by side (each on its own copy of the model,
LoRA initialised with the same seed) and run round after round on the same batch each round, the order rotated every
round (A B C D, B C D A, ...), so all see the same machine load. A control, a second trainer identical to the
baseline, is timed too: its ratio to the baseline (1 in a noiseless world) shows how finely this machine resolves a
ratio (the A/A control). A step is ``training_step`` (forward, loss, backward) plus the optimizer step. Each step
records its wall time and the CPU time of this process (``time.process_time``; with one torch thread, the step's own
computation, without the time it waited for a core held by other jobs on a shared machine, though still slowed by the
caches and memory bandwidth they share). The first warm-up rounds are dropped; reported are, for each clock, the
median step time of each method, the ratio of the medians to the baseline's, and the median (and range) over rounds
of the per-round ratio method / baseline.
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MMAP_THRESHOLD = str(128 * 1024)


def micro_batches(step) -> list[dict]:
    """The micro-batches of a step: a batch, or a list of them (gradient accumulation)."""
    return step if isinstance(step, list) else [step]


def train_step(trainer, batch) -> tuple[float, float]:
    """One optimizer step on ``batch``: ``training_step`` (forward, loss, backward) and the optimizer's step. A list
    of micro-batches (gradient accumulation) runs as Trainer's loop runs them: ``get_batch_samples`` (which counts
    ``num_items_in_batch``, and in which a trainer may look at the step's micro-batches), then ``training_step`` on
    each.

    Returns (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    if isinstance(batch, list):
        samples, num_items_in_batch = trainer.get_batch_samples(iter(batch), len(batch), trainer.args.device)
        for micro_batch in samples:
            trainer.training_step(trainer.model, micro_batch, num_items_in_batch)
    else:
        trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(method: str, trainer, steps: list[dict], tokens_key: str = "attention_mask") -> None:
    """In a ``--child`` process: the RSS growth of training ``trainer`` on ``steps``, printed as JSON (module
    docstring)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    baseline = _status_kib("VmRSS")
    seconds = [train_step(trainer, batch)[0] for batch in steps]
    peak = _status_kib("VmHWM")
    tokens = [sum(int(batch[tokens_key].sum()) for batch in micro_batches(step)) for step in steps]
    print(json.dumps({"method": method, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024,
                      "growth_mib": (peak - baseline) / 1024, "seconds": seconds, "tokens": tokens}))


def measure_memory(script: str, argv: list[str], methods: tuple[str, ...], threads: int) -> dict:
    """Each method's :func:`memory_child`, in a fresh process of ``script`` (module docstring)."""
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(threads)}
    for method in methods:
        command = [sys.executable, script, *argv, "--child", method]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[memory] {method}: +{results[method]['growth_mib']:.0f} MiB over {results[method]['baseline_mib']:.0f}"
              f" MiB (peak {results[method]['peak_mib']:.0f} MiB)", flush=True)
    return results


def measure_time(trainers: dict, method_batches: dict[str, list[dict]], baseline: str, warmup: int) -> dict:
    """The interleaved step times of ``trainers`` (method → trainer), each on its own batches, round after round
    (module docstring); ratios against ``baseline``."""
    methods = tuple(trainers)
    num_rounds = len(method_batches[baseline])
    seconds = {clock: {method: [] for method in methods} for clock in ("wall", "cpu")}
    for round_index in range(num_rounds):
        order = methods[round_index % len(methods):] + methods[: round_index % len(methods)]
        for method in order:
            wall, cpu = train_step(trainers[method], method_batches[method][round_index])
            seconds["wall"][method].append(wall)
            seconds["cpu"][method].append(cpu)
        print(f"[time] round {round_index + 1}/{num_rounds} (wall / cpu): "
              + ", ".join(f"{m} {seconds['wall'][m][-1]:.2f}s / {seconds['cpu'][m][-1]:.2f}s" for m in methods),
              flush=True)
    results = {"seconds": seconds}
    for clock, clock_seconds in seconds.items():
        timed = {method: values[warmup:] for method, values in clock_seconds.items()}
        ratios = {method: [a / b for a, b in zip(timed[method], timed[baseline], strict=True)] for method in methods}
        medians = {method: statistics.median(values) for method, values in timed.items()}
        results[clock] = {
            "median_seconds": medians,
            "ratio_of_medians": {method: medians[method] / medians[baseline] for method in methods},
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


def report(header: str, methods: tuple[str, ...], baseline: str, memory: dict, timing: dict, targets: dict,
           time_statistic: str = "paired_ratio_median") -> str:
    """The results as text: one row per method (a method without memory numbers is the timing control), then each
    target (``{method: {"time": limit, "memory": limit}}``, the memory limit optional), met or missed, on
    ``time_statistic``."""
    base_growth, base_peak = memory[baseline]["growth_mib"], memory[baseline]["peak_mib"]
    lines = [
        header,
        f"{'method':<14}{'wall step':>10}{'wall ratio (min-max)':>24}{'CPU step':>10}{'CPU ratio (min-max)':>24}"
        f"{'step growth':>13}{'ratio':>8}{'peak RSS':>10}{'ratio':>8}",
    ]
    for method in methods:
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
    lines.append("ratio of medians (wall / CPU): " + ", ".join(
        f"{method} {timing['wall']['ratio_of_medians'][method]:.3f}x / {timing['cpu']['ratio_of_medians'][method]:.3f}x"
        for method in methods))
    for method, target in targets.items():
        checks = [(f"{clock} time", timing[clock][time_statistic][method], target["time"]) for clock in ("wall", "cpu")]
        if "memory" in target:
            checks.append(("step memory", memory[method]["growth_mib"] / base_growth, target["memory"]))
        verdicts = [f"{name} {value:.3f}x <= {limit}x {'met' if value <= limit else 'MISSED'}"
                    for name, value, limit in checks]
        lines.append(f"target {method}: " + "; ".join(verdicts))
    return "\n".join(lines)


@dataclass
class Bench:
    """What a benchmark script gives :func:`main`: its methods (the baseline first), the timing control, the targets
    (``{method: {"time": limit, "memory": limit}}``, the memory limit optional), and how to load what the trainers
    share (``load(args)``), build one (``build(method, loaded, args, output_dir)``), collate its batches
    (``batches(trainer, args, count)``: a step is a batch, or a list of micro-batches) and describe them
    (``header(args, trainers, batches)``); ``same_keys``: the batch keys every method must see equal;
    ``time_statistic``: what the time targets read."""

    methods: tuple[str, ...]
    control: str
    targets: dict
    load: Callable
    build: Callable
    batches: Callable
    header: Callable
    same_keys: tuple[str, ...] = ("input_ids",)
    time_statistic: str = "paired_ratio_median"


def main(script: str, bench: Bench, args, argv: list[str]) -> dict | None:
    """Run a benchmark (module docstring): with ``args.child`` set, the memory child of that method; otherwise the
    memory children, then the step times, the report printed; returns the results (written to ``args.output``
    too)."""
    torch.set_num_threads(args.threads)
    if args.child:
        loaded = bench.load(args)
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = bench.build(args.child, loaded, args, output_dir)
            del loaded
            memory_child(args.child, trainer, bench.batches(trainer, args, args.memory_steps))
        return None
    started = time.time()
    load_before = os.getloadavg()
    memory = measure_memory(script, argv, bench.methods, args.threads)
    loaded = bench.load(args)
    baseline = bench.methods[0]
    with tempfile.TemporaryDirectory() as output_dir:
        trainers = {method: bench.build(method, loaded, args, output_dir) for method in (*bench.methods, bench.control)}
        del loaded
        method_batches = {method: bench.batches(trainer, args, args.warmup + args.rounds)
                          for method, trainer in trainers.items()}
        for method, batches in method_batches.items():  # the same tokens for every method
            for step, reference_step in zip(batches, method_batches[baseline], strict=True):
                for batch, reference in zip(micro_batches(step), micro_batches(reference_step), strict=True):
                    for key in bench.same_keys:
                        assert torch.equal(batch[key], reference[key]), (method, key)
        timing = measure_time(trainers, method_batches, baseline, args.warmup)
        header = bench.header(args, trainers, method_batches)
    results = {
        "command": f"python benchmarks/{Path(script).name} " + " ".join(argv),
        "machine": machine(),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "wall_seconds": time.time() - started,
        "settings": {key: value for key, value in vars(args).items() if key not in ("child", "output")},
        "memory": memory,
        "time": timing,
    }
    print(report(header, (*bench.methods, bench.control), baseline, memory, timing, bench.targets,
                 bench.time_statistic))
    print(f"wall time {results['wall_seconds']:.0f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results
