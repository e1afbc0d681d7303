"""AlignDistil (Zhang et al., ACL 2025, arXiv 2503.02832): token-level distillation from a DPO model and a reverse-DPO
model with a token-adaptive logit extrapolation, as the DPO trainer's ``loss_type: aligndistil`` (off-policy: on the
chosen responses of the preference pairs).

The pipeline, three runs (the released README's three steps):

1. a DPO model on the preference pairs (``loss_type: sigmoid``);
2. a reverse-DPO model: DPO on the same pairs with ``chosen`` and ``rejected`` swapped (the released scripts pass
   ``--chosen_key rejected --rejected_key chosen``);
3. AlignDistil: ``loss_type: aligndistil`` with ``aligndistil_teacher_model_path`` (the DPO model; the released
   ``--teacher_model``) and ``aligndistil_reverse_model_path`` (the reverse-DPO model; the released ``--ref_model``).
   The two are frozen models named ``aligndistil_teacher`` and ``aligndistil_reverse`` (``teacher_model_paths``,
   :mod:`.frozen`: loaded once, no gradient, sharded under ZeRO-3); a config without either path is refused before
   anything loads.

At each position ``t`` of a chosen response (the states ``s_t = (x, y_<t)``), with ``z_dpo``, ``z_rdpo`` and ``z_θ``
the logits of the two teachers and of the policy and ``p = softmax`` of each, over the whole vocabulary ``v``::

    TVD_t = Σ_v |p_dpo(v) − p_rdpo(v)|                          L1 distance, no ½: in [0, 2]; no gradient
    w_t   = β₂·TVD_t + 1e-3                                      the token-adaptive extrapolation weight
    z*_t  = z_dpo + w_t·(z_dpo − z_rdpo)                         the teacher, extrapolated past the DPO model
    L_t   = (β / w_t) · KL( π_θ(·|s_t) ‖ softmax(z*_t / T) )     reverse KL, exact over the vocabulary
    loss  = mean over pairs of  Σ_t L_t·m_t / Σ_t m_t             m: the chosen response's completion mask

Defaults, those of the released off-policy scripts: β = TRL's ``beta`` (0.1), β₂ = ``aligndistil_beta2`` (10; the
on-policy scripts: 15), T = ``aligndistil_temperature`` (1). Their training recipe: lr 1e-6, warmup 0.1, global batch
128, micro-batch 1, 1 epoch, ZeRO-2, the teachers DPO-trained with β 0.1, lr 1e-6, 1 epoch (Qwen2.5-1.5B-Instruct on
UltraFeedback).

**The per-token scale** β / w_t lies in [β / (2β₂ + 1e-3), β / 1e-3] = [0.005, 100] at the defaults: a token on which
the two teachers agree weighs up to 100× on KL(π_θ ‖ π_dpo), so TVD_t and w_t are computed in fp32 whatever the models'
dtype (a bf16 w_t near 1e-3 would move the scale by percents), and the metrics ``aligndistil/scale_max``,
``aligndistil/scale_mean`` and ``aligndistil/tvd_mean`` (over the chosen tokens of every process) watch it.

As the released code (songmzhang/AlignDistil, ``OpenRLHF/openrlhf/trainer/aligndistil_offpolicy_trainer.py``, branch
``reward_boost_type == "aligndistil"``, run with ``kd_divergence: rkl``, ``reward_len_norm`` and ``kd_coef`` 1):

* the extrapolation is on the raw logits (the same distribution as on log-probs: the coefficients 1 + w_t and −w_t sum
  to 1, so a per-row shift of a logit vector shifts z* by a constant);
* only the teacher's logits are divided by T, not the student's; TVD_t and w_t use the teachers at temperature 1;
* the TVD is the L1 distance without ½, and w_t has the floor 1e-3;
* the loss is the batch mean of each chosen response's token mean (the released scripts run micro-batches of 1);
* only the chosen responses are distilled (the off-policy trainer's ``input_ids = chosen_ids``).

Where this differs from the released code:

* positions: the released code masks the logits with the unshifted labels (``labels != -100`` on ``input_ids``), so it
  distils at the states *after* each response token, from ``(x, y_1)`` to the state after EOS, and never at ``(x)``,
  the state that predicts the first response token. Here the positions are the states ``s_t = (x, y_<t)``, t = 1..|y|,
  of the token-level objective, those of the DPO trainer's per-token log-probs: one state earlier, as many tokens.
* vocabularies: the released code truncates the student's and the DPO model's logits to the smaller vocabulary (Qwen's
  padded heads); here models of different vocabularies are refused (``tokenweave.models.check_lm_heads``).
* not implemented: the released ``theorem1`` ablations (``z* = (β/β₂)·z_dpo + (1 − β/β₂)·z_rdpo`` and its variants),
  the on-policy variant (samples from vLLM), the ``kd_coef`` mix with an SFT loss (released at 1: none).

The formula is the released code's. The paper's own equations were not at hand when this was written (its abstract
describes the same construction: a contrastive DPO reward from a DPO and a reverse-DPO model, and a teacher built by a
token-adaptive logit extrapolation), so the ½-free TVD, the 1e-3 floor and the length normalisation are the code's.

What a step costs: the policy's and the reference's forwards, as in DPO (the reference's log-probs give TRL's metrics,
``rewards/*``: DPO's implicit rewards β·Σ(lp − ref), which do not enter the loss), plus one forward of each teacher
over the batch (the trainer's frozen forwards run over all ``2B`` rows; AlignDistil reads the chosen half), plus the
three LM heads on the chosen positions, ``aligndistil_chunk_size`` positions at a time, each chunk twice (the backward
recomputes it): :func:`~tokenweave.losses.aligndistil.chunked_aligndistil_loss`, so no ``[B, T, V]`` tensor exists.
There are no token weights, hence no random control (``signal_control`` is refused without a signal that weighs
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..checks import AT_LEAST_ONE, POSITIVE, ConfigError
from ..losses.aligndistil import ALIGNDISTIL_BETA2, ALIGNDISTIL_PAPER, AlignDistilTokens, chunked_aligndistil_loss
from ..models import head_calls_are_collective
from .signals import TokenBatch, TokenSignal, register_token_signal

TEACHER = "aligndistil_teacher"
"""The frozen model name of the DPO teacher."""
REVERSE = "aligndistil_reverse"
"""The frozen model name of the reverse-DPO teacher."""


@dataclass
class AlignDistilConfig:
    """The ``aligndistil`` signal's fields of ``TokenDPOConfig`` (a mixin)."""

    option_ranges: ClassVar[dict] = {"aligndistil_beta2": POSITIVE, "aligndistil_temperature": POSITIVE,
                                     "aligndistil_chunk_size": AT_LEAST_ONE}

    aligndistil_teacher_model_path: str | None = field(
        default=None,
        metadata={"help": "AlignDistil: the DPO-trained teacher (a model path or a built-in name)."},
    )
    aligndistil_reverse_model_path: str | None = field(
        default=None,
        metadata={"help": "AlignDistil: the reverse-DPO teacher, trained with chosen and rejected swapped (a model "
                  "path or a built-in name)."},
    )
    aligndistil_beta2: float = field(
        default=ALIGNDISTIL_BETA2,
        metadata={"help": "AlignDistil: β₂ of the token-adaptive extrapolation weight w_t = β₂·TVD_t + 1e-3 (released "
                  "off-policy scripts: 10; on-policy: 15)."},
    )
    aligndistil_temperature: float = field(
        default=1.0,
        metadata={"help": "AlignDistil: the distillation temperature T of softmax(z*/T) (released: 1.0)."},
    )
    aligndistil_chunk_size: int = field(
        default=256,
        metadata={"help": "AlignDistil: completion positions per chunk of the full-vocabulary distillation (peak "
                  "memory a few [chunk, vocab] fp32 tensors per model, never [B, T, vocab])."},
    )


def teacher_paths(args) -> dict[str, str | None]:
    """The two teachers' frozen model names → their paths in the config."""
    return {TEACHER: args.aligndistil_teacher_model_path, REVERSE: args.aligndistil_reverse_model_path}


@register_token_signal("aligndistil")
class AlignDistilSignal(TokenSignal):
    """AlignDistil's per-token distillation loss (module docstring): ``distillation_loss`` ``[2B, T]``, L_t at the
    chosen rows' completion positions, 0 elsewhere (the rejected rows are not computed)."""

    supports = frozenset({"dpo"})
    provides = frozenset({"distillation_loss"})
    needs_hidden_states = True
    metric_prefixes = ("aligndistil/",)
    option_prefixes = ("aligndistil_",)
    paper = ALIGNDISTIL_PAPER

    @classmethod
    def implied(cls, args) -> bool:
        """The loss input of ``loss_type: aligndistil`` (it has no other source)."""
        return "aligndistil" in args.loss_type

    @classmethod
    def configure(cls, args) -> bool:
        """Both teachers given, and named as frozen models in ``teacher_model_paths``."""
        paths = teacher_paths(args)
        missing = [f"aligndistil_{'teacher' if name == TEACHER else 'reverse'}_model_path"
                   for name, path in paths.items() if not path]
        if missing:
            raise ConfigError("AlignDistil distils from a DPO model and a reverse-DPO model: set "
                              f"{' and '.join(missing)}.")
        teachers = dict(args.teacher_model_paths or {})
        for name, path in paths.items():
            if teachers.get(name, path) != path:
                raise ConfigError(f"teacher_model_paths names {name!r} {teachers[name]!r}, and the AlignDistil config "
                                  f"{path!r}: give each teacher once.")
        args.teacher_model_paths = teachers | paths
        return True

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return (TEACHER, REVERSE)

    def token_inputs(self, batch: TokenBatch) -> dict:
        args = self.trainer.args
        hidden, head = batch.hidden.policy()
        dpo_hidden, dpo_head = batch.hidden.frozen(TEACHER)
        rdpo_hidden, rdpo_head = batch.hidden.frozen(REVERSE)
        chosen = batch.mask.clone()
        chosen[chosen.size(0) // 2 :] = 0  # rows [chosen; rejected]: the off-policy variant distils the chosen ones
        tokens = chunked_aligndistil_loss(
            hidden, dpo_hidden, rdpo_hidden, head, dpo_head, rdpo_head, chosen, beta=args.beta,
            beta2=args.aligndistil_beta2, temperature=args.aligndistil_temperature,
            chunk_size=args.aligndistil_chunk_size, num_chunks=self._num_chunks(chosen, [head, dpo_head, rdpo_head]))
        self._log(tokens, chosen, batch.training)
        return {"distillation_loss": tokens.loss}

    def _num_chunks(self, mask: Tensor, heads) -> int | None:
        """The largest number of chunks of the chosen positions over processes when a head call is a collective (a
        module head under ZeRO-3: every process must call it as often), else None."""
        if not head_calls_are_collective(heads):
            return None
        local = torch.ceil(mask.sum() / self.trainer.args.aligndistil_chunk_size).long().reshape(1)
        return int(self.trainer.accelerator.gather(local).max())

    def _log(self, tokens: AlignDistilTokens, mask: Tensor, training: bool) -> None:
        """``aligndistil/scale_max``, ``aligndistil/scale_mean`` (β / w_t) and ``aligndistil/tvd_mean`` over the
        chosen tokens of every process."""
        valid = mask.bool()
        scale = tokens.scale[valid]
        sums = torch.stack([scale.sum(), tokens.tvd[valid].sum(), valid.sum().float()]).reshape(1, 3)
        gather = self.trainer.accelerator.gather
        total_scale, total_tvd, count = gather(sums).sum(0).tolist()
        largest = gather((scale.max() if scale.numel() else scale.new_zeros(())).reshape(1)).max().item()
        metrics = self.trainer._metrics["train" if training else "eval"]
        metrics["aligndistil/scale_max"].append(largest)
        metrics["aligndistil/scale_mean"].append(total_scale / count if count else 0.0)
        metrics["aligndistil/tvd_mean"].append(total_tvd / count if count else 0.0)
