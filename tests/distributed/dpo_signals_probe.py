"""One optimizer step of the token-level preference losses that read frozen models or token columns, for
``test_dpo_signals.py``: run under ``accelerate launch`` (2 processes × 4 pairs, DeepSpeed ZeRO-3) and in the test's
own process (1 process × 8 pairs, no DeepSpeed); both must train the same weights and log the same numbers.

The losses: ``tgdpo`` with its reward model online (a third tiny model, a frozen model sharded under ZeRO-3),
``treg`` with its rewards from the dataset's columns, and ``aligndistil`` with its DPO and reverse-DPO teachers (two
more tiny models, sharded), its heads on chunks of 8 chosen positions (the two processes hold different numbers of
chunks: under ZeRO-3 with full fine-tuning every call of the policy's head is a collective, padded to the larger count;
with LoRA the frozen heads are gathered once per step). The reference is ``reference_model_path`` (TRL's ref_model).
Cases: each loss with full fine-tuning and with LoRA. The step is plain SGD at learning rate 1, so the weights move by
exactly the gradient. Each process writes the trained weights (gathered under ZeRO-3) and the logged numbers
(:data:`LOGGED`) to ``<output>/<case>.rank<r>.json``.

    accelerate launch --config_file launch/cpu_zero3.yaml tests/distributed/dpo_signals_probe.py MODELS_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from tokenweave.trainers import TokenDPOConfig, TokenDPOTrainer
from tokenweave.trainers.frozen import _gathered

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
LOSSES = ("tgdpo", "treg", "aligndistil")
CASES = {f"{loss}-{name}": (loss, peft) for loss in LOSSES for name, peft in (("full", None), ("lora", LORA))}
LOGGED = {"tgdpo": ("token_rewards/chosen_mean", "token_rewards/chosen_abs_mean"),
          "treg": ("token_rewards/chosen_mean", "token_rewards/chosen_abs_mean"),
          "aligndistil": ("aligndistil/scale_max", "aligndistil/scale_mean", "aligndistil/tvd_mean")}
"""Each loss's own metrics, logged besides the loss, gradient norm and ``rewards/margins``."""


def dataset(tokenizer) -> Dataset:
    """8 pairs with T-REG reward columns in (−½, ½), different for every token (one per completion token, as DPOTrainer
    tokenises the completions); every other chosen completion short, so that the processes' chosen positions differ."""
    from trl.data_utils import _tokenize

    rows = []
    for index, (a, b) in enumerate([(12, 7), (3, 45), (100, 23), (8, 8), (61, 5), (2, 990), (31, 17), (404, 6)]):
        prompt = [{"role": "user", "content": f"What is {a}+{b}?"}]
        chosen_text = f"{a} + {b} = {a + b}\nThe answer is {a + b}." if index % 2 else f"The answer is {a + b}."
        chosen = [{"role": "assistant", "content": chosen_text}]
        rejected = [{"role": "assistant", "content": f"The answer is {a + b + 1}."}]
        prompt_length = len(_tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"])
        lengths = [len(_tokenize(tokenizer, prompt + side)["input_ids"]) - prompt_length for side in (chosen, rejected)]
        generator = torch.Generator().manual_seed(index)
        rewards = [(torch.rand(n, generator=generator) - 0.5).mul(0.9).tolist() for n in lengths]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_token_rewards": rewards[0],
                     "rejected_token_rewards": rewards[1]})
    return Dataset.from_list(rows)


def run(models: Path, output: Path, case: str, per_device_batch: int) -> dict:
    """One case's step (module docstring): the trained weights by name, the logged loss and gradient norm."""
    from transformers import AutoTokenizer

    loss, peft_config = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(str(models / "policy"))
    args = TokenDPOConfig(
        output_dir=str(output / case), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=per_device_batch, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", activation_checkpointing=False, loss_type=loss, beta=0.5,
        reference_model_path=str(models / "reference"), tgdpo_alpha=2.0, treg_alpha=2.0, logging_steps=1, seed=0,
        tgdpo_reward_model_path=str(models / "reward") if loss == "tgdpo" else None,
        aligndistil_teacher_model_path=str(models / "reward"), aligndistil_reverse_model_path=str(models / "reverse"),
        aligndistil_chunk_size=8, aligndistil_beta2=2.0,
    )
    trainer = TokenDPOTrainer(model=str(models / "policy"), args=args, train_dataset=dataset(tokenizer),
                              processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    trained = [(name, param) for name, param in trainer.model.named_parameters() if param.requires_grad]
    with _gathered([param for _, param in trained]):
        weights = {name: param.detach().float().flatten().tolist() for name, param in trained}
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    keys = ("loss", "grad_norm", "rewards/margins", *LOGGED[loss])
    return {"weights": weights, "logged": {key: logged[key] for key in keys},
            "policy_type": type(trainer.model_wrapped).__name__,
            "frozen_types": sorted(type(model).__name__ for model in trainer.frozen_models.loaded.values())}


def main(models: str, output: str) -> None:
    import torch.distributed as dist

    output_dir = Path(output)
    output_dir.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        result = run(Path(models), output_dir, case, per_device_batch=4)
        (output_dir / f"{case}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
