"""The frozen models' log-probs of an SFT run, for ``test_frozen.py``: run under ``accelerate launch`` (2 processes,
ZeRO-3) and called in the test's own process (1 process, no DeepSpeed); both must record the same numbers.

One run per case (full fine-tuning, LoRA), one step at learning rate 0 on the 4 rows of :func:`dataset`: a toy SFT
signal reads the ``reference`` (a model by path, another seed) and the ``history`` model, and records their
per-token log-probs of each row it sees, keyed by the row's label ids. Before the step the history model is made
non-trivial, as a resumed run's is: its trained weights restored from a third model (``FrozenModels.load_state_dict``)
and then one update, θ_h ← ½·θ_h + ½·θ (``sync_history``), with θ the policy's effective weights (with LoRA, W + ΔW,
the adapters' B set to fixed non-zero values first). Each process writes what it saw to ``<output>/rank<r>.json``.

    accelerate launch --config_file launch/cpu_zero3.yaml tests/distributed/frozen_probe.py MODELS_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from tokenweave.trainers import TokenSFTConfig, TokenSFTTrainer
from tokenweave.trainers.signals import TOKEN_SIGNALS, TokenSignal, register_token_signal

CASES = {"full": None, "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)}


def dataset() -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
             "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}\nThe answer is {a + b}."}]}
            for a, b in [(12, 7), (3, 45), (100, 23), (8, 8)]]
    return Dataset.from_list(rows)


class FrozenProbe(TokenSignal):
    """Records ``{label ids: {"reference": log-probs, "history": log-probs}}`` of every row it sees (weights 1)."""

    supports = frozenset({"sft"})
    provides = frozenset({"token_weights"})
    seen: dict = {}

    @classmethod
    def frozen_models(cls, args):
        return ("reference", "history")

    def token_inputs(self, batch):
        logps = {name: batch.frozen.logps(name) for name in ("reference", "history")}
        labels = batch.columns["label_ids"]
        for row in range(batch.mask.size(0)):
            valid = batch.mask[row].bool()
            key = json.dumps(labels[row][valid].long().tolist())
            type(self).seen[key] = {name: values[row][valid].float().tolist() for name, values in logps.items()}
        return {"token_weights": batch.mask.float()}

    @classmethod
    def columns(cls, args):
        return {"label_ids": ("label_ids",)}

    @classmethod
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name):
        return dataset.map(lambda row: {"label_ids": [float(label) for label in row["labels"] if label != -100]})


def run(models: Path, output: Path, case: str, per_device_batch: int) -> dict:
    """One case's run (module docstring); returns what this process recorded (``rows``) and the classes of the frozen
    models and of the policy's wrapper."""
    if "frozen_probe" not in TOKEN_SIGNALS:
        register_token_signal("frozen_probe")(FrozenProbe)
    FrozenProbe.seen = {}
    args = TokenSFTConfig(
        output_dir=str(output / case), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=per_device_batch, max_steps=1, learning_rate=0.0, shuffle_dataset=False,
        activation_checkpointing=False, token_signals=["frozen_probe"], reference_model_path=str(models / "reference"),
        history_sync_steps=1000, history_mixup_alpha=0.5, seed=0,
    )
    trainer = TokenSFTTrainer(model=str(models / "policy"), args=args, train_dataset=dataset(),
                              peft_config=CASES[case])
    for name, param in trainer.model.named_parameters():  # LoRA's B fixed and non-zero: ΔW ≠ 0
        if "lora_B" in name:
            param.data.copy_(0.05 * torch.cos(torch.arange(param.numel(), dtype=param.dtype)).view_as(param))
    frozen = trainer.frozen_models
    other = torch.load(models / "other_weights.pt", weights_only=True)  # every name, tied ones too
    frozen.load_state_dict({name: other[name] for name in frozen.state_dict()})
    frozen.sync_history()
    trainer.train()
    return {"rows": dict(FrozenProbe.seen), "frozen_types": sorted(type(model).__name__ for model in frozen.loaded.values()),
            "policy_type": type(trainer.model_wrapped).__name__}


def main(models: str, output: str) -> None:
    import torch.distributed as dist

    output_dir = Path(output)
    recorded = {case: run(Path(models), output_dir, case, per_device_batch=2) for case in CASES}
    rank = dist.get_rank() if dist.is_initialized() else 0
    (output_dir / f"rank{rank}.json").write_text(json.dumps(recorded))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
