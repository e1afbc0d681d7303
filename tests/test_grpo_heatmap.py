"""The GRPO token-signal view (``tokenweave grpo-heatmap``): for completions the model samples, each token's
advantage and the per-token values the token signals give the policy loss, checked against what the loss itself gets
on the same generation batch; the command's page and terminal view; the refusals."""

import pytest
import torch
import yaml

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import grpo_signals_from_config
from tokenweave.trainers.grpo import TokenGRPOTrainer

from .conftest import CONFIGS


@pytest.fixture
def recorded(monkeypatch):
    """The trainer, the generation batch and the values of each ``signal_values`` call."""
    calls = []
    original = TokenGRPOTrainer.signal_values

    def record(self, inputs):
        values = original(self, inputs)
        calls.append((self, inputs, values))
        return values

    monkeypatch.setattr(TokenGRPOTrainer, "signal_values", record)
    return calls


@pytest.mark.parametrize("extra", [{}, {"top_entropy_quantile": 0.5}], ids=["rlsd", "rlsd-and-trls-entropy-mask"])
def test_the_view_shows_what_rlsds_policy_loss_gets(tmp_path, tiny_model_cache, one_torch_thread, recorded, extra):
    """The view's values are the loss's own inputs, TRL's per-token factors (here its top-entropy mask) included."""
    config = yaml.safe_load((CONFIGS / "rlsd_tiny.yaml").read_text()) | extra
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    view = grpo_signals_from_config(str(path), num_prompts=2)
    [(trainer, output, values)] = recorded
    assert set(values) == {"advantages", "token_weights"}
    seen = {}
    loss = trainer.policy_loss_fn

    def capture(logps, old_logps, advantages, mask, config, token_weights=None, **kwargs):
        seen.update(advantages=advantages, token_weights=token_weights, mask=mask)
        return loss(logps, old_logps, advantages, mask, config, token_weights=token_weights, **kwargs)

    trainer.policy_loss_fn = capture
    with torch.no_grad():
        trainer._compute_loss(trainer.model, output)
    mask = seen["mask"].bool()
    assert torch.equal(values["token_weights"][mask], seen["token_weights"][mask].float())
    assert torch.equal(values["advantages"][mask], seen["advantages"].expand(mask.shape)[mask].float())
    weights = values["token_weights"][mask]
    if extra:  # half the tokens masked out by TRL's entropy mask: weight 0
        assert (weights == 0).any() and (weights != 0).any()
    else:  # RLSD's factor (1 − λ) + λ·clip(·, 1 − ε, 1 + ε), λ 0.5 at step 1, ε 0.2: in [0.9, 1.1], 1 where A = 0
        assert weights.min() >= 0.9 - 1e-6 and weights.max() <= 1.1 + 1e-6
        zero = (values["advantages"] == 0) & mask
        assert torch.all(values["token_weights"][zero] == 1.0)
    # the rows drawn: per value, every completion with one value per completion token, in generation order
    generations = trainer.num_generations_eval
    for name in values:
        rows = [row for row in view.rows if row.signal == name]
        assert len(rows) == output["completion_ids"].size(0) == 2 * generations
        for index, row in enumerate(rows):
            length = int(output["completion_mask"][index].sum())
            assert len(row.tokens) == len(row.values) == length
            assert row.values == values[name][index, :length].tolist()
            assert row.label == f"prompt {index // generations}" and row.side == f"completion {index % generations}"


def test_the_command_writes_a_page_and_a_terminal_view(tmp_path, tiny_model_cache, one_torch_thread, capsys):
    page = tmp_path / "rlsd.html"
    cli_main(["grpo-heatmap", "--config", str(CONFIGS / "rlsd_tiny.yaml"), "--prompts", "1", "--output", str(page),
              "--terminal"])
    out = capsys.readouterr().out
    assert "== advantages:" in out and "== token_weights:" in out and f"to {page}" in out
    text = page.read_text()
    assert "GRPO token signals" in text and "The factor on each completion token's policy loss" in text


@pytest.mark.parametrize("base, changes, message", [
    ("rlsd_tiny.yaml", {"token_signals": None}, "no token_signals"),
    ("sft_tiny.yaml", {}, "needs a GRPO run config"),
])
def test_configs_without_signals_or_not_grpo_are_refused(tmp_path, base, changes, message):
    config = yaml.safe_load((CONFIGS / base).read_text())
    config.update(changes)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message):
        grpo_signals_from_config(str(path))
