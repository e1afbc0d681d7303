"""What a saved run says about itself: the token-level method it trained with, its options and its papers.

:func:`token_method` reads a trainer's config: DPO's ``loss_type`` (cdpo, tdpo1, tdpo2, ...) and the random-signal
control; GRPO's ``policy_loss``, its token signals (hapo, rank_grpo, attention_credit) and TRL's entropy mask. It is
what ``run_info.json`` records (``tokenweave.train``) and what :class:`ModelCardMixin` writes into the model card
(TRL's card, with the method's name, its options, the papers as BibTeX, and a ``tokenweave`` tag).
"""

from __future__ import annotations

import dataclasses
import os

from ..models import public_model_id

# arXiv papers by the name of what they introduced (a loss_type, a policy loss or a token signal)
PAPERS = {
    "cdpo": ("Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability",
             "2411.19943", "lin2024critical", "Zicheng Lin and others", 2024),
    "tdpo": ("Token-level Direct Preference Optimization", "2404.11999", "zeng2024token",
             "Yongcheng Zeng and others", 2024),
    "hapo": ("Heterogeneous Adaptive Policy Optimization: Tailoring Optimization to Every Token's Nature",
             "2509.16591", "liu2025hapo", "Liu and others", 2025),
    "rank_grpo": ("Rank-GRPO: Training LLM-based Conversational Recommender Systems with Reinforcement Learning",
                  "2510.20150", "zhu2025rankgrpo", "Zhu and others", 2025),
    "attention_credit": ("Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained "
                         "Policy Optimization", "2510.13554", "li2025attention", "Li and others", 2025),
    "dapo": ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "2503.14476", "yu2025dapo",
             "Qiying Yu and others", 2025),
    "cispo": ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", "2506.13585",
              "minimax2025m1", "MiniMax", 2025),
    "gspo": ("Group Sequence Policy Optimization", "2507.18071", "zheng2025gspo", "Chujie Zheng and others", 2025),
    "entropy_mask": ("Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for "
                     "LLM Reasoning", "2506.01939", "wang2025beyond", "Shenzhi Wang and others", 2025),
}
_PAPER_OF = {"tdpo1": "tdpo", "tdpo2": "tdpo"}  # loss names that share a paper


def bibtex(name: str) -> str:
    title, arxiv_id, key, authors, year = PAPERS[name]
    return (f"@misc{{{key},\n    title         = {{{{{title}}}}},\n    author        = {{{authors}}},\n"
            f"    year          = {year},\n    eprint        = {{{arxiv_id}}},\n    archivePrefix = {{arXiv}},\n}}")


def _options(args, prefixes: tuple[str, ...], names: tuple[str, ...] = ()) -> dict:
    """The config fields named ``names`` or starting with one of ``prefixes``, with their values."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(args)
            if field.name in names or field.name.startswith(prefixes)}


def token_method(args) -> dict:
    """``{"method", "loss_type", "policy_loss", "token_signals", "options", "papers"}`` of a trainer config: the
    token-level method a run trains with ("sft" / "dpo" / "grpo" when there is none), the fields that choose and
    tune it, and the names of its papers (keys of :data:`PAPERS`)."""
    from .dpo import TokenDPOConfig
    from .grpo import TokenGRPOConfig

    if isinstance(args, TokenDPOConfig):
        losses = list(args.loss_type) if isinstance(args.loss_type, list) else [args.loss_type]
        token_losses = [loss for loss in losses if loss in ("cdpo", "tdpo1", "tdpo2")]
        options = _options(args, ("cdpo_", "tdpo_", "token_weight_"), ("beta", "loss_type"))
        return {"method": "+".join(token_losses) or "dpo", "loss_type": losses, "policy_loss": None,
                "token_signals": [], "options": options,
                "papers": sorted({_PAPER_OF.get(loss, loss) for loss in token_losses})}
    if isinstance(args, TokenGRPOConfig):
        signals = list(args.token_signals or [])
        papers = [name for name in (args.policy_loss, *signals) if name in PAPERS]
        if args.top_entropy_quantile < 1.0:
            papers.append("entropy_mask")
        parts = [args.policy_loss or args.loss_type, *[signal for signal in signals if signal != args.policy_loss]]
        options = _options(args, ("hapo_", "rank_", "attention_credit_", "epsilon", "temperature_"),
                           ("beta", "loss_type", "policy_loss", "token_signals", "top_entropy_quantile"))
        return {"method": "+".join(parts), "loss_type": args.loss_type, "policy_loss": args.policy_loss,
                "token_signals": signals, "options": options, "papers": sorted(set(papers))}
    return {"method": "sft", "loss_type": getattr(args, "loss_type", None), "policy_loss": None, "token_signals": [],
            "options": {}, "papers": []}


class ModelCardMixin:
    """TRL's model card of a tokenweave run: ``trainer_name`` is the token-level method (not "DPO" / "GRPO"), the
    card cites its papers besides TRL's, lists its options, names the base model by its public id (the built-in
    ``smollm2-135m`` is ``HuggingFaceTB/SmolLM2-135M-Instruct``, never the local cache path) and is tagged
    ``tokenweave`` and with the method."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        from trl.trainer.utils import generate_model_card

        if not self.is_world_process_zero():
            return
        method = token_method(self.args)
        tags = {"tokenweave", *([tags] if isinstance(tags, str) else tags or []), *self._tag_names}
        tags.update(part for part in method["method"].split("+"))
        citations = [bibtex(name) for name in method["papers"]]
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
