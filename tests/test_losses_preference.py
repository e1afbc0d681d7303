"""Tests of tokenweave.losses.preference: token-weighted DPO, cDPO weights, TDPO, sequential KL, the registry."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenweave.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLossConfig,
    TokenPairs,
    chunked_sequential_kl,
    critical_token_weights,
    get_preference_loss,
    register_preference_loss,
    sequential_kl,
    tdpo_loss,
    token_weighted_dpo_loss,
)

# A single pair, T = 3, used by the hand-computed tests.
#   chosen   log-ratios lp − ref = [0.5, 0.5, −0.5], all valid           → Σ = 0.5
#   rejected log-ratios lp − ref = [−1, 0, −1], last position is padding → Σ = −1
CHOSEN_LOGPS = [[-1.0, -2.0, -3.0]]
REF_CHOSEN_LOGPS = [[-1.5, -2.5, -2.5]]
CHOSEN_MASK = [[1.0, 1.0, 1.0]]
REJECTED_LOGPS = [[-2.0, -1.0, -4.0]]
REF_REJECTED_LOGPS = [[-1.0, -1.0, -3.0]]
REJECTED_MASK = [[1.0, 1.0, 0.0]]


def hand_pair():
    """The hand-computed pair, as the losses take it."""
    values = (CHOSEN_LOGPS, REJECTED_LOGPS, REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, CHOSEN_MASK, REJECTED_MASK)
    return TokenPairs(*(torch.tensor(v) for v in values))


def random_pairs(batch=4, chosen_len=6, rejected_len=5, seed=0):
    """Random per-token log-probs with ragged masks (every row keeps at least one token)."""
    gen = torch.Generator().manual_seed(seed)

    def logps(length):
        return -torch.rand(batch, length, generator=gen) * 3

    def ragged_mask(length):
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        return (torch.arange(length) < lengths[:, None]).float()

    chosen_logps = logps(chosen_len).requires_grad_()
    rejected_logps = logps(rejected_len).requires_grad_()
    return TokenPairs(
        chosen_logps,
        rejected_logps,
        logps(chosen_len),
        logps(rejected_len),
        ragged_mask(chosen_len),
        ragged_mask(rejected_len),
    )


def plain_dpo_losses(
    chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_mask, rejected_mask, beta
):
    """DPO sigmoid loss (arXiv 2305.18290), written independently of the module under test."""
    chosen_logratio = ((chosen_logps - ref_chosen) * chosen_mask).sum(-1)
    rejected_logratio = ((rejected_logps - ref_rejected) * rejected_mask).sum(-1)
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def loss_and_policy_grads(losses, chosen_logps, rejected_logps):
    grads = torch.autograd.grad(losses.sum(), (chosen_logps, rejected_logps))
    return (losses.detach(), *grads)


# ---------------------------------------------------------------------------------------------------
# token-weighted DPO


def test_token_weighted_dpo_hand_computed():
    pair = hand_pair()
    chosen_weights = torch.tensor([[1.0, 0.5, 2.0]])
    rejected_weights = torch.tensor([[0.5, 1.0, 3.0]])  # 3.0 sits on padding: must be ignored
    # weighted chosen   = 1·0.5 + 0.5·0.5 + 2·(−0.5) = −0.25
    # weighted rejected = 0.5·(−1) + 1·0              = −0.5
    # z = −0.25 − (−0.5) = 0.25, β = 0.5 → β·z = 0.125, loss = log(1 + e^(−0.125))
    out = token_weighted_dpo_loss(pair, chosen_weights, rejected_weights, beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.6325990353171691]))
    torch.testing.assert_close(out.logits, torch.tensor([0.125]))
    # rewards are unweighted: β·Σ(lp − ref) = 0.5·0.5 and 0.5·(−1)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5]))


def test_token_weighted_dpo_label_smoothing_hand_computed():
    pair = hand_pair()
    chosen_weights = torch.tensor([[1.0, 0.5, 2.0]])
    rejected_weights = torch.tensor([[0.5, 1.0, 3.0]])
    # β·z = 0.125 as above; ε = 0.2:
    # loss = 0.8·log(1 + e^(−0.125)) + 0.2·log(1 + e^(0.125)) = 0.6325990… + 0.2·0.125
    out = token_weighted_dpo_loss(
        pair, chosen_weights, rejected_weights, beta=0.5, label_smoothing=0.2
    )
    torch.testing.assert_close(out.losses, torch.tensor([0.6575990353171691]))


def test_token_weighted_dpo_ignores_padding_values():
    pair = hand_pair()
    reference = token_weighted_dpo_loss(pair, beta=0.5)
    pair = pair._replace(
        rejected_logps=torch.tensor([[-2.0, -1.0, float("nan")]]),  # at the padded position
        ref_rejected_logps=torch.tensor([[-1.0, -1.0, 1e4]]),  # at the padded position
    )
    out = token_weighted_dpo_loss(pair, beta=0.5)
    for field in out._fields:
        torch.testing.assert_close(getattr(out, field), getattr(reference, field))


@pytest.mark.parametrize("weights", ["none", "ones"])
def test_unit_weights_equal_plain_dpo(weights):
    pairs = random_pairs()
    chosen_logps, rejected_logps, *_, chosen_mask, rejected_mask = pairs
    expected = loss_and_policy_grads(plain_dpo_losses(*pairs, beta=0.3), chosen_logps, rejected_logps)
    if weights == "none":
        out = token_weighted_dpo_loss(pairs, beta=0.3)
    else:
        out = token_weighted_dpo_loss(
            pairs, torch.ones_like(chosen_mask), torch.ones_like(rejected_mask), beta=0.3
        )
    actual = loss_and_policy_grads(out.losses, chosen_logps, rejected_logps)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)


def test_token_weights_scale_each_token_gradient():
    # d loss / d lp_w,t = −β·σ(−β·z)·w_w,t·m_w,t
    # d loss / d lp_l,t = +β·σ(−β·z)·w_l,t·m_l,t
    pairs = random_pairs(seed=1)
    chosen_logps, rejected_logps, *_, chosen_mask, rejected_mask = pairs
    gen = torch.Generator().manual_seed(2)
    chosen_weights = torch.rand(chosen_mask.shape, generator=gen)
    rejected_weights = torch.rand(rejected_mask.shape, generator=gen)
    beta = 0.2
    out = token_weighted_dpo_loss(pairs, chosen_weights, rejected_weights, beta=beta)
    _, chosen_grad, rejected_grad = loss_and_policy_grads(out.losses, chosen_logps, rejected_logps)
    scale = beta * torch.sigmoid(-out.logits)[:, None]
    torch.testing.assert_close(chosen_grad, -scale * chosen_weights * chosen_mask)
    torch.testing.assert_close(rejected_grad, scale * rejected_weights * rejected_mask)


# ---------------------------------------------------------------------------------------------------
# cDPO weights


def test_critical_token_weights():
    chosen_scores = torch.tensor([[0.2, 0.9, 0.5, 0.7], [0.4, 0.6, 0.3, 0.8]])
    chosen_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rejected_scores = torch.tensor([[0.25, 0.5, 0.9, 0.3], [0.6, 0.2, 0.1, 0.4]])
    rejected_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)

    chosen, rejected = critical_token_weights(chosen_scores, rejected_scores, chosen_mask, rejected_mask)
    # chosen: 1 on valid tokens (EOS included), 0 on padding
    torch.testing.assert_close(chosen, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    # rejected: 1 − s, last valid token (EOS) 1, padding 0; row 2 holds only its EOS
    torch.testing.assert_close(rejected, torch.tensor([[0.75, 0.5, 0.1, 1.0], [1.0, 0.0, 0.0, 0.0]]))

    chosen, rejected_again = critical_token_weights(
        chosen_scores, rejected_scores, chosen_mask, rejected_mask, weight_chosen=True
    )
    # chosen: s, EOS 1, padding 0
    torch.testing.assert_close(chosen, torch.tensor([[0.2, 0.9, 1.0, 0.0], [0.4, 0.6, 0.3, 1.0]]))
    torch.testing.assert_close(rejected_again, rejected)


def test_critical_token_weights_at_marked_eos_positions():
    # EOS marked explicitly: row 0's EOS is followed by a template token, row 1 (truncated) has none.
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.7], [0.4, 0.6, 0.3, 0.8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    eos = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    chosen, rejected = critical_token_weights(
        scores, scores, mask, mask, weight_chosen=True, chosen_eos=eos, rejected_eos=eos
    )
    torch.testing.assert_close(chosen, torch.tensor([[0.2, 1.0, 0.5, 0.0], [0.4, 0.6, 0.3, 0.8]]))
    torch.testing.assert_close(rejected, torch.tensor([[0.8, 1.0, 0.5, 0.0], [0.6, 0.4, 0.7, 0.2]]))


def test_critical_token_weights_empty_row_stays_zero():
    scores = torch.tensor([[0.3, 0.4]])
    empty = torch.zeros(1, 2)
    chosen, rejected = critical_token_weights(scores, scores, empty, empty, weight_chosen=True)
    assert chosen.eq(0).all() and rejected.eq(0).all()


# ---------------------------------------------------------------------------------------------------
# TDPO

CHOSEN_SEQ_KL = 0.3
REJECTED_SEQ_KL = 0.8


def hand_tdpo(variant):
    """Δ_w = 0.5, Δ_l = −1, SeqKL_w = 0.3, SeqKL_l = 0.8, β = 0.1, α = 0.5."""
    chosen_seq_kl = torch.tensor([CHOSEN_SEQ_KL], requires_grad=True)
    rejected_seq_kl = torch.tensor([REJECTED_SEQ_KL], requires_grad=True)
    out = tdpo_loss(hand_pair(), chosen_seq_kl, rejected_seq_kl, beta=0.1, alpha=0.5, variant=variant)
    chosen_grad, rejected_grad = torch.autograd.grad(
        out.losses.sum(), (chosen_seq_kl, rejected_seq_kl), materialize_grads=True  # an unused input → 0
    )
    return out, chosen_grad, rejected_grad


def test_tdpo1_hand_computed():
    out, chosen_kl_grad, rejected_kl_grad = hand_tdpo("tdpo1")
    # logits = (0.5 − (−1)) − (0.8 − 0.3) = 1.0 (α is not used); β·logits = 0.1
    torch.testing.assert_close(out.logits, torch.tensor([0.1]))
    torch.testing.assert_close(out.losses, torch.tensor([0.6443966600735709]))  # log(1 + e^(−0.1))
    # rewards β·(Δ + SeqKL): 0.1·(0.5 + 0.3), 0.1·(−1 + 0.8)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.08]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.02]))
    # d loss / d SeqKL_l = β·σ(−0.1) and d loss / d SeqKL_w = −β·σ(−0.1)
    torch.testing.assert_close(rejected_kl_grad, torch.tensor([0.047502081252106004]))
    torch.testing.assert_close(chosen_kl_grad, torch.tensor([-0.047502081252106004]))


def test_tdpo2_hand_computed_and_stop_gradient():
    out, chosen_kl_grad, rejected_kl_grad = hand_tdpo("tdpo2")
    # logits = (0.5 − (−1)) − 0.5·(0.8 − 0.3) = 1.25; β·logits = 0.125
    torch.testing.assert_close(out.logits, torch.tensor([0.125]))
    torch.testing.assert_close(out.losses, torch.tensor([0.6325990353171691]))  # log(1 + e^(−0.125))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.08]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.02]))
    # stopgrad(SeqKL_w): exactly zero; d loss / d SeqKL_l = α·β·σ(−0.125)
    assert chosen_kl_grad.eq(0).all()
    torch.testing.assert_close(rejected_kl_grad, torch.tensor([0.02343953133131219]))


def test_tdpo_rejects_unknown_variant():
    with pytest.raises(ValueError, match="tdpo3"):
        tdpo_loss(hand_pair(), torch.zeros(1), torch.zeros(1), variant="tdpo3")


def test_tdpo2_with_alpha_zero_equals_plain_dpo():
    pairs = random_pairs(seed=3)
    chosen_logps, rejected_logps, *_ = pairs
    gen = torch.Generator().manual_seed(4)
    chosen_seq_kl, rejected_seq_kl = torch.rand(2, 4, generator=gen)
    expected = loss_and_policy_grads(plain_dpo_losses(*pairs, beta=0.3), chosen_logps, rejected_logps)
    out = tdpo_loss(pairs, chosen_seq_kl, rejected_seq_kl, beta=0.3, alpha=0.0, variant="tdpo2")
    actual = loss_and_policy_grads(out.losses, chosen_logps, rejected_logps)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# registry


def test_registry_holds_the_token_level_losses_with_their_inputs():
    import tokenweave.trainers  # noqa: F401  (imports every method's module, each registering its loss)

    assert {name: entry.needs for name, entry in PREFERENCE_LOSSES.items()} == {
        "cdpo": {"token_weights"},
        "tdpo1": {"sequential_kl"},
        "tdpo2": {"sequential_kl"},
        "tgdpo": {"token_rewards"},
        "treg": {"token_rewards"},
        "aligndistil": {"distillation_loss"},
    }
    with pytest.raises(ValueError, match="registered: aligndistil, cdpo, tdpo1, tdpo2, tgdpo, treg"):
        get_preference_loss("tdpo3")
    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("cdpo")(lambda pairs, config: None)
    # needs are open: a token signal gives what the trainer does not compute (the DPO config checks that one does)
    try:
        register_preference_loss("new_test_loss", needs=("token_rewards",))(lambda pairs, config, **inputs: None)
        assert get_preference_loss("new_test_loss").needs == {"token_rewards"}
    finally:
        PREFERENCE_LOSSES.pop("new_test_loss")


def test_registered_losses_are_the_loss_functions_with_the_config():
    pairs = random_pairs(seed=8)
    gen = torch.Generator().manual_seed(9)
    weights = (torch.rand(pairs.chosen_mask.shape, generator=gen), torch.rand(pairs.rejected_mask.shape, generator=gen))
    seq_kl = tuple(torch.rand(2, 4, generator=gen))
    config = PreferenceLossConfig(beta=0.3, label_smoothing=0.1, tdpo_alpha=0.7)
    cases = {
        "cdpo": ({"token_weights": weights}, token_weighted_dpo_loss(pairs, *weights, beta=0.3, label_smoothing=0.1)),
        "tdpo1": ({"sequential_kl": seq_kl}, tdpo_loss(pairs, *seq_kl, beta=0.3, variant="tdpo1")),
        "tdpo2": ({"sequential_kl": seq_kl}, tdpo_loss(pairs, *seq_kl, beta=0.3, alpha=0.7, variant="tdpo2")),
    }
    for name, (inputs, expected) in cases.items():
        out = get_preference_loss(name).fn(pairs, config, **inputs)
        for field in out._fields:
            torch.testing.assert_close(getattr(out, field), getattr(expected, field), msg=f"{name} {field}")


# ---------------------------------------------------------------------------------------------------
# sequential KL


def test_sequential_kl_matches_distributions_and_masks():
    gen = torch.Generator().manual_seed(5)
    policy_logits = torch.randn(2, 5, 7, generator=gen)
    ref_logits = torch.randn(2, 5, 7, generator=gen) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])

    kl = sequential_kl(policy_logits, ref_logits, mask)

    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=ref_logits),
        torch.distributions.Categorical(logits=policy_logits),
    )
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    torch.testing.assert_close(kl[mask.bool()], expected[mask.bool()])
    assert kl[~mask.bool()].eq(0).all()
    assert (kl >= 0).all() and (kl[mask.bool()] > 0).all()
    assert sequential_kl(ref_logits, ref_logits, mask).abs().max() < 1e-6


def test_sequential_kl_fp32_from_bf16_and_gradient_to_policy_only():
    gen = torch.Generator().manual_seed(6)
    policy_logits = torch.randn(1, 3, 11, generator=gen).bfloat16().requires_grad_()
    ref_logits = torch.randn(1, 3, 11, generator=gen).bfloat16().requires_grad_()
    kl = sequential_kl(policy_logits, ref_logits, torch.ones(1, 3))
    assert kl.dtype == torch.float32
    kl.sum().backward()
    # d KL / d policy_logits = p_θ − p_ref
    expected = policy_logits.float().softmax(-1) - ref_logits.float().softmax(-1)
    torch.testing.assert_close(policy_logits.grad.float(), expected, atol=1e-2, rtol=0)
    assert ref_logits.grad is None


def kl_setup(seed=7):
    """Random hidden states, a ragged mask with 13 valid positions, and random linear heads."""
    torch.manual_seed(seed)
    batch, length, hidden, vocab = 3, 7, 16, 50
    policy_hidden = torch.randn(batch, length, hidden, requires_grad=True)
    ref_hidden = torch.randn(batch, length, hidden, requires_grad=True)
    mask = torch.zeros(batch, length)
    mask[0, :7] = 1
    mask[1, 2:5] = 1
    mask[2, :3] = 1
    policy_head = nn.Linear(hidden, vocab)
    ref_head = nn.Linear(hidden, vocab)
    return policy_hidden, ref_hidden, policy_head, ref_head, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])  # 13 valid positions: 4 and 5 leave a remainder
def test_chunked_sequential_kl_matches_unchunked_values_and_gradients(chunk_size):
    policy_hidden, ref_hidden, policy_head, ref_head, mask = kl_setup()
    weights = torch.randn(mask.shape)  # a non-uniform upstream gradient per position

    expected = sequential_kl(policy_head(policy_hidden), ref_head(ref_hidden), mask)
    expected_grads = torch.autograd.grad(
        (expected * weights).sum(), (policy_hidden, policy_head.weight, policy_head.bias)
    )

    kl = chunked_sequential_kl(policy_hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=chunk_size)
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=0)
    assert kl[mask == 0].eq(0).all()
    (kl * weights).sum().backward()
    for actual, wanted in zip(
        (policy_hidden.grad, policy_head.weight.grad, policy_head.bias.grad), expected_grads, strict=True
    ):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=0)
    assert ref_hidden.grad is None
    assert ref_head.weight.grad is None and ref_head.bias.grad is None


def test_chunked_sequential_kl_saves_no_vocabulary_sized_tensor():
    # The point of chunking + checkpointing: no [positions, V] tensor is kept for the backward pass.
    policy_hidden, ref_hidden, policy_head, ref_head, mask = kl_setup()
    vocab = policy_head.out_features
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kl = chunked_sequential_kl(policy_hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=4)
    assert not any(vocab in shape for shape in saved_shapes), saved_shapes
    kl.sum().backward()
    assert policy_head.weight.grad is not None

    # Control: the unchunked computation does keep vocabulary-sized tensors.
    saved_shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequential_kl(policy_head(policy_hidden), ref_head(ref_hidden), mask)
    assert any(vocab in shape for shape in saved_shapes)


def test_chunked_sequential_kl_with_no_valid_position():
    policy_hidden, ref_hidden, policy_head, ref_head, mask = kl_setup()
    kl = chunked_sequential_kl(policy_hidden, ref_hidden, policy_head, ref_head, torch.zeros_like(mask))
    assert kl.shape == mask.shape and kl.eq(0).all()


def test_chunked_sequential_kl_padded_with_empty_chunks_calls_the_heads_a_fixed_number_of_times():
    # num_chunks makes the head calls data-independent (DeepSpeed ZeRO-3): forward + backward recompute.
    policy_hidden, ref_hidden, policy_head, ref_head, mask = kl_setup()
    expected = chunked_sequential_kl(policy_hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=4)
    (expected_grad,) = torch.autograd.grad(expected.sum(), policy_hidden)
    calls = []
    policy_head.register_forward_hook(lambda module, args, output: calls.append("policy"))
    ref_head.register_forward_hook(lambda module, args, output: calls.append("ref"))
    num_needed = -(-int(mask.sum()) // 4)

    kl = chunked_sequential_kl(
        policy_hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=4, num_chunks=num_needed + 3
    )
    (grad,) = torch.autograd.grad(kl.sum(), policy_hidden)
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert calls.count("policy") == calls.count("ref") == 2 * (num_needed + 3)
    with pytest.raises(ValueError, match="num_chunks"):
        chunked_sequential_kl(policy_hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=4, num_chunks=1)
