"""The perturbation and forking tests of ``tokenweave evidence`` on a model with hand-made logits: the token replaced
is the one chosen, its replacement the second-ranked token, the continuation greedy, the entropy the distribution's;
the random control draws from the same completion; the calculation tokens of an arithmetic trajectory."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenweave.data.arithmetic_errors import calculation_spans
from tokenweave.inference import perturbation
from tokenweave.inference.generation import chat_prompt_ids
from tokenweave.inference.perturbation import greedy_trajectories, replace_and_continue
from tokenweave.models import build_tiny_llama
from tokenweave.pipelines.evidence.perturbation import calculation_tokens, random_positions, top_positions

PROMPT = [{"role": "user", "content": "add"}]


def table_model(tokenizer, table: dict[int, dict[int, float]]) -> LlamaForCausalLM:
    """A one-layer Llama whose next-token logits depend on the current token only: ``table[i][j]`` is the logit of
    ``j`` after ``i`` (0 for the pairs not given). The layer adds nothing (its output projections are 0), the embedding
    is one-hot, so the final norm scales it by sqrt(hidden) and the untied head holds the table divided by that."""
    vocab, hidden = len(tokenizer), 128
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         rms_norm_eps=1e-12)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.model.layers:
            module.self_attn.o_proj.weight.zero_()
            module.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        head = torch.zeros(vocab, hidden)
        for current, row in table.items():
            for following, logit in row.items():
                head[following, current] = logit / math.sqrt(hidden)
        model.lm_head.weight.copy_(head)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def setting():
    """The chain after the prompt: greedy '1', '2', EOS; second-ranked '3' at the first position (then '4', EOS) and
    '5' at the second (then EOS)."""
    tokenizer = build_tiny_llama()[1]
    tokenizer.padding_side = "left"
    ids = {char: tokenizer.convert_tokens_to_ids(char) for char in "12345"}
    eos, last = tokenizer.eos_token_id, chat_prompt_ids(tokenizer, [PROMPT])[0][-1]
    table = {
        last: {ids["1"]: 5.0, ids["3"]: 4.0},
        ids["1"]: {ids["2"]: 6.0, ids["5"]: 3.0},
        ids["2"]: {eos: 7.0},
        ids["3"]: {ids["4"]: 7.0},
        ids["4"]: {eos: 7.0},
        ids["5"]: {eos: 7.0},
    }
    return tokenizer, table_model(tokenizer, table), ids, table[last]


def test_greedy_trajectory_records_each_positions_entropy_and_second_ranked_token(setting):
    tokenizer, model, ids, first_row = setting
    [trajectory] = greedy_trajectories(model, tokenizer, [PROMPT], max_new_tokens=8)
    assert trajectory.completion_ids == [ids["1"], ids["2"], tokenizer.eos_token_id]
    assert trajectory.second_ids[:2] == [ids["3"], ids["5"]]
    assert trajectory.text == "12" and trajectory.answer == "12"
    # entropy of softmax over the vocabulary: logits 5 and 4 on two tokens, 0 on the others
    logits = torch.zeros(len(tokenizer))
    for token, logit in first_row.items():
        logits[token] = logit
    probs = logits.softmax(-1)
    assert trajectory.entropy[0] == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-4)
    assert trajectory.candidates(tokenizer.eos_token_id) == 2


def test_replace_and_continue_puts_the_second_ranked_token_at_the_chosen_position(setting, monkeypatch):
    tokenizer, model, ids, _ = setting
    trajectories = greedy_trajectories(model, tokenizer, [PROMPT, PROMPT], max_new_tokens=8)
    monkeypatch.setattr(perturbation, "extract_answer", lambda text: text)  # the answer is the whole completion
    answers = replace_and_continue(model, tokenizer, trajectories, [(0, 0), (1, 1), (0, 1)], max_new_tokens=8)
    assert answers == ["34", "15", "15"]  # '1' → '3' then greedy '4'; '2' → '5'
    # the budget counts the kept and the replaced tokens: with 2 tokens, the continuation after '3' is cut
    assert replace_and_continue(model, tokenizer, trajectories, [(0, 0)], max_new_tokens=1) == ["3"]
    with pytest.raises(IndexError, match="no completion position 5"):
        replace_and_continue(model, tokenizer, trajectories, [(0, 5)])


def test_top_positions_and_the_random_control_from_the_same_completion():
    assert top_positions([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]  # ties: the earlier position first
    drawn = random_positions(7, 3, 4, 2)
    assert len(set(drawn)) == 3 and all(0 <= position < 7 for position in drawn)
    assert drawn == random_positions(7, 3, 4, 2)  # seeded by (seed, row) only
    assert drawn != random_positions(7, 3, 4, 2, 1)  # another draw of the same row
    draws = {tuple(random_positions(7, 3, 4, row)) for row in range(20)}
    assert len(draws) > 10  # each trajectory its own draw
    counts = torch.zeros(5)
    for row in range(2000):
        counts[random_positions(5, 1, 0, row)] += 1
    assert counts.min() > 300  # uniform over the completion's candidates (400 expected each)


def test_calculation_tokens_are_those_inside_a_step_line():
    text = "First:\n23 + 45 = 68\nThe answer is 68."
    assert [text[a:b] for a, b in calculation_spans(text)] == ["23 + 45 = 68"]
    tokenizer = build_tiny_llama()[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    flags = calculation_tokens(tokenizer, ids)
    pieces = [tokenizer.decode([token]) for token in ids]
    inside = "".join(piece for piece, flag in zip(pieces, flags, strict=True) if flag)
    assert inside == "23 + 45 = 68"


def test_the_measurements_perturb_the_signals_top_tokens_and_random_ones_of_the_same_trajectory(monkeypatch):
    """Hand-made trajectories, FAI, γ and entropies: the tokens perturbed are each trajectory's top-FAI and
    top-entropy tokens and its random ones (all within its candidates); each row's values are the shares of changed
    answers at them; the calculation row compares the credited tokens with all tokens."""
    from tokenweave.inference.perturbation import GreedyTrajectory
    from tokenweave.pipelines.evidence import perturbation as module
    from tokenweave.trainers.attention import AttentionCredit

    tokenizer = build_tiny_llama()[1]
    text = "1 + 2 = 3\nThe answer is 3."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    entropy = [0.0] * n
    entropy[4], entropy[12] = 2.0, 1.0  # top-2 entropy: positions 4, 12
    fai = torch.zeros(2, n + 1)
    fai[:, 0], fai[:, 6] = 0.9, 0.5  # top-2 FAI: positions 0, 6
    fai[:, n] = 5.0  # the final EOS has the highest FAI, but is no candidate
    gamma = torch.ones(2, n + 1)
    gamma[:, 0] = gamma[:, 2] = 1.5  # credited: '1' and '+', both in the calculation "1 + 2 = 3"
    trajectories = [GreedyTrajectory([1, 2], ids + [tokenizer.eos_token_id], entropy + [9.0], [5] * (n + 1), text, "3")
                    for _ in range(2)]  # and the highest entropy
    monkeypatch.setattr(module, "load_run_dataset", lambda *args, **kwargs: {"prompt": [[], []]})
    monkeypatch.setattr(module, "greedy_trajectories", lambda *args, **kwargs: trajectories)
    monkeypatch.setattr(module, "_credit", lambda *args: AttentionCredit(gamma, torch.zeros_like(fai), fai))
    asked = []

    def answers(model, tokenizer_, trajectories_, perturbations, **kwargs):
        asked.extend(perturbations)
        return ["4" if position in (0, 4) else "3" for _, position in perturbations]  # these two change the answer

    monkeypatch.setattr(module, "replace_and_continue", answers)
    anchors, matched, forking, calculations, calculations_matched = module.perturbation_evidence(
        None, tokenizer, seeds=[7], num_questions=2, top_k=2)
    randoms = {row: random_positions(n, 2, 7, row) for row in (0, 1)}
    scorable = [0, 6]  # the positions with FAI > 0 (not the final EOS): the position-matched draw is among them
    matched_draws = {row: [scorable[i] for i in random_positions(2, 2, 7, row, 1)] for row in (0, 1)}
    assert sorted(asked) == sorted({(row, p) for row in (0, 1) for p in [0, 6, 4, 12, *randoms[row]]})
    assert all(position < n for _, position in asked)  # never the final EOS
    for row in (0, 1):
        control = sum(p in (0, 4) for p in randoms[row]) / 2
        assert anchors.pairs[7][row] == (0.5, control) and forking.pairs[7][row] == (0.5, control)
        assert sorted(matched_draws[row]) == scorable and matched.pairs[7][row] == (0.5, 0.5)
    calculation_share = sum(calculation_tokens(tokenizer, ids)) / n
    assert calculations.pairs[7] == [(1.0, calculation_share)] * 2
    flags = calculation_tokens(tokenizer, ids)
    assert calculations_matched.pairs[7] == [(1.0, (flags[0] + flags[6]) / 2)] * 2  # among the FAI > 0 tokens
