"""The token-signal interface and its host, common to SFT, DPO and GRPO: the README's signal in all three trainers; a
signal for one trainer refused by name in another and leaving every other config as it was; one per-token column code
for SFT and DPO; the random controls (shuffle, inverse) by hand; a signal's NaN, state and loss inputs; preference
losses with open inputs and from user code."""

import sys

import pytest
import torch
import yaml

from tokenweave.checks import ConfigError
from tokenweave.config import parse_run_config
from tokenweave.tokens.controls import inverse_selection
from tokenweave.trainers import TokenDPOConfig, TokenGRPOConfig, TokenSFTConfig
from tokenweave.trainers.finite import NonFiniteError
from tokenweave.trainers.signals import TOKEN_SIGNALS, TokenSignal, register_token_signal

from . import test_dpo_trainer as dpo
from . import test_sft_trainer as sft
from .conftest import CONFIGS, REPO_ROOT, with_columns
from .grpo_harness import assert_same_update, loss_and_grads, make_trainer, train_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAMMA = 0.9


def dpo_models():
    """(policy, reference, tokenizer) as ``test_dpo_trainer``'s fixture makes them."""
    from tokenweave.models import build_tiny_llama

    policy, tokenizer = build_tiny_llama(seed=0)
    return policy, build_tiny_llama(seed=1)[0], tokenizer


def readme_signal_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Adding a token signal"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```\n", start)]


@pytest.fixture
def readme_signal(tmp_path, monkeypatch):
    """The README's worked example, written to a module and picked by its path (it registers itself)."""
    (tmp_path / "readme_signal.py").write_text(readme_signal_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "readme_signal:EarlyTokens"
    TOKEN_SIGNALS.pop("early_tokens", None)
    sys.modules.pop("readme_signal", None)


def powers(n, index):
    return [GAMMA ** t for t in range(n)]


def test_the_readme_signal_in_sft(model_dir, tmp_path, readme_signal):
    """γ^t on SFT's label tokens: the loss and gradients of the same weights as a weight column (``weights``)."""
    trainer = sft.make_trainer(model_dir, tmp_path, token_signals=[readme_signal])
    assert trainer.args.token_signals == ["early_tokens"] and list(trainer.signals) == ["early_tokens"]
    column = sft.make_trainer(model_dir, tmp_path, dataset=sft.with_weights(model_dir, tmp_path, powers),
                              token_signals=["weights"])
    expected = sft.loss_and_grads(column, [sft.collate(column, range(6))])
    sft.assert_same(sft.loss_and_grads(trainer, [sft.collate(trainer, range(6))]), expected)
    plain = sft.make_trainer(model_dir, tmp_path)
    assert abs(sft.loss_and_grads(plain, [sft.collate(plain, range(6))])[0] - expected[0]) > 1e-3


def test_the_readme_signal_in_dpo(tmp_path, readme_signal):
    """γ^t on each completion's tokens, in cDPO's weighted log-ratio sums: cDPO on weight columns of γ^t."""
    models = dpo_models()
    trainer = dpo.make_trainer(tmp_path, models, dpo.pairs_dataset(), loss_type="cdpo", token_signals=[readme_signal])
    assert trainer.args.token_signals == ["early_tokens"]
    columns = with_columns(dpo.pairs_dataset(), models[2], powers, powers)
    weighted = dpo.make_trainer(tmp_path, models, columns, loss_type="cdpo")
    expected = dpo.loss_and_grads(weighted, dpo.first_batch(weighted))
    dpo.assert_same_loss_and_grads(dpo.loss_and_grads(trainer, dpo.first_batch(trainer)), expected)


def test_the_readme_signal_in_grpo(model_dir, tmp_path, readme_signal):
    """γ^t on the completion tokens: the same update as the same column given as ``token_weights_column``."""
    trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_signals=[readme_signal])
    dataset = train_dataset()
    output = trainer._generate_and_score_completions([dataset[0]] * 4 + [dataset[1]] * 4)
    mask = output["completion_mask"]
    batch = output | {"advantages": torch.randn(8, generator=torch.Generator().manual_seed(0)),
                      "early_weights": GAMMA ** torch.arange(mask.size(1)) * mask}
    weighted = loss_and_grads(trainer, [batch])
    column = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_weights_column="early_weights")
    assert_same_update(weighted, loss_and_grads(column, [batch]))
    plain = make_trainer(model_dir, tmp_path, policy_loss="dapo")
    assert abs(loss_and_grads(plain, [batch])[0] - weighted[0]) > 1e-4
    with pytest.raises(ValueError, match="already registered as 'early_tokens'"):
        register_token_signal("early_tokens")(type("Other", (TokenSignal,), {}))


# ---------------------------------------------------------------------------------------------------------------
# A signal for one trainer: refused by name in another, and no other config notices it.
# ---------------------------------------------------------------------------------------------------------------
def shipped_configs() -> dict:
    """Every shipped run config (CPU and GPU) of a GRPO or DPO run, by path."""
    paths = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "gpu").glob("*.yaml"))
    return {path: yaml.safe_load(path.read_text()) for path in paths
            if yaml.safe_load(path.read_text()).get("method") in ("grpo", "dpo")}


def resolved_signals() -> dict:
    cpu_run = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]  # the GPU configs' as CPU runs here
    return {path: parse_run_config(["--config", str(path), *cpu_run])[1].token_signals for path in shipped_configs()}


def test_a_signal_for_one_trainer_is_refused_in_another_and_leaves_their_configs_alone(model_dir, tmp_path):
    before = resolved_signals()
    assert len(before) >= 10
    TOKEN_SIGNALS.pop("sft_only_test", None)

    @register_token_signal("sft_only_test")
    class SftOnly(TokenSignal):
        supports = frozenset({"sft"})
        provides = frozenset({"token_weights"})

        @classmethod
        def implied(cls, args):
            return bool(args.assistant_only_loss)  # an SFT field: a GRPO or DPO config has none

        def token_inputs(self, batch):
            return {"token_weights": 0.5 * batch.mask}

    try:
        assert resolved_signals() == before  # every GRPO and DPO config as it was: the signal is not asked
        for config_class, kind in ((TokenGRPOConfig, "grpo"), (TokenDPOConfig, "dpo")):
            with pytest.raises(ConfigError, match=f"'sft_only_test' \\(sft\\) do\\(es\\) not support the {kind} trainer"):
                config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, token_signals=["sft_only_test"])
        trainer = sft.make_trainer(model_dir, tmp_path, token_signals=["sft_only_test"])  # and it works in SFT
        plain = sft.make_trainer(model_dir, tmp_path)
        halved = sft.loss_and_grads(trainer, [sft.collate(trainer, range(6))])[0]
        assert halved == pytest.approx(0.5 * sft.loss_and_grads(plain, [sft.collate(plain, range(6))])[0], rel=1e-6)
        # implied by its own field
        implied = TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True)
        assert implied.token_signals == ["sft_only_test"]
    finally:
        TOKEN_SIGNALS.pop("sft_only_test")


def test_a_dpo_and_an_sft_run_share_the_per_token_column_code(model_dir, tmp_path, monkeypatch):
    """The ``weights`` signal in SFT and in DPO: the same column check and the same collator class, called by both."""
    import tokenweave.data.token_columns as token_columns
    from tokenweave.trainers.collators import TokenColumnsCollator

    calls = []
    check = token_columns.check_token_columns

    def spy(example, index, **kwargs):
        calls.append(kwargs["kind"])
        return check(example, index, **kwargs)

    monkeypatch.setattr(token_columns, "check_token_columns", spy)
    sft_trainer = sft.make_trainer(model_dir, tmp_path, dataset=sft.with_weights(model_dir, tmp_path, powers),
                                   token_signals=["weights"])
    models = dpo_models()
    columns = with_columns(dpo.pairs_dataset(), models[2], powers, powers)
    dpo_trainer = dpo.make_trainer(tmp_path, models, columns, loss_type="cdpo", token_signals=["weights"])
    assert set(calls) == {"sft", "dpo"}
    assert type(sft_trainer.data_collator) is type(dpo_trainer.data_collator) is TokenColumnsCollator
    assert sft.collate(sft_trainer, range(6))["weights"].sum() > 0 and dpo.first_batch(dpo_trainer)["weights"].sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# The random controls.
# ---------------------------------------------------------------------------------------------------------------
def test_the_inverse_of_a_selection_by_hand():
    weights = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 2.0, 0, 3.0, 0, 0]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.5, 0.2, 7.0], [0.3, 0.9, 0.1, 0.7, 0.4, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    # row 0: 2 selected of the 5 valid tokens; the 2 lowest scores are positions 1 (0.1) and 4 (0.2)
    # row 1: 2 selected, weights 2 (score 0.9) and 3 (score 0.7); the lowest: position 5 (0.0) gets the top one's 2,
    # position 2 (0.1) the next one's 3
    expected = torch.tensor([[0.0, 1, 0, 0, 1, 0], [0, 0, 3.0, 0, 0, 2.0]])
    assert torch.equal(inverse_selection(weights, scores, mask), expected)


@pytest.fixture
def selection_signal():
    """A toy SFT selection: the upper half of each row's label tokens by their log-prob, ranked by it."""

    @register_token_signal("selection_test")
    class Selection(TokenSignal):
        supports = frozenset({"sft"})
        provides = frozenset({"token_weights"})
        weighs_tokens = selection = True
        seen = []

        def token_inputs(self, batch):
            scores = batch.logps.detach().masked_fill(batch.mask == 0, float("-inf"))
            counts = batch.mask.sum(-1, keepdim=True) // 2
            ranks = scores.argsort(-1, descending=True).argsort(-1)
            weights = (ranks < counts).float() * batch.mask
            type(self).seen.append((weights, scores, batch.mask))
            return {"token_weights": weights, "token_scores": scores}

    yield Selection
    TOKEN_SIGNALS.pop("selection_test")


def test_the_inverse_control_selects_the_other_end(model_dir, tmp_path, selection_signal):
    """``signal_control: inverse``: each row the same number of label tokens, the lowest-ranked ones: the loss is the
    NLL of exactly those tokens (by hand, from the selection's own ranking)."""
    trainer = sft.make_trainer(model_dir, tmp_path, token_signals=["selection_test"], signal_control="inverse")
    batch = sft.collate(trainer, range(6))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    weights, scores, mask = selection_signal.seen[-1]
    bottom = torch.zeros_like(weights)
    for row in range(weights.size(0)):
        valid = mask[row].bool().nonzero().squeeze(-1)
        count = int(weights[row].sum())
        bottom[row, valid[scores[row, valid].argsort()[:count]]] = 1.0
    assert (bottom.sum(-1) == weights.sum(-1)).all() and not torch.equal(bottom, weights)
    with torch.no_grad():
        logps = trainer.model(**{k: v for k, v in batch.items()}, fused_lm_head=True).log_probs
    torch.testing.assert_close(loss.detach(), -(bottom * logps).sum() / mask.sum(), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="'inverse' takes the other end of a selection's ranking"):
        TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, token_signals=["weights"],
                       signal_control="inverse")


def test_the_shuffle_control_in_sft_is_seeded_by_the_dataset_row(model_dir, tmp_path, selection_signal):
    """``signal_control: shuffle``: each row's own weights (the same count selected) on random label tokens of it,
    and the loss is the NLL under them; the permutation is fixed by the seed and the dataset row, so a micro-batch
    of rows 3-5 places their weights as the batch of all 6 does."""
    trainer = sft.make_trainer(model_dir, tmp_path, token_signals=["selection_test"], signal_control="shuffle")
    batch = sft.collate(trainer, range(6))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    weights, _, mask = selection_signal.seen[-1]
    controlled = trainer.signal_control(weights, mask, batch["signal_row"].unsqueeze(1))
    assert torch.equal(controlled.sum(-1), weights.sum(-1)) and not torch.equal(controlled, weights)
    assert not controlled[~mask.bool()].any()
    with torch.no_grad():
        logps = trainer.model(**{k: v for k, v in batch.items() if k != "signal_row"}, fused_lm_head=True).log_probs
    torch.testing.assert_close(loss.detach(), -(controlled * logps).sum() / mask.sum(), atol=1e-6, rtol=0)

    half = sft.collate(trainer, range(3, 6))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(half))
    half_weights, _, half_mask = selection_signal.seen[-1]
    half_controlled = trainer.signal_control(half_weights, half_mask, half["signal_row"].unsqueeze(1))
    for i, row in enumerate(range(3, 6)):
        assert torch.equal(half_controlled[i][half_mask[i].bool()], controlled[row][mask[row].bool()])


# ---------------------------------------------------------------------------------------------------------------
# A signal's NaN, state and loss inputs, in SFT; preference losses with open inputs.
# ---------------------------------------------------------------------------------------------------------------
def test_a_signal_in_sft_returning_nan_stops_naming_it_and_its_state_is_checkpointed(model_dir, tmp_path):
    from tokenweave.trainers.host import SIGNAL_STATE_FILE

    @register_token_signal("stateful_test")
    class Stateful(TokenSignal):
        supports = frozenset({"sft"})
        provides = frozenset({"token_weights"})

        def __init__(self, trainer):
            super().__init__(trainer)
            self.calls = 0

        def token_inputs(self, batch):
            self.calls += 1
            return {"token_weights": batch.mask * (float("nan") if self.calls == 3 else 1.0)}

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    try:
        trainer = sft.make_trainer(model_dir, tmp_path, token_signals=["stateful_test"])
        batch = sft.collate(trainer, range(6))
        for _ in range(2):
            trainer.compute_loss(trainer.model, dict(batch))
        trainer._save_rng_state(str(tmp_path))
        assert torch.load(tmp_path / SIGNAL_STATE_FILE) == {"stateful_test": {"calls": 2}}
        resumed = sft.make_trainer(model_dir, tmp_path, token_signals=["stateful_test"])
        resumed._load_rng_state(str(tmp_path))
        assert resumed.signals["stateful_test"].calls == 2
        with pytest.raises(NonFiniteError, match="token signal 'stateful_test' returned a NaN .* in 'token_weights'"):
            resumed.compute_loss(resumed.model, dict(batch))
    finally:
        TOKEN_SIGNALS.pop("stateful_test")


def test_token_weights_in_grpo_need_a_policy_loss(tmp_path, readme_signal):
    with pytest.raises(ConfigError, match=r"\['early_tokens'\] weigh the per-token loss: they need a policy_loss"):
        TokenGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, token_signals=[readme_signal])


def test_loss_inputs_a_trainer_cannot_take_are_refused(tmp_path):
    from tokenweave.losses.preference import PREFERENCE_LOSSES, register_preference_loss

    @register_token_signal("rewards_test")
    class Rewards(TokenSignal):
        supports = frozenset({"sft", "dpo"})
        provides = frozenset({"token_rewards"})

    register_preference_loss("rewards_loss_test", needs=("token_rewards",))(lambda pairs, config, **inputs: None)
    options = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    try:
        with pytest.raises(ConfigError, match=r"the SFT loss takes token weights and added per-token terms only"):
            TokenSFTConfig(**options, token_signals=["rewards_test"])
        with pytest.raises(ConfigError, match=r"loss_type 'rewards_loss_test' needs \['token_rewards'\], which no token"):
            TokenDPOConfig(**options, loss_type="rewards_loss_test")
        assert TokenDPOConfig(**options, loss_type="rewards_loss_test", token_signals=["rewards_test"])
        with pytest.raises(ConfigError, match=r"give \['token_rewards'\], which loss_type 'tdpo2' does not read"):
            TokenDPOConfig(**options, loss_type="tdpo2", token_signals=["rewards_test"])
        with pytest.raises(ConfigError, match=r"which TRL's loss_type \['sigmoid'\] does not read"):
            TokenDPOConfig(**options, loss_type="sigmoid", token_signals=["rewards_test"])
    finally:
        TOKEN_SIGNALS.pop("rewards_test")
        PREFERENCE_LOSSES.pop("rewards_loss_test")


def half_weighted_dpo(pairs, config, *, token_weights):
    """A user's preference loss (``loss_type: tests.test_signal_host:half_weighted_dpo``): cDPO at half the weights."""
    from tokenweave.losses.preference import token_weighted_dpo_loss

    return token_weighted_dpo_loss(pairs, *(0.5 * w for w in token_weights), beta=config.beta)


def test_a_preference_loss_from_user_code(tmp_path):
    """``loss_type: package.module:function``, with the token weights of a signal that is listed: cDPO on halved
    weights; without a listed signal, refused (a user's function needs nothing until registered with its needs)."""
    from tokenweave.losses.preference import PREFERENCE_LOSSES, register_preference_loss

    models = dpo_models()
    name = "tests.test_signal_host:half_weighted_dpo"
    register_preference_loss("half_weighted_dpo_test", needs=("token_weights",))(half_weighted_dpo)
    try:
        columns = with_columns(dpo.pairs_dataset(), models[2], powers, powers)
        user = dpo.make_trainer(tmp_path, models, columns, loss_type=name, token_signals=["weights"])
        assert user.token_loss_type == name
        halved = with_columns(dpo.pairs_dataset(), models[2], *(lambda n, i: [0.5 * w for w in powers(n, i)],) * 2)
        expected = dpo.make_trainer(tmp_path, models, halved, loss_type="cdpo")
        dpo.assert_same_loss_and_grads(dpo.loss_and_grads(user, dpo.first_batch(user)),
                                       dpo.loss_and_grads(expected, dpo.first_batch(expected)))
    finally:
        PREFERENCE_LOSSES.pop("half_weighted_dpo_test")
        PREFERENCE_LOSSES.pop(name, None)


def test_weight_rules_in_dpo(tmp_path):
    """Span rules on each completion: ``The answer is N`` of the chosen and of the rejected answer get 2."""
    models = dpo_models()
    trainer = dpo.make_trainer(tmp_path, models, dpo.pairs_dataset(), loss_type="cdpo", token_signals=["weight_rules"],
                               weight_rules={r"The answer is \d+": 2.0})
    tokenizer = models[2]
    for row in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            ids, weights = row[f"{side}_ids"], row[f"{side}_rule_weights"]
            answer = row[side][0]["content"].split("The answer is ")[1].rstrip(".")
            matched = sft.spans_of(ids, tokenizer(f"The answer is {answer}", add_special_tokens=False)["input_ids"])
            assert weights == [2.0 if t in matched else 1.0 for t in range(len(ids))] and matched


def test_dpo_reference_model_path_is_the_losss_reference(tmp_path):
    """``reference_model_path`` in DPO: the reference of the loss (TRL's ``ref_model``, loaded from the path), the
    same loss and gradients as the same model given as ``ref_model``."""
    policy, reference, tokenizer = dpo_models()
    reference.save_pretrained(tmp_path / "reference")
    tokenizer.save_pretrained(tmp_path / "reference")
    columns = with_columns(dpo.pairs_dataset(), tokenizer, powers, powers)
    given = dpo.make_trainer(tmp_path, (policy, reference, tokenizer), columns, loss_type="cdpo")
    by_path = dpo.make_trainer(tmp_path, (policy, None, tokenizer), columns, loss_type="cdpo",
                               reference_model_path=str(tmp_path / "reference"))
    assert by_path.frozen_models.loaded == {}  # TRL's ref_model is the one reference
    dpo.assert_same_loss_and_grads(dpo.loss_and_grads(by_path, dpo.first_batch(by_path)),
                                   dpo.loss_and_grads(given, dpo.first_batch(given)))


def test_a_grpo_signal_reads_the_reference_of_a_lora_policy(model_dir, tmp_path):
    """GRPO with LoRA and ``beta`` 0 (TRL keeps no reference): a signal's ``batch.frozen.logps("reference")`` is the
    policy's with its adapter off, through TRL's own per-token forward."""
    from peft import LoraConfig

    @register_token_signal("grpo_reader_test")
    class Reader(TokenSignal):
        seen = []

        @classmethod
        def frozen_models(cls, args):
            return ("reference",)

        def token_inputs(self, batch):
            type(self).seen.append((batch.frozen.logps("reference"), batch.logps.detach()))
            return {}

    try:
        trainer = make_trainer(model_dir, tmp_path, policy_loss="dapo", token_signals=["grpo_reader_test"],
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        from .grpo_harness import make_batch

        batch = make_batch(trainer)
        trainer.compute_loss(trainer.model, batch)
        reference, policy = Reader.seen[-1]
        with trainer.model.disable_adapter(), torch.no_grad():
            expected = trainer.completion_logps_and_entropies(trainer.model, batch)[0]
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(reference[mask], expected[mask])
        assert (reference[mask] - policy[mask]).abs().max() > 1e-4  # the adapter is off
    finally:
        TOKEN_SIGNALS.pop("grpo_reader_test")
