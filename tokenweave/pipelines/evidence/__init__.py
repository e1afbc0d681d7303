"""``tokenweave evidence``: each token signal against its matched control, on ground truth and perturbation tests,
over paired seeds, in one table (Markdown and JSON) and one figure.

==========================  ====================================================  ===================================
signal                      measurement (unit)                                    control (the same unit)
==========================  ====================================================  ===================================
critical tokens             the lowest-scored token is the first error, hit@1     a random ranking of the same tokens
                            (rejected trajectory; :mod:`.critical`)               (exact)
critical tokens             continuations correct with that token forbidden       a random message token forbidden
                            (cDPO's rollout test; :mod:`.critical`)
TGDPO's, T-REG's token      the lowest-rewarded token is the first error, hit@1   a random ranking of the same tokens
rewards                     (the same rejected trajectories; :mod:`.preference`)  (exact)
attention credit            answer changes when a top-FAI token is replaced by    random tokens of the same trajectory
                            the second-ranked one (:mod:`.perturbation`)
attention credit            credited tokens that are calculation tokens           the share of all its tokens (exact)
HAPO's entropy signal       answer changes at the highest-entropy tokens          random tokens of the same trajectory
                            (forking tokens; :mod:`.perturbation`)
Rank-GRPO's spans           the advantage's sign agrees with the item's           the completion's sequence-level
                            relevance (ranked item; :mod:`.ranks`)                advantage (GRPO)
Rho-1, TokenCleaning,       planted tokens among the m lowest-weighted label      a random ranking of the same tokens
ProFit, DFT, EAFT weights   tokens, R-precision (noisy SFT row; :mod:`.sft`)      (exact, m / n)
cDPO, in learning           held-out accuracy after cDPO on prefix-sharing or     shuffled cDPO; DPO; cDPO on
                            independent pairs, at each step budget (test          independent pairs of the same
                            problem; :mod:`.learning`)                            questions
==========================  ====================================================  ===================================

What each seed varies: the questions (the arithmetic test split and the recommendation requests drawn with that seed;
the critical-token pipeline's sampled training questions and trajectories; the noisy SFT task's ``task_seed``) and
the random controls' draws (and the SFT rows' tie-breaking). The models: the critical-token pipeline's warm start
(LoRA SFT of the base model, ``--critical_config``'s ``warm_start_config``; trained once, shared by the seeds) for the
arithmetic rows, the recommendation warm start (``configs/recommend_sft_smollm2_lora.yaml``, merged) for Rank-GRPO's,
and for the SFT rows the base model with Rho-1's and TokenCleaning's reference (LoRA SFT on the noisy task's clean
split, merged; trained once). ``--budget`` sets the counts (:data:`BUDGETS`: ``cpu`` for two CPU cores, ``gpu`` for
the same command at a larger scale, ``tiny`` a check that the command runs, with ``--critical_config
configs/critical_tiny.yaml``; the SFT rows take their models from the budget: ``configs/sft_*_tiny.yaml`` or
``configs/sft_*_smollm2.yaml``).

Every part of every seed is a resumable step (:mod:`tokenweave.pipelines.steps`) under ``work_dir``: a rerun
reuses what is done and refuses a step made with other settings. The table: ``evidence.md``, ``evidence.json`` (every
unit's pair); the figure (each row's effect and interval): ``evidence.png`` and ``.svg``, written by the command.

:mod:`.run` runs the parts and writes the table; this module holds only what the command line needs (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("critical", "preference", "perturbation", "ranks", "sft", "learning")


@dataclass(frozen=True)
class Budget:
    """The counts of one evidence run, per seed, and the models of its SFT rows."""

    critical_questions: int  # training questions the critical-token pipeline samples (8 trajectories each)
    rollout_trajectories: int  # rejected trajectories in the rollout test
    rollout_samples: int  # continuations per tested token
    perturbation_questions: int  # greedy arithmetic trajectories perturbed
    top_k: int  # tokens perturbed per trajectory, by the signal and at random
    max_new_tokens: int  # of the greedy trajectories and their continuations
    rank_requests: int  # recommendation requests
    rank_samples: int  # lists sampled per request (a GRPO group)
    learning_steps: tuple[int, ...]  # the step budgets of the learning runs
    learning_test_problems: int  # held-out problems each learning run is evaluated on
    prefix_rollouts: int  # continuations tried per rejected trajectory for a prefix-sharing pair
    sft_rows: int  # noisy_arithmetic train rows whose weights are read (30 % noisy: the SFT rows' units)
    sft_configs: str  # the SFT rows' configs: configs/sft_<method>_<this>.yaml (tiny, smollm2)
    sft_flags: tuple[str, ...]  # more arguments for every SFT run and trainer of the part


BUDGETS = {
    "tiny": Budget(critical_questions=4, rollout_trajectories=2, rollout_samples=2, perturbation_questions=2, top_k=1,
                   max_new_tokens=8, rank_requests=2, rank_samples=2, learning_steps=(1,), learning_test_problems=2,
                   prefix_rollouts=2, sft_rows=16, sft_configs="tiny", sft_flags=()),
    "cpu": Budget(critical_questions=64, rollout_trajectories=48, rollout_samples=4, perturbation_questions=48,
                  top_k=3, max_new_tokens=48, rank_requests=32, rank_samples=4, learning_steps=(8, 32),
                  learning_test_problems=100, prefix_rollouts=8, sft_rows=96, sft_configs="smollm2", sft_flags=()),
    "gpu": Budget(critical_questions=256, rollout_trajectories=192, rollout_samples=8, perturbation_questions=256,
                  top_k=3, max_new_tokens=64, rank_requests=256, rank_samples=8, learning_steps=(8, 32, 64),
                  learning_test_problems=500, prefix_rollouts=16, sft_rows=1024, sft_configs="smollm2",
                  sft_flags=("--use_cpu", "false")),
}
