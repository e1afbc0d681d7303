"""The ``tokenweave`` command.

    tokenweave train --config configs/sft_tiny.yaml [--key value ...]
    tokenweave eval --model smollm2-135m [--adapter out/checkpoint] [--output results.json]
    tokenweave sample --model smollm2-135m --output data/samples [--num_samples_per_prompt 4]
    tokenweave pairs --samples data/samples --output data/pairs
    tokenweave critical --config configs/critical_tiny.yaml [--key value ...]
    tokenweave score-tokens --config configs/sft_token_cleaning_tiny.yaml [--output DIR]
    tokenweave token-rewards --config configs/treg_tiny.yaml [--reward_model DIR] [--output DIR]
    tokenweave heatmap --scores outputs/critical_tokens/pairs --output page.html [--terminal]
    tokenweave attention-heatmap --model smollm2-135m [--config run.yaml] --output page.html [--terminal]
    tokenweave sft-heatmap --config configs/sft_weight_rules_tiny.yaml [--rows 8] [--output page.html] [--terminal]
    tokenweave dpo-heatmap --config configs/tgdpo_tiny.yaml [--rows 8] [--output page.html] [--terminal]
    tokenweave grpo-heatmap --config configs/rlsd_tiny.yaml [--prompts 2] [--output page.html] [--terminal]
    tokenweave localize --pairs outputs/critical_tokens/pairs [--output report.json]
    tokenweave evidence [--seeds 0 1 2 3 4] [--budget cpu] [--parts critical ...] [--work_dir outputs/evidence]
    tokenweave plot outputs/run_a outputs/run_b --output plots/
    tokenweave env
    tokenweave quickstart
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

QUICKSTART_HEATMAP_FILE = "critical_tokens.html"  # under the quickstart's output_dir
QUICKSTART_PLOTS_DIR = "plots"  # the training curves and runs.md, under the quickstart's output_dir
HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
REFUSED_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, ImportError)
"""What a command raises for an input it refuses (an option, a config key, a path, a missing extra): printed as one
line, ``tokenweave <command>: error: <what, where, the fix>``, with exit status 2, as argparse refuses a flag.
``tokenweave --debug <command>`` (or ``--debug`` after a command that takes no config, where it is no training
option: not after ``train``, where ``--debug`` is transformers' option) or ``TOKENWEAVE_DEBUG=1`` shows the traceback
instead."""
DEBUG_VARIABLE = "TOKENWEAVE_DEBUG"
DEBUG_HELP = "Show the traceback of a refused input instead of its one line."


def _task_arguments(args) -> dict:
    """The keyword arguments ``eval`` and ``sample`` share: the model and the task's questions."""
    return dict(
        adapter=args.adapter,
        task=args.task,
        split=args.split,
        num_examples=args.num_examples,
        difficulty=args.difficulty,
        task_seed=args.task_seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )


def _eval_command(args) -> None:
    from .inference.evaluate import evaluate_model

    result = evaluate_model(
        args.model, **_task_arguments(args), list_length=args.task_list_length,
        num_candidates=args.task_num_candidates, output=args.output,
    )
    print(json.dumps({key: value for key, value in result.items() if key != "samples"}, indent=2))


def _sample_command(args) -> None:
    from .inference.sampling import sample_trajectories

    samples = sample_trajectories(
        args.model,
        **_task_arguments(args),
        num_samples_per_prompt=args.num_samples_per_prompt,
        temperature=args.temperature,
        seed=args.seed,
    )
    samples.save_to_disk(args.output)
    print(f"wrote {len(samples)} trajectories ({sum(samples['correct'])} correct) to {args.output}")


def _pairs_command(args) -> None:
    from datasets import load_from_disk

    from .data.preferences import build_preference_pairs

    pairs = build_preference_pairs(load_from_disk(args.samples), reference_fallback=args.reference_fallback)
    pairs.save_to_disk(args.output)
    print(f"wrote {len(pairs)} preference pairs to {args.output}")


def _train_command(argv: list[str]) -> None:
    """``tokenweave train``: under ``accelerate launch`` when launch flags are given (:mod:`tokenweave.launch`),
    else in this process. The raw config's cheap checks (:mod:`tokenweave.preflight`) run first, before torch and TRL
    are imported; under launch flags the whole config is parsed and checked here, once, before any worker starts."""
    from .launch import launch_arguments_parser, launch_settings, planned_processes, relaunch
    from .preflight import check_raw_run_config, config_file_of

    if {"-h", "--help"} & set(argv):
        from .train import train

        print(launch_arguments_parser().format_help())
        train(argv)  # the method's options, as TrlParser lists them
        return
    check_raw_run_config(argv, config_file_of(argv))
    from .config import parse_run_config, planned_world_size, run_option_names
    from .train import check_writable, train

    options = run_option_names(argv)
    launch, run_argv = launch_settings(argv, options)
    if launch and "LOCAL_RANK" not in os.environ:  # checked here once, as the workers will parse it
        with planned_world_size(planned_processes(launch)):
            check_writable(Path(parse_run_config(run_argv)[1].output_dir))
    if not relaunch("tokenweave.train", argv, options):
        train(argv)


def _critical_command(argv: list[str]) -> None:
    """``tokenweave critical``: the pipeline in this process, its training steps under ``accelerate launch`` when
    launch flags are given (:mod:`tokenweave.launch`)."""
    from .config import config_keys
    from .launch import launch_arguments_parser, launch_settings
    from .pipelines.critical import CriticalPipelineConfig, parse_pipeline_config, run_critical_pipeline

    if {"-h", "--help"} & set(argv):
        print(launch_arguments_parser().format_help())
    elif "--config" not in argv:
        sys.exit("tokenweave critical needs --config FILE.yaml, the pipeline config (e.g. configs/critical_tiny.yaml); "
                 "--help lists its fields.")
    launch, argv = launch_settings(argv, config_keys(CriticalPipelineConfig))
    outputs = run_critical_pipeline(parse_pipeline_config(argv), launch=launch)
    for step, path in outputs.items():
        print(f"{step:>10}: {path}")


def _score_tokens_command(args) -> None:
    """``tokenweave score-tokens``: TokenCleaning's token scores and labels of an SFT run's train split
    (:mod:`tokenweave.pipelines.token_scores`)."""
    from .config import load_run_config
    from .pipelines.token_scores import format_summary, score_tokens

    print(format_summary(score_tokens(*load_run_config(args.config), args.output, batch_size=args.batch_size)))


def _token_rewards_command(args) -> None:
    """``tokenweave token-rewards``: TGDPO's or T-REG's per-token rewards of a DPO run's train split
    (:mod:`tokenweave.pipelines.token_rewards`)."""
    from .config import load_run_config
    from .pipelines.token_rewards import format_summary, token_rewards

    print(format_summary(token_rewards(*load_run_config(args.config), args.output, reward_model=args.reward_model,
                                       batch_size=args.batch_size)))


def _heatmap_command(args) -> None:
    from datasets import load_from_disk

    from .heatmap import render_terminal, terminal_color, trajectories_from_dataset

    trajectories = trajectories_from_dataset(
        load_from_disk(args.scores), max_examples=args.max_examples, weight_chosen=args.cdpo_weight_chosen
    )
    if args.terminal:
        print(render_terminal(trajectories, color=terminal_color(sys.stdout), threshold=args.threshold), end="")
    if args.output:
        _write_heatmap_page(args.output, trajectories, title=f"Critical tokens: {args.scores}")
        print(f"wrote {len(trajectories)} scored trajectories to {args.output}")


def _attention_heatmap_command(args) -> None:
    from .preflight import read_config_file
    from .heatmap import render_credit_html, render_credit_terminal, terminal_color
    from .inference.attention_credit import sample_credit_trajectories
    from .trainers.attention import credit_options

    options = credit_options(read_config_file(args.config) if args.config else {}, source=str(args.config))
    trajectories = sample_credit_trajectories(
        args.model, adapter=args.adapter, options=options, task=args.task, split=args.split,
        num_examples=args.num_examples, difficulty=args.difficulty, task_seed=args.task_seed,
        num_samples_per_prompt=args.num_samples_per_prompt, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
    )
    if args.terminal:
        print(render_credit_terminal(trajectories, options=options, color=terminal_color(sys.stdout)), end="")
    if args.output:
        page = render_credit_html(trajectories, options=options, title=f"Attention credit: {args.model}")
        Path(args.output).write_text(page, encoding="utf-8")
        print(f"wrote {len(trajectories)} credited completions to {args.output}")


def _sft_heatmap_command(args) -> None:
    """``tokenweave sft-heatmap``: the weights an SFT run's token signals put on its first rows' label tokens
    (:func:`tokenweave.heatmap.sft_weights_from_config`), planted noise outlined."""
    from .heatmap import (
        render_sft_html,
        render_sft_terminal,
        sft_weights_from_config,
        terminal_color,
    )

    view = sft_weights_from_config(args.config, num_rows=args.rows)
    common = {"method": view.method, "options": view.options, "selection": view.selection}
    if args.terminal:
        print(render_sft_terminal(view.rows, color=terminal_color(sys.stdout), **common), end="")
    if args.output:
        page = render_sft_html(view.rows, title=f"SFT token weights: {view.method}", source=args.config, **common)
        Path(args.output).write_text(page, encoding="utf-8")
        print(f"wrote {len(view.rows)} weighted rows to {args.output}")


def _signal_view_command(args) -> None:
    """``tokenweave dpo-heatmap`` / ``grpo-heatmap``: the per-token values a DPO run's token signals give its
    token-level loss for its first pairs' chosen and rejected completions
    (:func:`tokenweave.heatmap.dpo_signals_from_config`), or a GRPO run's policy loss for completions of its first
    prompts, with each token's advantage (:func:`tokenweave.heatmap.grpo_signals_from_config`)."""
    from .heatmap import (
        dpo_signals_from_config,
        grpo_signals_from_config,
        render_dpo_html,
        render_dpo_terminal,
        terminal_color,
    )

    trainer = "grpo" if args.command == "grpo-heatmap" else "dpo"
    view = (grpo_signals_from_config(args.config, num_prompts=args.prompts) if trainer == "grpo"
            else dpo_signals_from_config(args.config, num_rows=args.rows))
    common = {"method": view.method, "options": view.options}
    if args.terminal:
        print(render_dpo_terminal(view.rows, color=terminal_color(sys.stdout), **common), end="")
    if args.output:
        page = render_dpo_html(view.rows, title=f"{trainer.upper()} token signals: {view.method}", source=args.config,
                               trainer=trainer, **common)
        Path(args.output).write_text(page, encoding="utf-8")
        print(f"wrote {len(view.rows)} completions' token values to {args.output}")


def _localize_command(args) -> None:
    from datasets import load_from_disk

    from .pipelines.localization import format_localization, localization_report

    report = localization_report(load_from_disk(args.pairs))
    print(format_localization(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote the report to {args.output}")


def _evidence_command(args) -> None:
    """Every token signal against its control (:mod:`tokenweave.pipelines.evidence`): the table and the figure."""
    from .pipelines.evidence.run import CRITICAL_CONFIG, run_evidence, write_evidence
    from .plots import plot_evidence

    measurements = run_evidence(args.work_dir, args.seeds, budget=args.budget, parts=args.parts,
                                critical_config=args.critical_config or CRITICAL_CONFIG)
    paths = write_evidence(measurements, args.work_dir)
    figures = plot_evidence(measurements, Path(args.work_dir) / "evidence")
    print(paths["markdown"].read_text(), end="")
    print("\n".join(f"wrote {path}" for path in [*paths.values(), *figures]))


def _quickstart_command(args) -> None:
    """The quickstart (:mod:`tokenweave.pipelines.quickstart`), its summary, and the heatmap page of its pairs."""
    from datasets import load_from_disk

    from .preflight import read_config_file
    from .heatmap import trajectories_from_dataset
    from .pipelines.quickstart import NUM_TEST_EXAMPLES, PIPELINE_DIR, format_summary, quickstart_config, run_quickstart
    from .plots import plot_command

    num_test_examples = NUM_TEST_EXAMPLES if args.num_test_examples is None else args.num_test_examples
    results = run_quickstart(args.output_dir, seed=args.seed, num_test_examples=num_test_examples)
    print("[quickstart 3/3] critical-token heatmap")
    cdpo_config = quickstart_config(args.output_dir, args.seed).cdpo_config
    trajectories = trajectories_from_dataset(
        load_from_disk(str(Path(args.output_dir) / PIPELINE_DIR / "pairs")),
        weight_chosen=bool(read_config_file(cdpo_config).get("cdpo_weight_chosen", False)),
    )
    heatmap = Path(args.output_dir) / QUICKSTART_HEATMAP_FILE
    _write_heatmap_page(heatmap, trajectories, title="Critical tokens found by the contrastive estimate")
    figures, table = plot_command(list(results["runs"].values()), str(Path(args.output_dir) / QUICKSTART_PLOTS_DIR),
                                  accuracies={row["name"]: row["accuracy"] for row in results["rows"]},
                                  names=list(results["runs"]))
    print(format_summary(results))
    print(f"Heatmap of {len(trajectories)} scored trajectories: {heatmap}")
    print(f"Training curves: {', '.join(str(path) for path in figures)}; runs compared: {table}")


def _plot_command(args) -> None:
    from .plots import plot_command

    figures, table = plot_command(args.runs, args.output)
    print("\n".join(f"wrote {path}" for path in [*figures, table]))


def _env_command(args) -> None:
    from .environment import environment, format_environment

    print(format_environment(environment()), end="")


def _write_heatmap_page(path, trajectories, title: str) -> None:
    from .heatmap import render_html

    Path(path).write_text(render_html(trajectories, title=title), encoding="utf-8")


def _add_task_arguments(parser: argparse.ArgumentParser, default_num_examples: int | None) -> None:
    parser.add_argument("--model", required=True, help="Built-in model name, local directory or hub id.")
    parser.add_argument("--adapter", default=None, help="A LoRA adapter directory to load on the model.")
    parser.add_argument(
        "--task", default="arithmetic",
        help="Built-in task (arithmetic, recommendation) or a dataset with prompt/answer columns.",
    )
    parser.add_argument("--split", default="test", help="The split of the task or dataset to use.")
    parser.add_argument("--num_examples", type=int, default=default_num_examples,
                        help="Questions to use (a built-in task generates this many; a dataset is cut to it).")
    parser.add_argument("--difficulty", default="easy", help="Built-in arithmetic task: easy, medium or hard.")
    parser.add_argument("--task_seed", type=int, default=0, help="Built-in tasks: the seed of the generated questions.")
    parser.add_argument("--batch_size", type=int, default=32, help="Prompts per generate() call.")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="Most tokens generated per completion.")


class _VersionAction(argparse.Action):
    """``--version``: the version and the git commit (:func:`tokenweave.provenance.version_string`, which asks git:
    only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .provenance import version_string

        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from .pipelines.evidence import BUDGETS, PARTS

    parser = argparse.ArgumentParser(prog="tokenweave", description="Token-aware fine-tuning and RL on top of TRL.",
                                     epilog=f"A refused input ends a command with one line; tokenweave --debug "
                                     f"<command> (or {DEBUG_VARIABLE}=1) shows its traceback.")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="Print tokenweave's version and git commit.")
    parser.add_argument("--debug", action="store_true",
                        help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str, passes_arguments: bool = False, **kwargs) -> argparse.ArgumentParser:
        """A subcommand whose --help shows every option's default; ``handler(args)`` runs it, or, when it
        ``passes_arguments`` (train, critical), ``handler(the command line after its name)``, for a config parser
        of its own."""
        subcommand = commands.add_parser(name, help=help, description=help, formatter_class=HELP_FORMAT,
                                         add_help=not passes_arguments, **kwargs)
        subcommand.set_defaults(handler=handler, passes_arguments=passes_arguments, needs_output=False)
        if not passes_arguments:
            subcommand.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help=DEBUG_HELP)
        return subcommand

    command("train", _train_command, passes_arguments=True,
            help="Train from a YAML config (all further arguments go to the config parser).")

    evaluate = command(
        "eval", _eval_command, help="Greedy accuracy (arithmetic) or Recall@k / NDCG@k (recommendation) on a task's test split."
    )
    _add_task_arguments(evaluate, default_num_examples=200)
    evaluate.add_argument("--task_list_length", type=int, default=5,
                          help="Recommendation task: the items each answer lists (N of Recall@N / NDCG@N).")
    evaluate.add_argument("--task_num_candidates", type=int, default=12,
                          help="Recommendation task: the candidate items in each prompt.")
    evaluate.add_argument("--output", default=None, help="Write the result (with every sample) as JSON here.")

    sample = command("sample", _sample_command, help="Sample trajectories per question and label them with a reward.")
    _add_task_arguments(sample, default_num_examples=None)
    sample.set_defaults(split="train")
    sample.add_argument("--num_samples_per_prompt", type=int, default=4, help="Trajectories sampled per question.")
    sample.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    sample.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    sample.add_argument("--output", required=True, help="Directory for the dataset (save_to_disk).")

    pairs = command("pairs", _pairs_command, help="Build preference pairs from labelled trajectories.")
    pairs.add_argument("--samples", required=True, help="Output directory of `tokenweave sample`.")
    pairs.add_argument("--output", required=True, help="Directory for the pairs (save_to_disk).")
    pairs.add_argument(
        "--reference_fallback",
        action="store_true",
        help="When no sample of a question is correct, use the task's reference solution as chosen.",
    )

    command(
        "critical", _critical_command, passes_arguments=True,
        help="Critical-token pipeline (cDPO): sample, positive/negative LoRA models, scored pairs, cDPO "
        "(all further arguments go to its config parser).",
    )

    score = command(
        "score-tokens", _score_tokens_command,
        help="TokenCleaning (arXiv 2502.01968): score every label token of an SFT run's train split with the base "
        "model and reference_model_path (L_base - L_ref), label the top token_cleaning_ratio, and write the dataset "
        "with per-token columns for the token_cleaning signal (train on it with --dataset_name DIR).",
    )
    score.add_argument("--config", required=True, help="The SFT run config (the YAML the training then uses).")
    score.add_argument("--output", default=None,
                       help="Directory for the scored dataset (save_to_disk); default: the run's output_dir + "
                       "'_token_scores'.")
    score.add_argument("--batch_size", type=int, default=None,
                       help="Rows per forward pass of each model (default: the config's per_device_eval_batch_size).")

    rewards = command(
        "token-rewards", _token_rewards_command,
        help="TGDPO (arXiv 2506.14574) and T-REG (arXiv 2412.02685): compute the per-token rewards of a DPO run's "
        "train split with frozen models (TGDPO: the reward model minus the reference; T-REG: the source model under "
        "the two revision prompts), and write the dataset with the token-reward columns the tgdpo and treg signals "
        "read (train on it with --dataset_name DIR).",
    )
    rewards.add_argument("--config", required=True, help="The DPO run config (the YAML the training then uses).")
    rewards.add_argument("--reward_model", default=None,
                         help="TGDPO: the DPO-trained reward model (a path or built-in name); default: the config's "
                         "tgdpo_reward_model_path.")
    rewards.add_argument("--output", default=None,
                         help="Directory for the dataset (save_to_disk); default: the run's output_dir + "
                         "'_token_rewards'.")
    rewards.add_argument("--batch_size", type=int, default=None,
                         help="Sequences per forward pass of each model (default: the config's "
                         "per_device_eval_batch_size).")

    heatmap = command("heatmap", _heatmap_command, help="Show critical-token scores as an HTML page or in the terminal.")
    heatmap.set_defaults(needs_output=True)
    heatmap.add_argument("--scores", required=True, help="A scored dataset directory (`tokenweave critical`'s pairs/).")
    heatmap.add_argument("--output", default=None, help="Write the self-contained HTML page here.")
    heatmap.add_argument("--terminal", action="store_true", help="Print the scored tokens to the terminal.")
    heatmap.add_argument("--max_examples", type=int, default=None, help="Show only the first N rows.")
    heatmap.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="Terminal without colours: mark tokens scoring below this as [token|score].",
    )

    heatmap.add_argument(
        "--cdpo_weight_chosen",
        action="store_true",
        help="The cDPO run weights chosen tokens by their scores (else they are drawn as unused by the loss).",
    )

    attention = command(
        "attention-heatmap", _attention_heatmap_command,
        help="Sample completions and show the attention credit (γ, WAAD, FAI) the attention_credit signal gives their "
        "tokens, as an HTML page or in the terminal.",
    )
    _add_task_arguments(attention, default_num_examples=4)
    attention.set_defaults(batch_size=8, max_new_tokens=64, needs_output=True)
    attention.add_argument("--config", default=None,
                           help="A run config whose attention_credit_* options are used (default: the paper's).")
    attention.add_argument("--num_samples_per_prompt", type=int, default=2, help="Completions sampled per question.")
    attention.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    attention.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    attention.add_argument("--output", default=None, help="Write the self-contained HTML page here.")
    attention.add_argument("--terminal", action="store_true", help="Print the credited tokens to the terminal.")

    sft_heatmap = command(
        "sft-heatmap", _sft_heatmap_command,
        help="Show the weights an SFT run's token signals (dft, eaft, asft, profit, rho1, ...) put on the label tokens "
        "of the first rows of its train dataset, before training, as an HTML page or in the terminal; the planted "
        "tokens of the noisy_arithmetic task outlined.",
    )
    sft_heatmap.set_defaults(needs_output=True)
    sft_heatmap.add_argument("--config", required=True, help="The SFT run config (with token_signals).")
    sft_heatmap.add_argument("--rows", type=int, default=8, help="The first N rows of the prepared train dataset.")
    sft_heatmap.add_argument("--output", default=None, help="Write the self-contained HTML page here.")
    sft_heatmap.add_argument("--terminal", action="store_true", help="Print the weighted tokens to the terminal.")

    def signal_view(name: str, help: str, config_help: str, count: str, count_help: str, default: int) -> None:
        """A view of the values a run config's token signals give its loss (``dpo-heatmap``, ``grpo-heatmap``)."""
        view = command(name, _signal_view_command, help=help)
        view.set_defaults(needs_output=True)
        view.add_argument("--config", required=True, help=config_help)
        view.add_argument(count, type=int, default=default, help=count_help)
        view.add_argument("--output", default=None, help="Write the self-contained HTML page here.")
        view.add_argument("--terminal", action="store_true", help="Print the valued tokens to the terminal.")

    signal_view(
        "dpo-heatmap",
        "Show the per-token values a DPO run's token signals give its token-level loss (token_rewards of tgdpo and "
        "treg, token_weights of cdpo, weights and weight_rules, distillation_loss of aligndistil, ...) for the chosen "
        "and rejected completions of the first pairs of its train dataset, before training, as an HTML page or in the "
        "terminal.",
        "The DPO run config (with a token-level loss_type).", "--rows",
        "The first N pairs of the prepared train dataset.", 8,
    )
    signal_view(
        "grpo-heatmap",
        "Show each completion token's advantage and the per-token values a GRPO run's token signals give its policy "
        "loss (RLSD's factor, attention credit's per-token advantages, HAPO's entropy signal, ...) for completions "
        "the model samples for the first prompts of its train dataset, before training, as an HTML page or in the "
        "terminal.",
        "The GRPO run config (with token_signals).", "--prompts",
        "The first N prompts of the prepared train dataset (num_generations_eval each).", 2,
    )

    localize = command(
        "localize", _localize_command,
        help="hit@k / MRR of the lowest critical-token scores against each rejected trajectory's first error "
        "(arithmetic task), next to a random ranking.",
    )
    localize.add_argument("--pairs", required=True, help="A scored pairs directory (`tokenweave critical`'s pairs/).")
    localize.add_argument("--output", default=None, help="Write the report as JSON here.")

    quickstart = command(
        "quickstart", _quickstart_command,
        help="Offline demo: the critical-token pipeline on SmolLM2 with a warm start; localization and rollout "
        "evidence; base, warm start, DPO, cDPO and shuffled-cDPO accuracy.",
    )
    quickstart.add_argument("--output_dir", default="quickstart_output", help="Where every step, model and report goes.")
    quickstart.add_argument(
        "--seed", type=int, default=0, help="Seed of sampling, of the positive/negative SFT runs and of the shuffle."
    )
    quickstart.add_argument(
        "--num_test_examples", type=int, default=None,
        help="Held-out problems each model is evaluated on (default: 16).",
    )

    evidence = command(
        "evidence", _evidence_command,
        help="Each token signal against its matched random control on ground truth and perturbation tests, over "
             "paired seeds: one table (evidence.md, evidence.json) and one figure (evidence.png, .svg) in --work_dir.",
    )
    evidence.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="Seeds (at least 5 to report).")
    evidence.add_argument("--budget", choices=list(BUDGETS), default="cpu",
                          help="The counts per seed: cpu (two CPU cores), gpu (the same at a larger scale) or tiny "
                               "(a check that the command runs, with --critical_config configs/critical_tiny.yaml).")
    evidence.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                          help="The measurements to run: critical (localization, rollout test), preference (TGDPO's "
                               "and T-REG's token rewards on the same trajectories), perturbation (attention credit, "
                               "HAPO's entropy), ranks (Rank-GRPO), sft (Rho-1's, TokenCleaning's, ProFit's, DFT's, "
                               "EAFT's weights against the planted noise of noisy_arithmetic), learning (cDPO on "
                               "prefix-sharing and independent pairs against DPO and shuffled cDPO at each step "
                               "budget: the longest).")
    evidence.add_argument("--work_dir", default="outputs/evidence", help="Where the steps, the table and the figure go.")
    evidence.add_argument("--critical_config", default=None,
                          help="The critical-token pipeline config of the arithmetic rows (its warm start is their "
                               "model; default: the repository's configs/critical_smollm2_full.yaml).")
    plot = command("plot", _plot_command, help="Training curves of one or more runs as PNG and SVG (loss, rewards, token-aware metrics) and a "
                   "Markdown table comparing them (runs.md).")
    plot.add_argument("runs", nargs="+", help="Run output directories (run_info.json, or checkpoint-N/).")
    plot.add_argument("--output", required=True, help="Directory for the PNG and SVG files and runs.md.")

    command("env", _env_command, help="Versions of tokenweave and its stack, devices, accelerate config, model cache.")
    return parser


class _ProgressHandler(logging.StreamHandler):
    """tokenweave's progress messages (INFO and up, logger ``tokenweave``) on the command's standard output, as it is
    when each message is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # not setStream: it flushes the previous stream, which may be closed by now
        super().emit(record)


def show_progress() -> None:
    """Show the progress that tokenweave's modules log (the pipelines' steps, the quickstart's stages), once."""
    logger = logging.getLogger("tokenweave")
    if not any(isinstance(handler, _ProgressHandler) for handler in logger.handlers):
        logger.addHandler(_ProgressHandler())
        logger.setLevel(logging.INFO)



PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_PARSERS = ("parse_run_config", "parse_pipeline_config")


def is_refused_input(error: BaseException) -> bool:
    """Whether ``error`` (a :data:`REFUSED_INPUT` type) refuses an input: raised by tokenweave's own code (its checks
    of options, data, paths, checkpoints) or while a config was parsed (TRL's checks of its options), not from deep in
    a library while the work ran (a bug there keeps its traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and (Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)
                             or any(frame.name in CONFIG_PARSERS for frame in frames))


def refuse(command: str, error: BaseException) -> None:
    """Print ``error`` as the one-line refusal of ``command`` (:data:`REFUSED_INPUT`) and exit with status 2."""
    first, *more = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    message = f"{first} {'; '.join(more)}" if more else first
    print(f"tokenweave {command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The ``tokenweave`` command: argparse's subcommands, each with its handler (:func:`build_parser`); an input it
    refuses ends it with one line (:data:`REFUSED_INPUT`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    show_progress()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "critical" and "--debug" in rest:  # the pipeline has no option of that name
        rest.remove("--debug")
        args.debug = True
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    if not args.passes_arguments:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.needs_output and not (args.output or args.terminal):
            parser.error(f"{args.command} needs --output, --terminal or both.")
    try:
        args.handler(rest if args.passes_arguments else args)
    except REFUSED_INPUT as error:
        if debug or not is_refused_input(error):
            raise
        refuse(args.command, error)


if __name__ == "__main__":
    main()
