"""What a saved run says about itself: the token-level method it trained with, its options and its papers, the
tokenweave that trained it, its dataset, and its base model by a name that loads elsewhere.

:func:`token_method` reads a trainer's config through what each method declares (no list of methods here): the loss
(DPO's ``loss_type``, a registered preference loss; GRPO's ``policy_loss``, or TRL's own ``loss_type`` as
``trl-<loss_type>``; their registries give the paper), the token signals that are on (each declares its paper, its
option prefixes and the losses whose name names it), TRL's entropy mask, and the random control. It is what
``run_info.json`` records (``tokenweave.train``) and what :class:`ModelCardMixin` writes into the model card (TRL's
card, with the method's name, the tokenweave version and commit, the dataset, the loss, its options, the papers as
BibTeX, and a ``tokenweave`` tag).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..losses.policy import POLICY_LOSS_DEFAULTS
from ..losses.preference import get_preference_loss
from ..models import BUILTIN_BASE_FILE, builtin_model_name, is_hub_id, make_peft_model_portable, public_model_id
from ..provenance import version_string
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
    """The name of a run's loss, as the method's first part, and its paper. GRPO without a ``policy_loss`` runs TRL's
    ``loss_type``, named ``trl-<loss_type>``: TRL's ``loss_type: dapo`` (TRL's DAPO aggregation, TRL's clip settings)
    is not tokenweave's ``policy_loss: dapo`` (registered, with DAPO's clip-higher by default), though both set
    ``loss_type: dapo``."""
    if kind == "dpo":
        name = getattr(args, "token_loss_type", None)
        return (name, get_preference_loss(name).paper) if name else ("dpo", None)
    if kind == "grpo":
        name = getattr(args, "policy_loss", None)
        return (name, POLICY_LOSS_DEFAULTS[name].paper) if name else (f"trl-{args.loss_type}", None)
    return "sft", None


def grpo_loss_description(args) -> str:
    """One line for a GRPO run's card: which code computes its loss, a tokenweave ``policy_loss`` or TRL's own
    ``loss_type`` (the two DAPOs: :func:`_loss`)."""
    if args.policy_loss:
        return (f"tokenweave's registered policy loss `policy_loss: {args.policy_loss}` (TRL's `loss_type` is set to "
                f"`{args.loss_type}` for TRL's own checks; TRL does not compute this loss)")
    return f"TRL's GRPO loss, `loss_type: {args.loss_type}` (computed by TRL's GRPOTrainer; no tokenweave policy loss)"


def dataset_description(dataset_name: str) -> str:
    """How the card names a run's dataset: a local dataset by its file or folder name (the card is published, the
    path is this machine's), anything else (a built-in task, a hub dataset id) as it is."""
    if Path(dataset_name).expanduser().exists():
        return f"`{Path(dataset_name).name}` (a local dataset)"
    return f"`{dataset_name}`"


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """``dataset_name`` when it is a hub dataset id (``org/name``, not a local path): what TRL's card puts in its
    ``datasets`` metadata and links to; None for a built-in task, a local dataset or none."""
    if not dataset_name or Path(dataset_name).expanduser().exists():
        return None
    return dataset_name if is_hub_id(dataset_name) else None


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
    """What a tokenweave trainer's saved files say about the run.

    The model card (TRL's): ``trainer_name`` is the token-level method (not "DPO" / "GRPO"), the card cites its papers
    besides TRL's, names the tokenweave version and commit that trained it, the dataset and the loss, lists the
    method's options, names the base model by its public id (the built-in ``smollm2-135m`` is
    ``HuggingFaceTB/SmolLM2-135M-Instruct``, never the local cache path) and is tagged ``tokenweave`` and with the
    method.

    A LoRA adapter (every save: checkpoints, the final model, what ``push_to_hub`` uploads) names its base model
    portably in ``adapter_config.json`` (:func:`~tokenweave.models.make_peft_model_portable`: the public id or the
    built-in name), and the card PEFT writes into a checkpoint names it by public id or not at all, so that
    ``AutoPeftModelForCausalLM.from_pretrained(dir)`` loads it on another machine.
    """

    card_dataset_name: str | None = None
    """The run's dataset (``tokenweave train`` sets it from ``dataset_name``), named by every card this trainer writes,
    also the one ``push_to_hub`` writes, which is given no dataset."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        from trl.trainer.utils import generate_model_card

        if not self.is_world_process_zero():
            return
        dataset_name = dataset_name or self.card_dataset_name
        method = token_method(self.args, self.trainer_kind)
        tags = {"tokenweave", *([tags] if isinstance(tags, str) else tags or []), *self._tag_names}
        tags.update(part for part in method["method"].split("+"))
        citations = [paper.bibtex() for paper in method["papers"]]
        if self._paper.get("citation"):
            citations.append(self._paper["citation"])
        card = generate_model_card(
            base_model=public_model_id(self.model_base_name()), model_name=model_name, hub_model_id=self.hub_model_id,
            dataset_name=hub_dataset_id(dataset_name), tags=sorted(tags), wandb_url=None, trackio_url=None,
            trainer_name=f"{method['method']} (tokenweave, on TRL's {self._name} trainer)",
            trainer_citation="\n\n".join(citations) or None, paper_title=None, paper_id=None,
        )
        run = [f"- trained with: {version_string()}"]
        run += [f"- dataset: {dataset_description(dataset_name)}"] if dataset_name else []
        run += [f"- loss: {grpo_loss_description(self.args)}"] if self.trainer_kind == "grpo" else []
        options = "\n".join(f"- `{name}`: `{value}`" for name, value in method["options"].items())
        card.text += "\n\n## tokenweave run\n\n" + "\n".join(run) + "\n"
        card.text += f"\n## tokenweave method options\n\n{options or '(none)'}\n"
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _save(self, output_dir=None, state_dict=None):
        """Trainer's save of the model (on the process that writes), with the LoRA adapter's base model named
        portably (class docstring)."""
        from huggingface_hub import ModelCard

        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "peft_config", None) and not hasattr(self, "_builtin_base"):  # before it is renamed
            self._builtin_base = builtin_model_name(next(iter(model.peft_config.values())).base_model_name_or_path)
        make_peft_model_portable(model)
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save and getattr(self, "_builtin_base", None):  # the base tokenweave's loaders use
            (Path(output_dir or self.args.output_dir) / BUILTIN_BASE_FILE).write_text(
                json.dumps({"builtin_model": self._builtin_base}) + "\n")
        readme = Path(output_dir or self.args.output_dir) / "README.md"
        if self.args.should_save and getattr(model, "peft_config", None) and readme.exists():  # PEFT's card
            card = ModelCard.load(readme)
            public_id = public_model_id(card.data.base_model)
            card.data.base_model = public_id
            card.data.tags = [tag for tag in card.data.tags or [] if not tag.startswith("base_model:adapter:")]
            card.data.tags += [f"base_model:adapter:{public_id}"] if public_id else []
            card.save(readme)

    def model_base_name(self) -> str | None:
        """The ``model_name_or_path`` the run started from (the base model under a LoRA adapter)."""
        model = self.accelerator.unwrap_model(self.model)
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            return next(iter(peft_config.values())).base_model_name_or_path
        return getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
