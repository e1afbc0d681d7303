"""What a saved run says about itself: the token-level method it trained with, its options and its papers.

:func:`token_method` reads a trainer's config through what each method declares (no list of methods here): the loss
(DPO's ``loss_type``, a registered preference loss; GRPO's ``policy_loss``; their registries give the paper), the
token signals that are on (each declares its paper, its option prefixes and the losses whose name names it), TRL's
entropy mask, and the random control. It is what ``run_info.json`` records (``tokenweave.train``) and what
:class:`ModelCardMixin` writes into the model card (TRL's card, with the method's name, its options, the papers as
BibTeX, and a ``tokenweave`` tag).
"""

from __future__ import annotations

import dataclasses
import os

from ..losses.policy import POLICY_LOSS_DEFAULTS
from ..losses.preference import get_preference_loss
from ..models import public_model_id
from ..registry import Paper
from .signals import active_signal_classes

ENTROPY_MASK_PAPER = Paper("Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement "
                           "Learning for LLM Reasoning", "2506.01939", "wang2025beyond", "Shenzhi Wang and others",
                           2025)
"""TRL's ``top_entropy_quantile`` (the entropy mask), cited when a GRPO run uses it."""
# the fields that choose and tune the loss, by trainer (the signals' own fields come from their option_prefixes)
LOSS_OPTIONS = {
    "sft": (("loss_type",), ()),
    "dpo": (("beta", "loss_type", "label_smoothing"), ("tdpo_",)),
    "grpo": (("beta", "loss_type", "policy_loss", "policy_loss_kwargs", "loss_agg_mode", "dual_clip_c",
              "top_entropy_quantile"), ("epsilon",)),
}
CONTROL_OPTIONS = ("token_signals", "signal_control", "signal_control_seed")


def _options(args, prefixes: tuple[str, ...], names: tuple[str, ...] = ()) -> dict:
    """The config fields named ``names`` or starting with one of ``prefixes``, with their values."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(args)
            if field.init and (field.name in names or field.name.startswith(prefixes))}


def _loss(args, kind: str) -> tuple[str, Paper | None]:
    """The name of a run's loss, as the method's first part, and its paper."""
    if kind == "dpo":
        name = getattr(args, "token_loss_type", None)
        return (name, get_preference_loss(name).paper) if name else ("dpo", None)
    if kind == "grpo":
        name = getattr(args, "policy_loss", None)
        return (name, POLICY_LOSS_DEFAULTS[name].paper) if name else (args.loss_type, None)
    return "sft", None


def token_method(args, kind: str) -> dict:
    """``{"method", "loss_type", "policy_loss", "token_signals", "options", "papers"}`` of the config of a ``kind``
    trainer ("sft", "dpo", "grpo"): the token-level method a run trains with (the loss, then the token signals the
    loss's name does not already name, joined by "+"; "sft" / "dpo" / TRL's GRPO loss when there is none), the fields
    that choose and tune it, and its papers (:class:`~tokenweave.registry.Paper`)."""
    loss, paper = _loss(args, kind)
    signals = active_signal_classes(args)
    parts = [loss, *[signal.name for signal in signals if signal.name != loss and loss not in signal.named_by_losses]]
    papers = [paper, *[signal.paper for signal in signals]]
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        papers.append(ENTROPY_MASK_PAPER)
    names, prefixes = LOSS_OPTIONS[kind]
    prefixes += tuple(prefix for signal in signals for prefix in signal.option_prefixes)
    return {"method": "+".join(parts), "loss_type": getattr(args, "loss_type", None),
            "policy_loss": getattr(args, "policy_loss", None), "token_signals": [signal.name for signal in signals],
            "options": _options(args, prefixes, names + (CONTROL_OPTIONS if signals else ())),
            "papers": list(dict.fromkeys(paper for paper in papers if paper is not None))}


class ModelCardMixin:
    """TRL's model card of a tokenweave run: ``trainer_name`` is the token-level method (not "DPO" / "GRPO"), the
    card cites its papers besides TRL's, lists its options, names the base model by its public id (the built-in
    ``smollm2-135m`` is ``HuggingFaceTB/SmolLM2-135M-Instruct``, never the local cache path) and is tagged
    ``tokenweave`` and with the method."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        from trl.trainer.utils import generate_model_card

        if not self.is_world_process_zero():
            return
        method = token_method(self.args, self.trainer_kind)
        tags = {"tokenweave", *([tags] if isinstance(tags, str) else tags or []), *self._tag_names}
        tags.update(part for part in method["method"].split("+"))
        citations = [paper.bibtex() for paper in method["papers"]]
        if self._paper.get("citation"):
            citations.append(self._paper["citation"])
        card = generate_model_card(
            base_model=public_model_id(self.model_base_name()), model_name=model_name, hub_model_id=self.hub_model_id,
            dataset_name=dataset_name, tags=sorted(tags), wandb_url=None, trackio_url=None,
            trainer_name=f"{method['method']} (tokenweave, on TRL's {self._name} trainer)",
            trainer_citation="\n\n".join(citations) or None, paper_title=None, paper_id=None,
        )
        options = "\n".join(f"- `{name}`: `{value}`" for name, value in method["options"].items())
        card.text += f"\n\n## tokenweave method options\n\n{options or '(none)'}\n"
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def model_base_name(self) -> str | None:
        """The ``model_name_or_path`` the run started from (the base model under a LoRA adapter)."""
        model = self.accelerator.unwrap_model(self.model)
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            return next(iter(peft_config.values())).base_model_name_or_path
        return getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
