"""HAPO, Rank-GRPO, attention credit and cDPO give the losses and updates they gave at c203bc0, before the token
signals moved to the trainer-neutral interface (one host for SFT, DPO and GRPO).

The literal numbers below were computed by the code at c203bc0, on the tiny model in float64 (CPU), so that the
numbers do not depend on the CPU's float32 summation order (the fused LM head still computes in float32: a change of
the math moves them by far more than the tolerance, 1e-6). Each case is one batch through the public
``compute_loss``; the numbers are the loss, the gradient's norm and Σ|g|, and its first and last three entries
(:func:`summary`), plus what the signal put into the batch:

- HAPO, every part on (adaptive-temperature sampling with the first generation's statistics, token-level advantages,
  redistribution, adaptive clip, dual clip 10, ĥ of the generation batch), two generations, the second off-policy;
- Rank-GRPO: the per-rank advantages of eight hand-written answers, and the rank_grpo loss on a hand-made batch with
  its span ids;
- attention credit (the coupled rule): the credited advantages of the hand-made batch, and the dapo loss on them;
- cDPO from critical-token scores, and its shuffled control (each completion's weights on a permutation of its
  tokens, seeded per row and side).
"""

import pytest
import torch

from .conftest import with_columns
from .grpo_harness import (
    ATTENTION_CREDIT,
    attention_credit_advantages,
    hand_made_rank_ids,
    loss_and_grads,
    make_batch,
    make_trainer,
    rank_advantages,
    train_dataset,
)
from .test_dpo_trainer import first_batch, pairs_dataset
from .test_dpo_trainer import loss_and_grads as dpo_loss_and_grads
from .test_dpo_trainer import make_trainer as make_dpo_trainer
from .test_hapo_pinned import off_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOAT64 = {"model_init_kwargs": {"dtype": torch.float64}}


def assert_pinned(actual: dict, expected: dict) -> None:
    """Every number of ``actual`` within 1e-6 (relative, or absolute) of ``expected``'s."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def summary(loss, grads) -> list:
    """loss, gradient norm, Σ|gradient|, the first and the last 3 gradient entries (parameters in model order)."""
    flat = torch.cat([grad.flatten() for grad in grads])
    return [float(loss), flat.norm().item(), flat.abs().sum().item(), *flat[:3].tolist(), *flat[-3:].tolist()]


def hapo_case(model_dir, tmp_path) -> dict:
    trainer = make_trainer(model_dir, tmp_path, policy_loss="hapo", dual_clip_c=10.0, num_iterations=2,
                           max_completion_length=8, **FLOAT64)
    dataset = train_dataset()
    rows = [dataset[0]] * 4 + [dataset[1]] * 4
    torch.manual_seed(0)
    trainer._generate_and_score_completions(rows)
    batch = off_policy(trainer._generate_and_score_completions(rows))
    return {"advantages": batch["advantages"].abs().sum().item(), "entropy_signal": batch["entropy_signal"].sum().item(),
            "update": summary(*loss_and_grads(trainer, [batch]))}


def rank_grpo_case(model_dir, tmp_path) -> dict:
    # epsilon 0.2: the lower clip c203bc0 applied (TRL's default ε; the rank_grpo default is now the paper's 0.06)
    trainer = make_trainer(model_dir, tmp_path, policy_loss="rank_grpo", rank_list_length=3, epsilon=0.2, **FLOAT64)
    advantages = rank_advantages(trainer)
    batch = make_batch(trainer)
    batch |= {"rank_ids": hand_made_rank_ids(batch, 3), "advantages": advantages[:, : batch["completion_ids"].size(1)]}
    return {"advantages": [advantages.sum().item(), advantages.abs().sum().item()],
            "update": summary(*loss_and_grads(trainer, [batch]))}


def attention_credit_case(model_dir, tmp_path) -> dict:
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", **ATTENTION_CREDIT, **FLOAT64)
    batch = make_batch(trainer)
    advantages = attention_credit_advantages(trainer, batch)
    return {"advantages": [advantages.sum().item(), advantages.abs().sum().item()],
            "update": summary(*loss_and_grads(trainer, [batch | {"advantages": advantages}]))}


def cdpo_case(tmp_path, **options) -> dict:
    from tokenweave.models import build_tiny_llama

    policy, tokenizer = build_tiny_llama(seed=0)
    reference, _ = build_tiny_llama(seed=1)
    models = (policy.double(), reference.double(), tokenizer)

    def scores(n, index):
        return [(index + 3 * t) % 10 / 10 for t in range(n)]

    dataset = with_columns(pairs_dataset(), tokenizer, scores, scores, names=("chosen_scores", "rejected_scores"))
    trainer = make_dpo_trainer(tmp_path, models, dataset, loss_type="cdpo", **options)
    loss, grads = dpo_loss_and_grads(trainer, first_batch(trainer))
    return {"update": summary(loss, list(grads.values()))}


PINNED = {  # computed at c203bc0 (module docstring)
    'hapo': {'advantages': 57.93226623535156, 'entropy_signal': -13.186325073242188, 'update': [0.645683765411377, 1.6613897942184501, 172.03973064790182, 0.013716652058064938, 0.0030694224406033754, -0.013825779780745506, 0.005681074214111181, -0.004038241677341242, -0.0005371146833580554]},
    'rank_grpo': {'advantages': [16.843517303466797, 352.6059875488281], 'update': [0.05327083170413971, 2.3169463141389497, 242.71190307620824, 0.003802285995334387, 0.0005991878570057452, -0.0010969486320391297, -0.003054296653622954, 0.0075105614780498365, -0.001374424857307207]},
    'attention_credit': {'advantages': [1.4362447261810303, 31.299097061157227], 'update': [0.022956233471632004, 2.8385565802379253, 297.3878716376193, -0.0022311622742563486, 0.00015471948427148163, 0.0021071424707770348, -0.0025964274476500027, -0.0033913721875874266, -0.004135716539555784]},
    'cdpo_none': {'update': [0.4190274477005005, 11.3973344207308, 1116.282440826703, 0.02873082086443901, -0.027863677591085434, -7.146247662603855e-05, 0.010180279957088062, -0.008041658010993581, 0.021760718639573382]},
    'cdpo_shuffle': {'update': [0.44456255435943604, 12.90602995968044, 1254.2490992081641, 0.031590498983860016, -0.028250770643353462, -0.0012014935491606593, 0.01034321879330656, -0.007898898969544068, 0.027784904949061908]},
}


def test_hapo_is_pinned(model_dir, tmp_path):
    assert_pinned(hapo_case(model_dir, tmp_path), PINNED["hapo"])


def test_rank_grpo_is_pinned(model_dir, tmp_path):
    assert_pinned(rank_grpo_case(model_dir, tmp_path), PINNED["rank_grpo"])


def test_attention_credit_is_pinned(model_dir, tmp_path):
    assert_pinned(attention_credit_case(model_dir, tmp_path), PINNED["attention_credit"])


@pytest.mark.parametrize("control", ["none", "shuffle"])
def test_cdpo_is_pinned(tmp_path, control):
    options = {} if control == "none" else {"signal_control": "shuffle", "signal_control_seed": 3}
    assert_pinned(cdpo_case(tmp_path, **options), PINNED[f"cdpo_{control}"])
