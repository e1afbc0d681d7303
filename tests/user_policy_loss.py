"""A policy loss in user code, with a hyperparameter of its own: named from YAML as
``policy_loss: tests.user_policy_loss:scaled_grpo`` with ``policy_loss_kwargs: {scale: ...}``."""

from tokenweave.losses.policy import POLICY_LOSSES


def scaled_grpo(logps, old_logps, advantages, mask, config, *, scale: float = 1.0, **kwargs):
    """``scale`` × the registered ``grpo`` loss."""
    per_token_loss, metrics = POLICY_LOSSES["grpo"](logps, old_logps, advantages, mask, config, **kwargs)
    return scale * per_token_loss, metrics
