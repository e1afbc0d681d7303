"""One optimizer step of token-weighted SFT with a frozen reference, for ``test_sft_signals.py``: run under
``accelerate launch`` (2 processes × 4 rows, DeepSpeed ZeRO-2 or ZeRO-3) and in the test's own process (1 process ×
8 rows, no DeepSpeed); both must train the same weights.

The signals: ``rho1`` (the top half of the step's tokens by excess loss over the reference, ``global_batch``: the
step's micro-batches on both processes are scored together), ``asft`` (DFT's weight and the full-vocabulary KL to the
same reference, through both models' LM heads in chunks), ``eaft`` (the top-20 entropy, through the policy's head
in chunks) and ``sstoken`` (the history model, the initial weights: with LoRA the policy with its adapter off, run
inside the loss; and the attention forward of the policy's decoder, which stops after the last layer's attention);
their weights multiply. Cases: full fine-tuning and LoRA. The step is plain SGD at learning rate 1, so the
weights move by exactly the gradient (Adam's first step, g / (|g| + ε), would magnify rounding in the tiniest
gradients). Each process writes the trained weights (gathered under ZeRO-3), the logged loss and gradient norm to ``<output>/<case>.rank<r>.json``.

    accelerate launch --config_file launch/cpu_zero3.yaml tests/distributed/sft_signals_probe.py MODELS_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig

from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer
from tokenweave.trainers.frozen import _gathered

CASES = {"full": None, "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)}


def dataset() -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
             "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}\nThe answer is {a + b}."}]}
            for a, b in [(12, 7), (3, 45), (100, 23), (8, 8), (61, 5), (2, 990), (31, 17), (404, 6)]]
    return Dataset.from_list(rows)


def run(models: Path, output: Path, case: str, per_device_batch: int) -> dict:
    """One case's step (module docstring): the trained weights by name, the logged loss and gradient norm."""
    args = TokenSFTConfig(
        output_dir=str(output / case), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=per_device_batch, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        activation_checkpointing=False, token_signals=["rho1", "asft", "eaft", "sstoken"], rho1_ratio=0.5,
        reference_model_path=str(models / "reference"), asft_alpha=0.5, asft_chunk_size=16, eaft_chunk_size=16,
        logging_steps=1, seed=0,
    )
    trainer = TokenSFTTrainer(model=str(models / "policy"), args=args, train_dataset=dataset(),
                              peft_config=CASES[case])
    trainer.train()
    trained = [(name, param) for name, param in trainer.model.named_parameters() if param.requires_grad]
    with _gathered([param for _, param in trained]):
        weights = {name: param.detach().float().flatten().tolist() for name, param in trained}
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {"weights": weights, "loss": logged["loss"], "grad_norm": logged["grad_norm"],
            "policy_type": type(trainer.model_wrapped).__name__}


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
