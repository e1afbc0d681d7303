"""TGDPO and T-REG: their losses by hand, their reduction to TRL's DPO at α = 0, their token rewards online and offline
(``tokenweave token-rewards``), the shuffled control and the config's refusals (gradient accumulation: with the other
losses', in ``test_dpo_trainer.py``).

The policy and the reference are two differently seeded tiny Llamas (``test_dpo_trainer.models``), so log-ratios are
not zero; the online reward model is the built-in ``tiny-llama``, the policy's initial weights, so r̂ = lp_policy0 −
lp_ref is not zero either.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from tokenweave.checks import ConfigError
from tokenweave.config import load_run_config
from tokenweave.losses.preference import PreferenceLossConfig, TokenPairs, get_preference_loss
from tokenweave.losses.tgdpo import tgdpo_token_rewards
from tokenweave.losses.treg import treg_token_rewards
from tokenweave.pipelines.token_rewards import revised_prompt, token_rewards
from tokenweave.trainers.dpo import TokenDPOConfig

from .conftest import with_columns
from .test_dpo_trainer import (
    BETA,
    TRL_DPO_METRICS,
    assert_same_loss_and_grads,
    first_batch,
    full_logits_and_logps,
    logged_metrics,
    loss_and_grads,
    loss_input,
    make_trainer,
    models,  # noqa: F401  (the fixture)
    pairs_dataset,
    random_rewards,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")
REWARD_METRICS = {"token_rewards/chosen_mean", "token_rewards/chosen_abs_mean", "token_rewards/rejected_mean",
                  "token_rewards/rejected_abs_mean"}


def rewarded_pairs(tokenizer):
    return with_columns(pairs_dataset(), tokenizer, random_rewards, random_rewards, names=REWARD_COLUMNS)


def fixed_pairs():
    """Two pairs, chosen 3 tokens (the second row padded after 2) and rejected 2 tokens (the first padded after 1),
    the policy's log-probs leaves of the graph."""
    chosen = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 9.0]], requires_grad=True)
    rejected = torch.tensor([[-0.7, 5.0], [-2.2, -0.1]], requires_grad=True)
    pairs = TokenPairs(chosen, rejected, torch.tensor([[-1.1, -1.5, -0.9], [-0.2, -1.0, 3.0]]),
                       torch.tensor([[-0.4, 7.0], [-2.0, -0.6]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                       torch.tensor([[1, 0], [1, 1]]))
    rewards = (torch.tensor([[0.3, -0.2, 0.1], [0.4, 0.05, 100.0]]), torch.tensor([[-0.25, 50.0], [0.15, -0.35]]))
    return pairs, rewards


def test_tgdpo_loss_equals_hand_computation():
    """−log σ(Σ_t β(1 + αβ r̂ʷ_t) lrʷ_t − Σ_t β(1 − αβ r̂ˡ_t) lrˡ_t), written out token by token; padding (holding
    large values) ignored; the gradient of each chosen log-prob is −σ(−z)·β(1 + αβ r̂ʷ_t) / B."""
    pairs, rewards = fixed_pairs()
    alpha, beta = 0.5, 0.1
    output = get_preference_loss("tgdpo").fn(pairs, PreferenceLossConfig(beta=beta, options={"tgdpo_alpha": alpha}),
                                             token_rewards=rewards)
    expected, margins = [], []
    for row in range(2):
        chosen = sum(beta * (1 + alpha * beta * rewards[0][row, t].item())
                     * (pairs.chosen_logps[row, t].item() - pairs.ref_chosen_logps[row, t].item())
                     for t in range(3) if pairs.chosen_mask[row, t])
        rejected = sum(beta * (1 - alpha * beta * rewards[1][row, t].item())
                       * (pairs.rejected_logps[row, t].item() - pairs.ref_rejected_logps[row, t].item())
                       for t in range(2) if pairs.rejected_mask[row, t])
        margins.append(chosen - rejected)
        expected.append(-math.log(1 / (1 + math.exp(-(chosen - rejected)))))
    torch.testing.assert_close(output.losses, torch.tensor(expected), atol=1e-6, rtol=0)
    output.losses.mean().backward()
    for row in range(2):
        sigma = 1 / (1 + math.exp(margins[row]))
        for t in range(3):
            grad = -sigma * beta * (1 + alpha * beta * rewards[0][row, t].item()) / 2 if pairs.chosen_mask[row, t] else 0
            assert pairs.chosen_logps.grad[row, t].item() == pytest.approx(grad, abs=1e-7)
    # the logged rewards are DPO's, unweighted
    torch.testing.assert_close(output.chosen_rewards, beta * torch.tensor([-1.0 + 1.1 - 2.0 + 1.5 - 0.5 + 0.9,
                                                                           -0.3 + 0.2 - 1.2 + 1.0]))


def test_treg_loss_equals_hand_computation():
    """DPO + α·sg(σ(r_l − r_w))·(−Σ_t β r̂ʷ_t lpʷ_t − Σ_t β r̂ˡ_t lpˡ_t), written out; the gradient of each chosen
    log-prob is DPO's plus −α·w·β·r̂ʷ_t (w a constant) / B."""
    pairs, rewards = fixed_pairs()
    alpha, beta = 0.25, 0.1
    output = get_preference_loss("treg").fn(pairs, PreferenceLossConfig(beta=beta, options={"treg_alpha": alpha}),
                                            token_rewards=rewards)
    for row in range(2):
        delta_w = sum(pairs.chosen_logps[row, t].item() - pairs.ref_chosen_logps[row, t].item()
                      for t in range(3) if pairs.chosen_mask[row, t])
        delta_l = sum(pairs.rejected_logps[row, t].item() - pairs.ref_rejected_logps[row, t].item()
                      for t in range(2) if pairs.rejected_mask[row, t])
        z = beta * (delta_w - delta_l)
        weight = 1 / (1 + math.exp(z))  # σ(r_l − r_w)
        regularizer = -sum(beta * rewards[0][row, t].item() * pairs.chosen_logps[row, t].item()
                           for t in range(3) if pairs.chosen_mask[row, t])
        regularizer -= sum(beta * rewards[1][row, t].item() * pairs.rejected_logps[row, t].item()
                           for t in range(2) if pairs.rejected_mask[row, t])
        expected = math.log(1 + math.exp(-z)) + alpha * weight * regularizer
        assert output.losses[row].item() == pytest.approx(expected, abs=1e-6)
    output.losses.sum().backward()
    for row in range(2):
        z = output.logits[row].item()
        weight = 1 / (1 + math.exp(z))
        for t in range(3):
            if pairs.chosen_mask[row, t]:
                grad = -weight * beta - alpha * weight * beta * rewards[0][row, t].item()
                assert pairs.chosen_logps.grad[row, t].item() == pytest.approx(grad, abs=1e-7)
        assert pairs.chosen_logps.grad[1, 2] == 0 and pairs.rejected_logps.grad[0, 1] == 0


def test_reward_functions():
    """TGDPO's r̂ is the log-prob difference; T-REG's σ(better − worse) − ½, 0 where the prompts agree."""
    better, worse = torch.tensor([-1.0, -3.0, -0.2]), torch.tensor([-2.0, -1.0, -0.2])
    torch.testing.assert_close(tgdpo_token_rewards(better, worse), torch.tensor([1.0, -2.0, 0.0]))
    expected = torch.tensor([1 / (1 + math.exp(-1.0)) - 0.5, 1 / (1 + math.exp(2.0)) - 0.5, 0.0])
    torch.testing.assert_close(treg_token_rewards(better, worse), expected)


@pytest.mark.parametrize("loss_type", ["tgdpo", "treg"])
def test_alpha_zero_is_trl_dpo(tmp_path, models, loss_type):  # noqa: F811
    """At α = 0 both losses are DPO: through the trainer, the loss, gradients and TRL's metrics of TRL's sigmoid loss
    on the same batch, whatever the rewards, plus the ``token_rewards/*`` metrics. Within 1e-5, as cDPO's and TDPO's
    reductions: TRL's fused head gives float32 log-probs, which TRL sums per sequence before the difference and the
    token-level losses per token, a few 1e-6 apart on gradients of size 1 (the 1e-6 equality in float64:
    :func:`test_alpha_zero_is_dpo_in_float64`)."""
    dataset = rewarded_pairs(models[2])
    trl_trainer = make_trainer(tmp_path, models, dataset, DPOTrainer, DPOConfig, loss_type=["sigmoid"])
    trainer = make_trainer(tmp_path, models, dataset, loss_type=loss_type, **{f"{loss_type}_alpha": 0.0})
    expected = loss_and_grads(trl_trainer, first_batch(trl_trainer))
    assert_same_loss_and_grads(loss_and_grads(trainer, first_batch(trainer)), expected)
    trl_metrics, metrics = logged_metrics(trl_trainer), logged_metrics(trainer)
    assert set(metrics) == TRL_DPO_METRICS | REWARD_METRICS
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics["token_rewards/chosen_abs_mean"] > 0.1


@pytest.mark.parametrize("loss_type", ["tgdpo", "treg"])
def test_alpha_zero_is_dpo_in_float64(loss_type):
    """At α = 0 each loss, on per-token float64 log-probs, is TRL's sigmoid DPO computed as TRL 1.16 computes it
    (``_compute_loss``: each side's log-probs summed, then −log σ(β·((Σ lpʷ − Σ refʷ) − (Σ lpˡ − Σ refˡ)))): loss and
    gradients within 1e-12, whatever the rewards."""
    pairs, rewards = fixed_pairs()
    pairs = TokenPairs(*(tensor.double().detach().requires_grad_(index < 2) if index < 4 else tensor
                         for index, tensor in enumerate(pairs)))
    config = PreferenceLossConfig(beta=0.1, options={f"{loss_type}_alpha": 0.0})
    loss = get_preference_loss(loss_type).fn(pairs, config, token_rewards=rewards).losses.mean()
    grads = torch.autograd.grad(loss, [pairs.chosen_logps, pairs.rejected_logps])

    def side_sum(values, mask):
        return (values * mask).sum(-1)

    chosen = side_sum(pairs.chosen_logps, pairs.chosen_mask) - side_sum(pairs.ref_chosen_logps, pairs.chosen_mask)
    rejected = (side_sum(pairs.rejected_logps, pairs.rejected_mask)
                - side_sum(pairs.ref_rejected_logps, pairs.rejected_mask))
    expected = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
    expected_grads = torch.autograd.grad(expected, [pairs.chosen_logps, pairs.rejected_logps])
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


def test_tgdpo_in_the_trainer_reads_the_columns_at_the_completion_tokens(tmp_path, models):  # noqa: F811
    """The trainer's TGDPO loss on a batch equals the formula computed from the models' full logits and the rewards
    columns laid on each completion's tokens by hand."""
    dataset = rewarded_pairs(models[2])
    trainer = make_trainer(tmp_path, models, dataset, loss_type="tgdpo", tgdpo_alpha=2.0)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        _, logps = full_logits_and_logps(trainer.model, batch)
        _, ref_logps = full_logits_and_logps(trainer.ref_model, batch)
    mask = batch["completion_mask"][:, 1:].bool()
    pairs = len(dataset)
    losses = []
    for row in range(pairs):
        margin = 0.0
        for side, sign in ((0, 1), (1, -1)):
            index = row + side * pairs
            rewards = dataset[row][REWARD_COLUMNS[side]]
            ratios = (logps - ref_logps)[index][mask[index]]
            assert len(ratios) == len(rewards)
            margin += sign * sum(BETA * (1 + sign * 2.0 * BETA * r) * lr.item() for r, lr in zip(rewards, ratios))
        losses.append(-F.logsigmoid(torch.tensor(margin)).item())
    assert loss.item() == pytest.approx(sum(losses) / pairs, abs=1e-5)


def loss_rewards(trainer, batch) -> torch.Tensor:
    """The ``[2B, L-1]`` token rewards the preference loss gets for ``batch``."""
    return loss_input(trainer, batch, "token_rewards")


def test_online_tgdpo_rewards_equal_the_token_rewards_command(tmp_path, models, tiny_model_cache):  # noqa: F811
    """One reward function, two sources: ``tokenweave token-rewards`` writes the columns the online signal computes
    (the reward model ``tiny-llama``, the reference ``tiny-llama-reference``: the test's policy and reference), on the
    same tokens; the run config's own reward model path is what the command uses without ``--reward_model``."""
    config = tmp_path / "tgdpo.yaml"
    config.write_text("method: dpo\nmodel_name_or_path: tiny-llama\ndataset_name: arithmetic\nnum_train_examples: 4\n"
                      f"output_dir: {tmp_path / 'run'}\nuse_cpu: true\nbf16: false\nloss_type: tgdpo\n"
                      "reference_model_path: tiny-llama-reference\ntgdpo_reward_model_path: tiny-llama\n"
                      "per_device_eval_batch_size: 3\n")
    summary = token_rewards(*load_run_config(str(config)), tmp_path / "data")
    assert summary["rows"] == 4 and not summary["reused"]
    from datasets import load_from_disk

    offline_data = load_from_disk(str(tmp_path / "data"))
    offline = make_trainer(tmp_path, models, offline_data, loss_type="tgdpo")
    online = make_trainer(tmp_path, models, offline_data.remove_columns(list(REWARD_COLUMNS)), loss_type="tgdpo",
                          tgdpo_reward_model_path="tiny-llama")
    assert list(online.signals) == ["tgdpo"] and "tgdpo_reward_model" in online.frozen_models.loaded
    batch = first_batch(offline)
    mask = batch["completion_mask"][:, 1:].bool()
    written, computed = loss_rewards(offline, batch), loss_rewards(online, first_batch(online))
    assert computed[mask].abs().mean() > 0.05
    torch.testing.assert_close(written[mask], computed[mask], atol=1e-5, rtol=0)
    assert token_rewards(*load_run_config(str(config)), tmp_path / "data")["reused"]


def test_treg_command_scores_the_completion_under_the_two_revision_prompts(tmp_path, tiny_model_cache):
    """T-REG's columns: one reward per completion token, in (−½, ½), not all 0 (the two prompts differ)."""
    config = tmp_path / "treg.yaml"
    config.write_text("method: dpo\nmodel_name_or_path: tiny-llama\ndataset_name: arithmetic\nnum_train_examples: 3\n"
                      f"output_dir: {tmp_path / 'run'}\nuse_cpu: true\nbf16: false\nloss_type: treg\n")
    summary = token_rewards(*load_run_config(str(config)))
    from datasets import load_from_disk

    data = load_from_disk(summary["output"])
    assert summary["output"].endswith("run_token_rewards")
    for row in data:
        for column in REWARD_COLUMNS:
            values = torch.tensor(row[column])
            assert values.abs().max() < 0.5 and values.abs().max() > 0
    assert summary["chosen"]["tokens"] == sum(len(row) for row in data[REWARD_COLUMNS[0]])


def test_revised_prompt_appends_to_the_last_user_message():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2+2?"}]
    revised = revised_prompt(prompt, "Answer well.")
    assert revised[-1]["content"] == "What is 2+2?\n\nAnswer well." and revised[:3] == prompt[:3]
    assert prompt[-1]["content"] == "What is 2+2?"
    with pytest.raises(ValueError, match="no user message"):
        revised_prompt([{"role": "system", "content": "x"}], "Answer well.")


def test_shuffle_control_permutes_each_rows_rewards(tmp_path, models):  # noqa: F811
    """``signal_control: shuffle``: each completion keeps its rewards on its own tokens, in another order, by seed."""
    dataset = rewarded_pairs(models[2])
    plain_trainer = make_trainer(tmp_path, models, dataset, loss_type="treg")
    batch = first_batch(plain_trainer)
    plain = loss_rewards(plain_trainer, batch)
    shuffled = []
    for seed in (0, 0, 1):
        trainer = make_trainer(tmp_path, models, dataset, loss_type="treg", signal_control="shuffle",
                               signal_control_seed=seed)
        shuffled.append(loss_rewards(trainer, first_batch(trainer)))
    mask = batch["completion_mask"][:, 1:].bool()
    for row in range(plain.size(0)):
        original, permuted = plain[row][mask[row]], shuffled[0][row][mask[row]]
        assert torch.equal(torch.sort(permuted).values, torch.sort(original).values)
        assert not torch.equal(permuted, original)
    assert torch.equal(shuffled[0], shuffled[1]) and not torch.equal(shuffled[0], shuffled[2])


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "treg", "signal_control": "inverse"}, "select no tokens"),
    ({"loss_type": "tgdpo", "signal_control": "full"}, "no full-token form"),
    ({"loss_type": "tgdpo", "tgdpo_reward_model_path": "a", "teacher_model_paths": {"tgdpo_reward_model": "b"}},
     "give the reward model once"),
    ({"loss_type": "tgdpo", "tgdpo_alpha": -1.0}, "tgdpo_alpha"),
    ({"loss_type": "treg", "treg_reward_source": "other"}, "treg_reward_source"),
])
def test_config_refusals(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        TokenDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **options)


def test_missing_reward_columns_name_the_command(tmp_path, models):  # noqa: F811
    with pytest.raises(ValueError, match="tokenweave token-rewards"):
        make_trainer(tmp_path, models, pairs_dataset(), loss_type="treg")


def test_token_rewards_refuses_runs_without_token_rewards(tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(f"method: dpo\nmodel_name_or_path: tiny-llama\noutput_dir: {tmp_path}\nuse_cpu: true\n"
                      "bf16: false\nloss_type: tgdpo\n")
    with pytest.raises(ValueError, match="--reward_model"):
        token_rewards(*load_run_config(str(config)))
    config.write_text(config.read_text().replace("tgdpo", "cdpo"))
    with pytest.raises(ValueError, match="loss_type tgdpo or treg"):
        token_rewards(*load_run_config(str(config)))


def test_signal_values_give_what_the_loss_gets(tmp_path, models):  # noqa: F811
    """``TokenDPOTrainer.signal_values``: the token rewards the loss reads, per completion token, and the model back
    in training mode."""
    dataset = rewarded_pairs(models[2])
    trainer = make_trainer(tmp_path, models, dataset, loss_type="tgdpo")
    batch = first_batch(trainer)
    values = trainer.signal_values(batch)
    assert list(values) == ["token_rewards"] and trainer.model.training
    torch.testing.assert_close(values["token_rewards"], loss_rewards(trainer, batch))
    mask = batch["completion_mask"][:, 1:].bool()
    assert values["token_rewards"][0][mask[0]].tolist() == pytest.approx(dataset[0][REWARD_COLUMNS[0]])
