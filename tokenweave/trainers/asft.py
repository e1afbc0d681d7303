"""The ``asft`` token signal: Anchored Supervised Fine-Tuning, DFT's weight plus a KL anchor to a frozen reference.

ASFT (Zhu et al., ICLR 2026, arXiv 2509.23753), as LLaMA-Factory's ``asft_loss_func`` computes it (the authors')::

    loss = Σ_t sg(π_θ(y_t)) · ℓ_t / N  +  α · Σ_t KL(π_ref(·|t) ‖ π_θ(·|t)) / N
    KL(π_ref ‖ π_θ) = Σ_v π_ref(v) · (log π_ref(v) − log π_θ(v))      over the whole vocabulary, at each label token

with α = 0.1 (Llama-2; 0.05 for Qwen2 in the authors' configs) and the reference the model before fine-tuning
(``trainers.frozen``: ``reference_model_path``, else the policy with its adapter off, else its initial weights). The
released code divides both terms by the micro-batch's label count; here both are divided by TRL's
``num_items_in_batch`` (the same at gradient accumulation 1 on one process). The KL needs both models' full
distributions: the signal applies the two LM heads to the final hidden states a chunk of ``asft_chunk_size`` label
positions at a time (TDPO's :func:`~tokenweave.losses.preference.chunked_sequential_kl`, each chunk recomputed in the
backward), so no ``[B, T, V]`` tensor exists. α = 0 is DFT exactly (and loads no reference). Metrics: ``weights/mean``
(DFT's weight), ``kl/mean`` (the mean KL per label token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..checks import AT_LEAST_ONE, NON_NEGATIVE
from ..losses.preference import chunked_sequential_kl
from ..registry import Paper
from .dft import check_weighs_by_the_policy
from .signals import TokenBatch, TokenSignal, register_token_signal

ASFT_PAPER = Paper("Anchored Supervised Fine-Tuning", "2509.23753", "zhu2025anchored", "He Zhu and others", 2025)


@dataclass
class AsftConfig:
    """The ``asft`` signal's fields (a mixin of ``TokenSFTConfig``)."""

    option_ranges: ClassVar[dict] = {"asft_alpha": NON_NEGATIVE, "asft_chunk_size": AT_LEAST_ONE}

    asft_alpha: float = field(default=0.1, metadata={"help": "asft signal: the weight α of the KL(π_ref ‖ π_θ) "
                                                     "anchor (0: DFT)."})
    asft_chunk_size: int = field(default=256, metadata={"help": "asft signal: label positions per chunk of the "
                                                         "full-vocabulary KL (peak memory ≈ a few chunk × vocabulary "
                                                         "fp32 tensors)."})


@register_token_signal("asft")
class AsftSignal(TokenSignal):
    """ASFT (module docstring)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights", "token_loss"})
    weighs_tokens = True
    metric_prefixes = ("weights/", "kl/")
    option_prefixes = ("asft_",)
    paper = ASFT_PAPER

    @classmethod
    def configure(cls, args) -> bool:
        check_weighs_by_the_policy(args, cls.name)
        return True

    @property
    def needs_hidden_states(self) -> bool:
        return self.trainer.args.asft_alpha > 0

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        return ("reference",) if args.asft_alpha > 0 else ()

    def token_inputs(self, batch: TokenBatch) -> dict:
        inputs = {"token_weights": batch.logps.detach().exp()}
        alpha, chunk_size = self.trainer.args.asft_alpha, self.trainer.args.asft_chunk_size
        if alpha > 0:
            hidden, head = batch.hidden.policy()
            ref_hidden, ref_head = batch.hidden.frozen("reference")
            kl = chunked_sequential_kl(hidden, ref_hidden, head, ref_head, batch.mask, chunk_size=chunk_size,
                                       num_chunks=batch.hidden.num_chunks(chunk_size, [head, ref_head]))
            self._log_kl(kl, batch.mask, batch.training)
            inputs["token_loss"] = alpha * kl
        return inputs

    def _log_kl(self, kl: torch.Tensor, mask: torch.Tensor, training: bool) -> None:
        """``kl/mean``: the mean KL per label token, over every process."""
        totals = torch.stack([(kl.detach() * mask).sum().float(), mask.sum().float()]).reshape(1, 2)
        total, count = self.trainer.accelerator.gather_for_metrics(totals).sum(0)
        self.trainer._metrics["train" if training else "eval"]["kl/mean"].append((total / count.clamp(min=1)).item())
