"""What TRL accepts, tokenweave's option checks accept (tokenweave/checks.py): values TRL's own tests of its GRPO
trainer pass, wider than the field's annotation (``scale_rewards: true | false``) or range (``num_generations_eval:
1``), resolved as TRL resolves them, and trained and evaluated with by tokenweave's trainer."""

import math

import pytest
import yaml
from trl import GRPOConfig

from tokenweave.checks import ConfigError
from tokenweave.config import parse_run_config
from tokenweave.trainers import TokenGRPOConfig

from .grpo_harness import make_trainer, train_dataset


@pytest.mark.parametrize("scale_rewards, resolved", [
    (True, "group"), (False, "none"), ("group", "group"), ("batch", "batch"), ("none", "none"),
])
def test_scale_rewards_takes_trls_booleans(tmp_path, scale_rewards, resolved):
    # TRL's test_train_scale_rewards passes [False, "group", "batch", True, "none"]
    options = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", scale_rewards=scale_rewards)
    assert GRPOConfig(**options).scale_rewards == resolved
    assert TokenGRPOConfig(**options).scale_rewards == resolved


def test_scale_rewards_false_in_a_run_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dict(method="grpo", output_dir=str(tmp_path), use_cpu=True, scale_rewards=False)))
    _, training_args, _ = parse_run_config(["--config", str(path)])
    assert training_args.scale_rewards == "none"


def test_num_generations_eval_takes_one_and_refuses_zero(tmp_path):
    options = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert TokenGRPOConfig(**options, num_generations_eval=1).num_generations_eval == 1
    with pytest.raises(ConfigError, match=r"num_generations_eval must be >= 1, got 0"):
        TokenGRPOConfig(**options, num_generations_eval=0)


@pytest.mark.parametrize("policy_loss", [None, "hapo"])  # hapo: its token-level group advantage over groups of one
def test_evaluation_with_one_generation_per_prompt(model_dir, tmp_path, policy_loss):
    # TRL's test_train_with_num_generations_eval evaluates with one completion per prompt
    trainer = make_trainer(model_dir, tmp_path, policy_loss=policy_loss, num_generations_eval=1,
                           per_device_eval_batch_size=2)
    metrics = trainer.evaluate(eval_dataset=train_dataset().select(range(2)))
    assert math.isfinite(metrics["eval_loss"])
