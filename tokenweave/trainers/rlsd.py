"""RLSD (Yang et al., "Self-Distilled RLVR", arXiv 2604.03128) as the GRPO token signal ``rlsd``.

A privileged teacher, the policy given the reference answer in its prompt, scores the completion tokens the policy
sampled; each token's advantage becomes (:mod:`tokenweave.tokens.rlsd`)::

    δ_t = sg(log π_T(y_t | x, answer, y_<t) − log π(y_t | x, y_<t))
    A_t = A · [(1 − λ) + λ · clip(exp(sign(A) · δ_t), 1 − ε, 1 + ε)]      λ = 0.5 → 0 over 60 steps, ε = 0.2

Defaults: the authors' released recipe (iie-ycx/RLSD ``examples/visual_rl/rlsd_train.sh``: ``freeze_teacher_model``,
``rlsd_teacher_sync_interval=20``, ``rlsd_lambda_decay_steps=60``, ``disable_kl``):

- ``rlsd_teacher: frozen``: the teacher is ``trainers.frozen``'s ``history`` model, a frozen copy of the policy's
  initial weights that takes the policy's weights every ``rlsd_teacher_sync_steps`` (20) optimizer steps (the
  history model's ``history_sync_steps``, set from it; with LoRA the copy takes W + ΔW). Its log-probs come from one
  extra no-grad forward per generation, over teacher prompt + completion (:meth:`RlsdSignal.after_generation`);
  the released code runs it per micro-batch in the update, which gives the same numbers since the teacher only
  changes after an update. The student's log-probs are the current policy's, per micro-batch (the loss's own, no
  extra forward), as released; on-policy they are the sampling policy's.
- ``rlsd_teacher: dynamic`` (ms-swift's ``advantage_reweight=rlsd`` without a ``teacher_model``): the teacher is the
  policy that sampled (with its adapter), and both log-probs are those of the rollout: the teacher's from the same
  extra forward, the student's TRL's π_old (``old_per_token_logps``, or the loss's own on-policy).

The factor multiplies the per-token loss as the signal's ``token_weights``: for every registered policy loss (PPO
clip with or without dual clip, CISPO, GSPO, ...) a positive per-token factor on the loss is the same as on the
advantage, and TRL's ``beta`` KL term (added after) is left alone. So the signal needs a ``policy_loss`` (refused
without one, with TRL's ``loss_type`` path); the recipe's loss is ``dapo`` (clip 0.2 / 0.28, token-mean) with dual
clip 3 (EasyR1's ``clip_ratio_dual``) and no KL. λ follows the optimizer step being trained (counted from 1, as the
released code; ``tokens.rlsd.rlsd_lambda``); once it has decayed to 0, the teacher forward is skipped and the run is
GRPO. The sign of A is read after generation, from the advantages the signals before this one left.

The teacher's prompt (``rlsd_teacher_template``): the student's prompt with its last user message replaced by the
template filled with ``{prompt}`` (that message's text: the task's instruction and question) and ``{answer}`` (the
row's ``rlsd_answer_column``); a plain-text prompt is replaced whole. It is tokenised as TRL tokenises the student's
(``GRPOTrainer._tokenize_prompts``: chat template, tools, ``chat_template_kwargs``) and left-padded; the completion
follows unchanged, so the teacher's log-prob of token t is read at the same completion position.

What the released code does differently (besides ``tokens.rlsd``'s):

- Its teacher prompt (``teacher_hint_self_distill.jinja``, ``opsd_trainer.py``) is the raw question (the dataset's
  ``problem``, not the student's formatted prompt), then "Here is a reference solution:" with the ground-truth answer
  (the recipe's ``data.trajectory_key=answer`` names the column already read as the answer, so the hint falls back
  to the ground truth), then "After understanding the reference solution, please try to solve this problem using
  your own approach below." and its own copy of the task's format instruction. The default template here keeps the
  student's whole user message (instruction and question, so the format asked for is the one the student saw) in
  place of the raw question and its repeated instruction, and the released wording around the answer.
- Its λ is computed once per rollout (one optimizer step per rollout there); here per optimizer step, which is the
  same with one step per generation and follows the schedule when a generation spans several steps.
- With several optimizer steps per generation (``steps_per_generation`` > GA), a teacher sync may fall between two
  steps of one generation; the teacher log-probs of that generation stay the pre-sync ones (released: one step per
  rollout, no such case).
- ms-swift's dynamic mode takes the student's log-probs at rollout time, the released code the current policy's: the
  two modes here follow each.

``signal_control: shuffle`` (the host's random control) puts each completion's factors on a random permutation of
its tokens (the same values, so the same total up- and down-weighting). Logged, over the completion tokens of all
processes: ``rlsd/lambda``, ``rlsd/factor_mean``, ``rlsd/delta_mean`` (mean δ), ``rlsd/clip_low_frac`` and
``rlsd/clip_high_frac`` (shares of tokens whose evidence weight was clipped).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from ..checks import NON_NEGATIVE, UNIT, ConfigError, Range
from ..registry import Paper
from ..tokens.rlsd import rlsd_factor, rlsd_lambda, rlsd_lambda_is_over
from .rollout import Generation
from .signals import TokenBatch, TokenSignal, register_token_signal

RLSD_PAPER = Paper("Self-Distilled RLVR", "2604.03128", "yang2026rlsd", "Chenxu Yang and others", 2026)
RLSD_TEACHERS = ("frozen", "dynamic")
RELEASED_SYNC_STEPS = 20
"""The released recipe's ``rlsd_teacher_sync_interval``."""
TEACHER_LOGPS = "rlsd_teacher_logps"
"""The generation batch's column of the teacher's log-probs of the completion tokens ``[B, T]``."""
ADVANTAGE_SIGN = "rlsd_advantage_sign"
"""The generation batch's column of the sign of each token's advantage ``[B, T]``."""
DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution:\n{answer}\n\nAfter understanding the reference solution, please try "
    "to solve this problem using your own approach below."
)
TEMPLATE_FIELDS = ("prompt", "answer")


def _check_template(template) -> str | None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except (ValueError, TypeError) as error:
        return f"rlsd_teacher_template is not a format string ({error}); write a literal brace as {{{{ or }}}}"
    unknown = sorted(set(names) - set(TEMPLATE_FIELDS))
    if unknown:
        return f"rlsd_teacher_template names {unknown}; it may name only {{prompt}} and {{answer}}"
    if "answer" not in names:
        return "rlsd_teacher_template must contain {answer}: the teacher's privileged information"
    return None


@dataclass
class RlsdConfig:
    """The ``rlsd`` signal's fields of ``TokenGRPOConfig`` (a mixin; module docstring)."""

    option_ranges: ClassVar[dict] = {
        "rlsd_lambda": UNIT, "rlsd_epsilon": Range(0, 1, high_open=True), "rlsd_lambda_warmup_steps": NON_NEGATIVE,
        "rlsd_lambda_decay_steps": NON_NEGATIVE, "rlsd_teacher_sync_steps": NON_NEGATIVE,
    }
    option_rules: ClassVar[dict] = {"rlsd_teacher_template": _check_template}

    rlsd_lambda: float = field(
        default=0.5, metadata={"help": "RLSD: λ, the share of each token's advantage the teacher reweights "
                                       "((1 − λ) + λ·w_t; 0: GRPO). The peak of its schedule."})
    rlsd_epsilon: float = field(
        default=0.2, metadata={"help": "RLSD: ε, the evidence weight exp(sign(A)·δ_t) is clipped to [1 − ε, 1 + ε]."})
    rlsd_lambda_warmup_steps: int = field(
        default=0, metadata={"help": "RLSD: λ rises linearly from 0 over this many optimizer steps (0: none, the "
                                     "recipe)."})
    rlsd_lambda_decay_steps: int = field(
        default=60, metadata={"help": "RLSD: after the warm-up λ decays linearly to 0 over this many optimizer steps "
                                      "(the recipe: 60; 0: constant λ)."})
    rlsd_teacher: str = field(
        default="frozen",
        metadata={"help": "RLSD's teacher: 'frozen', a frozen copy of the policy (the history model) re-synced "
                          "every rlsd_teacher_sync_steps, with the current policy's log-probs per micro-batch (the "
                          "released recipe); 'dynamic', the policy that sampled, with both log-probs at rollout time "
                          "(ms-swift's mode).",
                  "choices": list(RLSD_TEACHERS)},
    )
    rlsd_teacher_sync_steps: int | None = field(
        default=None,
        metadata={"help": "RLSD, frozen teacher: it takes the policy's weights every this many optimizer steps (sets "
                          "history_sync_steps; 0: never, the initial policy). None: 20, the recipe's."},
    )
    rlsd_answer_column: str = field(
        default="answer", metadata={"help": "RLSD: the dataset column of the reference answer, {answer} in the "
                                            "teacher's prompt."})
    rlsd_teacher_template: str = field(
        default=DEFAULT_TEACHER_TEMPLATE,
        metadata={"help": "RLSD: the teacher's last user message, a format string with {prompt} (the student's last "
                          "user message) and {answer} (rlsd_answer_column)."},
    )
    rlsd_negative_only: bool = field(
        default=False, metadata={"help": "RLSD: reweight only tokens with a negative advantage (the released code's "
                                         "and ms-swift's option, off in the recipe)."})


def teacher_prompt(prompt, answer, template: str):
    """The teacher's prompt for one row: a conversational ``prompt`` with its last user message's text replaced by
    ``template`` filled with that text (``{prompt}``) and ``answer``; a plain-text one replaced whole."""
    if isinstance(prompt, str):
        return template.format(prompt=prompt, answer=answer)
    messages = [dict(message) for message in prompt]
    last = next((message for message in reversed(messages) if message.get("role") == "user"), None)
    if last is None or not isinstance(last.get("content"), str):
        raise ValueError("rlsd: the teacher's prompt replaces the prompt's last user message, which must be text "
                         f"(multimodal prompts are not supported); got {prompt!r}")
    last["content"] = template.format(prompt=last["content"], answer=answer)
    return messages


@register_token_signal("rlsd")
class RlsdSignal(TokenSignal):
    """RLSD's self-distilled token credit (module docstring)."""

    provides = frozenset({"token_weights"})
    weighs_tokens = True
    metric_prefixes = ("rlsd/",)
    option_prefixes = ("rlsd_",)
    paper = RLSD_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        if not args.rlsd_answer_column:
            raise ConfigError("rlsd_answer_column must name the dataset column of the reference answer.")
        if args.rlsd_teacher == "dynamic":
            if args.rlsd_teacher_sync_steps is not None:
                raise ConfigError("rlsd_teacher_sync_steps is for rlsd_teacher: frozen; the dynamic teacher is the "
                                  "policy itself (nothing to sync).")
            return True
        sync = RELEASED_SYNC_STEPS if args.rlsd_teacher_sync_steps is None else args.rlsd_teacher_sync_steps
        if args.history_sync_steps not in (0, sync):
            raise ConfigError(f"history_sync_steps ({args.history_sync_steps}) conflicts with rlsd_teacher_sync_steps "
                              f"({sync}): the rlsd teacher is the history model; set rlsd_teacher_sync_steps only.")
        args.rlsd_teacher_sync_steps = args.history_sync_steps = sync
        return True

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return ("history",) if args.rlsd_teacher == "frozen" else ()

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """The reference answer's column is there, without a missing value (before any model loads)."""
        column = args.rlsd_answer_column
        if column not in (dataset.column_names or ()):
            raise ValueError(f"rlsd reads the reference answer from the column {column!r} (rlsd_answer_column), "
                             f"which the {dataset_name} dataset does not have: {dataset.column_names}")
        missing = next((row for row, value in enumerate(dataset[column]) if value is None), None)
        if missing is not None:
            raise ValueError(f"rlsd: row {missing} of the {dataset_name} dataset has no {column!r} (the reference "
                             "answer in the teacher's prompt).")

    # -- after generation: the teacher's log-probs ---------------------------------------------------------------

    def step_lambda(self) -> float:
        """λ of the optimizer step being trained (``tokens.rlsd.rlsd_lambda``; its count starts at 1)."""
        args = self.trainer.args
        return rlsd_lambda(self.trainer.state.global_step + 1, args.rlsd_lambda, args.rlsd_lambda_warmup_steps,
                           args.rlsd_lambda_decay_steps)

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        """The teacher's log-probs of the completion tokens and the sign of their advantages (``[B, T]`` columns);
        the teacher's forward is skipped (zeros) once λ is 0 for good."""
        args, output = self.trainer.args, generation.output
        completion_ids = output["completion_ids"]
        advantages = output["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        sign = torch.sign(advantages).float().expand(completion_ids.shape).contiguous()
        step = self.trainer.state.global_step + 1
        if rlsd_lambda_is_over(step, args.rlsd_lambda, args.rlsd_lambda_warmup_steps, args.rlsd_lambda_decay_steps):
            teacher = torch.zeros(completion_ids.shape, device=completion_ids.device)  # λ = 0: never read
        else:
            teacher = self.teacher_logps(generation)
        return {TEACHER_LOGPS: teacher, ADVANTAGE_SIGN: sign}

    def teacher_batch(self, generation: Generation) -> dict[str, torch.Tensor]:
        """The teacher's prompts (:func:`teacher_prompt`, tokenised as TRL tokenises the student's, left-padded) and
        the generation's completions, as ``completion_logps_and_entropies`` takes them."""
        trainer, args, output = self.trainer, self.trainer.args, generation.output
        prompts = [teacher_prompt(row["prompt"], row[args.rlsd_answer_column], args.rlsd_teacher_template)
                   for row in generation.inputs]
        prompt_ids, _, multimodal = trainer._tokenize_prompts(prompts)  # TRL 1.16's tokenisation of prompts
        if multimodal:
            raise ValueError("rlsd: multimodal prompts are not supported (the teacher's prompt is text).")
        device = output["completion_ids"].device
        rows = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        return {
            "prompt_ids": pad(rows, padding_value=trainer._tokenizer.pad_token_id, padding_side="left").to(device),
            "prompt_mask": pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side="left").to(device),
            "completion_ids": output["completion_ids"],
            "completion_mask": output["completion_mask"],
        }

    def teacher_logps(self, generation: Generation) -> torch.Tensor:
        """log π_T of each completion token ``[B, T]``: one no-grad forward of the teacher over teacher prompt +
        completion (the frozen teacher: the history model; dynamic: the policy, as it sampled)."""
        trainer, args = self.trainer, self.trainer.args
        batch = self.teacher_batch(generation)
        batch_size = args.per_device_train_batch_size if generation.training else args.per_device_eval_batch_size
        if args.rlsd_teacher == "frozen":
            with trainer.frozen_models.model("history") as teacher:
                logps, _, _ = trainer.completion_logps_and_entropies(teacher, batch, batch_size=batch_size)
        else:
            with torch.no_grad(), disable_gradient_checkpointing(trainer.model, args.gradient_checkpointing_kwargs):
                logps, _, _ = trainer.completion_logps_and_entropies(trainer.model, batch, batch_size=batch_size)
        return logps.detach()

    # -- the loss: the factor, as token weights ------------------------------------------------------------------

    def token_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        args = self.trainer.args
        student = batch.logps if args.rlsd_teacher == "frozen" else batch.old_logps  # current / rollout-time
        lam = self.step_lambda()
        credit = rlsd_factor(batch.columns[TEACHER_LOGPS], student.detach(), batch.columns[ADVANTAGE_SIGN], batch.mask,
                             lam, args.rlsd_epsilon, args.rlsd_negative_only)
        self._log(batch, credit, lam)
        return {"token_weights": credit.factor}

    def _log(self, batch: TokenBatch, credit, lam: float) -> None:
        valid = batch.mask.float()
        totals = torch.stack([(credit.factor * valid).sum(), (credit.delta * valid).sum(),
                              (credit.clipped_low * valid).sum(), (credit.clipped_high * valid).sum(), valid.sum()])
        totals = self.trainer.accelerator.reduce(totals, reduction="sum")  # a collective: every process logs
        count = max(totals[4].item(), 1.0)
        metrics = self.trainer._metrics["train" if batch.training else "eval"]
        metrics["rlsd/lambda"].append(lam)
        for name, total in zip(("factor_mean", "delta_mean", "clip_low_frac", "clip_high_frac"), totals[:4].tolist(),
                               strict=True):
            metrics[f"rlsd/{name}"].append(total / count)
