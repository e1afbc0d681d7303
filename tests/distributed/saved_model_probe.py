"""Run under `accelerate launch`: train from a config, save, then record the trained model's logits.

Every rank runs the probe forward (ZeRO-3 gathers sharded parameters inside it); rank 0 writes
``probe_logits.pt`` next to the saved model, so a test can check that what was saved reloads to the
model that was trained.
"""

import sys

import torch

from tokenweave.config import parse_run_config
from tokenweave.train import build_trainer

PROBE_TEXT = "12 + 30 = 42\nThe answer is 42."


def main(argv):
    run_args, training_args, model_args = parse_run_config(argv)
    trainer = build_trainer(run_args, training_args, model_args)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    ids = trainer.processing_class(PROBE_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    trainer.model_wrapped.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=ids.to(trainer.accelerator.device)).logits
    if trainer.accelerator.is_main_process:
        torch.save({"input_ids": ids, "logits": logits.float().cpu()}, f"{training_args.output_dir}/probe_logits.pt")
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
