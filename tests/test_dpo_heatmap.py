"""The DPO token-signal view (``tokenweave dpo-heatmap``): the per-token values a DPO run's token signals give its
token-level loss, for each pair's chosen and rejected completion, as an HTML page and in the terminal; the renderers
on hand-made rows, the refusals, then the command on the tiny model with TGDPO's online rewards and cDPO's weights,
the values drawn read back and checked against ``TokenDPOTrainer.signal_values``."""

import colorsys
import copy
import re
from html import escape
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import (
    LIGHTEST,
    WEIGHT_DARKEST,
    SignalRow,
    diverging_background,
    dpo_signals_from_config,
    render_dpo_html,
    render_dpo_terminal,
    signal_scale,
)
from tokenweave.trainers.dpo import TokenDPOTrainer

from .conftest import CONFIGS

PROMPT = "<user>Add 2 and 3.\n<assistant>"
# TGDPO-like rewards of one pair: the largest |value| is 0.8 (negative), so the scale runs from -0.8 to 0.8
CHOSEN = SignalRow("token_rewards", "chosen", ["2 + 3 =", " 5", ".", "<end>"], [0.4, 0.2, 0.0, -0.1], "pair 0", PROMPT)
REJECTED = SignalRow("token_rewards", "rejected", ["2 + 3 =", " 6", ".", "<end>"], [0.4, -0.8, 0.0, -0.1], "pair 0",
                     PROMPT)
# AlignDistil-like: a per-token loss on the chosen completion only
LOSS_CHOSEN = SignalRow("distillation_loss", "chosen", ["2 + 3 =", " 5", "<end>"], [0.01, 0.03, 0.02], "pair 0", PROMPT)
LOSS_REJECTED = SignalRow("distillation_loss", "rejected", ["2 + 3 =", " 6", "<end>"], None, "pair 0", PROMPT,
                          "AlignDistil distils the chosen responses only")
# cDPO-like weights: chosen 1, rejected 1 - s_t
WEIGHTS = [SignalRow("token_weights", "chosen", ["2 + 3 =", " 5"], [1.0, 1.0], "pair 0", PROMPT),
           SignalRow("token_weights", "rejected", ["2 + 3 =", " 6"], [0.75, 0.25], "pair 0", PROMPT)]
OPTIONS = {"loss_type": ["tgdpo"], "tgdpo_alpha": 0.5}


class Spans(HTMLParser):
    """The titled ``<span>``s of a page, each with the ``<div class="trajectory SIDE">`` it is in (None: outside)."""

    def __init__(self):
        super().__init__()
        self.spans, self.blocks, self._open, self._block = [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "trajectory" in attrs.get("class", ""):
            self._block = {"side": attrs["class"].split()[1], "spans": []}
            self.blocks.append(self._block)
        if tag == "span" and "title" in attrs:
            self._open = attrs | {"text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            if self._block is not None:
                self._block["spans"].append(self._open)
            self._open = None
        if tag == "div":
            self._block = None


def parse(page: str) -> Spans:
    parser = Spans()
    parser.feed(page)
    return parser


def hsl(span: dict) -> tuple[int, int, float]:
    hue, saturation, lightness = re.search(r"hsl\((\d+),(\d+)%,([\d.]+)%\)", span["style"]).groups()
    return int(hue), int(saturation), float(lightness)


def rgb(background: tuple[int, int, float]) -> tuple[int, int, int]:
    hue, saturation, lightness = background
    return tuple(round(255 * channel) for channel in colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100))


def value_of(span: dict) -> float:
    """The value a cell shows on hover: ``token_rewards = -0.2033`` or the weight view's ``weight 0.9; ...``."""
    title = span["title"]
    return float(title.split(" = ")[1] if " = " in title else title.split(";")[0].removeprefix("weight "))


def test_a_diverging_scale_is_white_at_zero_red_below_blue_above_and_symmetric():
    page = render_dpo_html([CHOSEN, REJECTED], method="tgdpo", options=OPTIONS)
    blocks = parse(page).blocks
    assert [block["side"] for block in blocks] == ["chosen", "rejected"]
    cells = {(block["side"], span["text"]): span for block in blocks for span in block["spans"]}
    zero = cells["chosen", "."]
    assert zero["title"] == "token_rewards = 0" and rgb(hsl(zero)) == (255, 255, 255)
    assert rgb(diverging_background(0.0, 0.8)) == (255, 255, 255) and rgb(diverging_background(0.0, 0.0)) == (255,) * 3
    red, green, blue = rgb(hsl(cells["rejected", " 6"]))  # -0.8: the darkest red
    assert red > 2 * blue and red > 2 * green and hsl(cells["rejected", " 6"])[2] == WEIGHT_DARKEST
    red, green, blue = rgb(hsl(cells["chosen", "2 + 3 ="]))  # +0.4: half-way to the darkest blue
    assert blue > red and hsl(cells["chosen", "2 + 3 ="])[2] == pytest.approx(100 - (100 - WEIGHT_DARKEST) / 2)
    assert hsl(cells["chosen", "<end>"])[0] == 0 and hsl(cells["chosen", " 5"])[0] != 0  # -0.1 red, +0.2 blue
    # symmetric: +v and -v equally dark; the legend states the scale's end, the largest |value| shown
    assert diverging_background(0.4, 0.8)[2] == diverging_background(-0.4, 0.8)[2]
    assert '<span class="min">&minus;0.8</span>' in page and '<span class="max">0.8</span>' in page
    assert "symmetric to the largest |value|" in page and "white at 0" in page
    # every cell's hover carries its value
    for row, block in zip([CHOSEN, REJECTED], blocks, strict=True):
        assert [span["text"] for span in block["spans"]] == row.tokens
        assert [value_of(span) for span in block["spans"]] == pytest.approx(row.values)
    # the prompt once per pair, plain; the method and its options; one summary per completion
    assert page.count("Add 2 and 3.") == 1 and "Method: <b>tgdpo</b>; options: loss_type = [&#x27;tgdpo&#x27;]" in page
    assert CHOSEN.summary() == ("pair 0: chosen; token_rewards over its 4 tokens: mean 0.125, min -0.1 ('<end>'), "
                                "max 0.4 ('2 + 3 =')")
    assert f'<p class="summary">{escape(REJECTED.summary())}</p>' in page


def test_the_scale_follows_the_values_shown():
    assert signal_scale("token_rewards", [0.1, 0.2]) == "diverging"  # always centred on 0
    assert signal_scale("token_weights", [-1.0, 2.0]) == "weights"
    assert signal_scale("my_signal", [0.5, -0.1]) == "diverging"  # any other input: by its values
    assert signal_scale("my_signal", [0.5, 0.0]) == "sequential"
    assert signal_scale("distillation_loss", []) == "sequential"
    # a larger |value| in the rows shown makes the same value lighter
    alone = hsl(parse(render_dpo_html([CHOSEN], method="m", options={})).spans[0])[2]
    together = hsl(parse(render_dpo_html([CHOSEN, REJECTED], method="m", options={})).spans[0])[2]
    assert alone == WEIGHT_DARKEST < together


def test_a_sequential_scale_and_a_completion_without_values():
    page = render_dpo_html([LOSS_CHOSEN, LOSS_REJECTED], method="aligndistil", options={})
    chosen, rejected = parse(page).blocks
    lightness = [hsl(span)[2] for span in chosen["spans"]]
    assert lightness[0] == LIGHTEST and lightness[1] == WEIGHT_DARKEST and LIGHTEST > lightness[2] > WEIGHT_DARKEST
    assert [value_of(span) for span in chosen["spans"]] == pytest.approx([0.01, 0.03, 0.02])
    assert len(rejected["spans"]) == 1 and "style" not in rejected["spans"][0]  # plain: no value to colour
    assert rejected["spans"][0]["title"] == "no distillation_loss value: AlignDistil distils the chosen responses only"
    assert LOSS_REJECTED.summary() == ("pair 0: rejected; no distillation_loss values (AlignDistil distils the chosen "
                                       "responses only)")
    assert '<span class="min">0.01</span>' in page and '<span class="max">0.03</span>' in page


def test_weights_are_drawn_as_the_sft_view_draws_them():
    page = render_dpo_html(WEIGHTS, method="cdpo", options={})
    chosen, rejected = parse(page).blocks
    assert [value_of(span) for span in rejected["spans"]] == [0.75, 0.25]
    assert all(hsl(span)[0] == 215 for block in (chosen, rejected) for span in block["spans"])  # the SFT view's blue
    assert hsl(rejected["spans"][1])[2] == LIGHTEST and hsl(chosen["spans"][0])[2] == WEIGHT_DARKEST
    assert "A weighting: each completion token shaded by its weight" in page


def test_the_terminal_view_marks_without_colour_and_colours_with_it():
    rows = [CHOSEN, REJECTED, LOSS_CHOSEN, LOSS_REJECTED]
    text = render_dpo_terminal(rows, method="tgdpo", options=OPTIONS, color=False)
    assert "\x1b" not in text and "method: tgdpo; options: loss_type = ['tgdpo'], tgdpo_alpha = 0.5" in text
    assert "{2 + 3 =|+0.4}{ 6|-0.8}{.|+0}{<end>|-0.1}" in text and "{ 5|0.03}" in text
    assert "== token_rewards: a diverging scale" in text and "== distillation_loss: a sequential scale" in text
    assert text.count(f"--- {REJECTED.summary()}\n") == 1 and f"--- {LOSS_REJECTED.summary()}\n2 + 3 = 6<end>" in text
    coloured = render_dpo_terminal([CHOSEN], method="tgdpo", options={}, color=True)
    assert "\x1b[48;2;255;255;255m\x1b[30m." in coloured  # 0: white
    red = rgb(diverging_background(-0.1, 0.4))
    assert f"\x1b[48;2;{red[0]};{red[1]};{red[2]}m\x1b[30m<end>" in coloured and red[0] > red[2]
    assert "{" not in coloured.split("\n--- ")[1]


def test_rendering_is_a_pure_function_of_the_rows():
    rows = [CHOSEN, REJECTED, LOSS_CHOSEN, LOSS_REJECTED, *WEIGHTS]
    before = copy.deepcopy(rows)
    for color in (True, False):
        assert render_dpo_terminal(rows, method="m", options={}, color=color) == render_dpo_terminal(
            copy.deepcopy(rows), method="m", options={}, color=color)
    assert render_dpo_html(rows, method="m", options={}) == render_dpo_html(copy.deepcopy(rows), method="m", options={})
    assert rows == before
    with pytest.raises(ValueError, match="3 tokens and 2 values"):
        SignalRow("token_rewards", "chosen", ["a", "b", "c"], [0.1, 0.2])


def write_config(tmp_path, base: str, **changes) -> str:
    """``configs/<base>.yaml`` with ``changes``, written under ``tmp_path`` (its output_dir there too)."""
    config = yaml.safe_load((CONFIGS / f"{base}.yaml").read_text()) | {"output_dir": str(tmp_path / "run")} | changes
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("base, changes, message", [
    ("dpo_tiny", {}, r"loss_type \['sigmoid'\] is TRL's.*set loss_type to a token-level loss .*cdpo.*tgdpo"),
    ("tdpo_tiny", {}, r"loss_type 'tdpo2' gets no per-token value.*sequential_kl.*set loss_type"),
    ("sft_tiny", {}, r"method 'sft'; the DPO token-signal view needs a DPO run config"),
])
def test_configs_without_per_token_values_are_refused(tmp_path, base, changes, message):
    config = write_config(tmp_path, base, **changes)
    with pytest.raises(ValueError, match=message) as refusal:
        dpo_signals_from_config(config)
    assert str(refusal.value).startswith(config + ": ") and "\n" not in str(refusal.value)


def test_a_loss_whose_signals_give_no_per_token_value_is_refused(tmp_path, monkeypatch):
    """After the trainer is built (here a stand-in): ``signal_values`` gives nothing per token."""
    import tokenweave.train

    def build_trainer(run_args, training_args, model_args):
        dataset = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}])
        return SimpleNamespace(args=training_args, train_dataset=dataset, data_collator=lambda examples: {},
                               _prepare_inputs=lambda batch: batch, signal_values=lambda batch: {})

    monkeypatch.setattr(tokenweave.train, "build_trainer", build_trainer)
    config = write_config(tmp_path, "tgdpo_tiny")
    with pytest.raises(ValueError, match=r"tgdpo_tiny.yaml: the token signals give loss_type 'tgdpo' no per-token "):
        dpo_signals_from_config(config)


@pytest.fixture
def recorded(monkeypatch):
    """Every ``TokenDPOTrainer.signal_values`` call: the trainer, the batch and what it returned."""
    calls = []
    original = TokenDPOTrainer.signal_values

    def signal_values(self, inputs):
        values = original(self, inputs)
        calls.append(SimpleNamespace(trainer=self, batch=inputs, values=values))
        return values

    monkeypatch.setattr(TokenDPOTrainer, "signal_values", signal_values)
    return calls


def drawn_against_recorded(page: str, call, name: str) -> list[list[float]]:
    """Check the page's completions against the recorded call: blocks in the order pair 0 chosen, pair 0 rejected,
    ..., each cell's text the token's and its value the signal's at that token (entry t about token t + 1). Returns
    each block's values."""
    blocks = parse(page).blocks
    tokenizer = call.trainer.processing_class
    mask = call.batch["completion_mask"][:, 1:].bool()
    half = mask.size(0) // 2
    assert len(blocks) == 2 * half
    drawn = []
    for number, block in enumerate(blocks):
        row = (number % 2) * half + number // 2
        assert block["side"] == ("chosen", "rejected")[number % 2]
        expected = call.values[name][row][mask[row]].float().tolist()
        values = [value_of(span) for span in block["spans"]]
        assert values == pytest.approx(expected, rel=1e-3, abs=1e-8)
        ids = call.batch["input_ids"][row, 1:][mask[row]].tolist()
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        assert "".join(span["text"] for span in block["spans"]) == text
        drawn.append(values)
    return drawn


def test_the_command_draws_tgdpos_online_token_rewards(tmp_path, tiny_model_cache, one_torch_thread, recorded,
                                                      capsys):
    """End to end on the tiny models: TGDPO's rewards r̂_t = log π_RM − log π_ref from the second tiny model, drawn
    exactly as signal_values gives them at the completion tokens, red below 0 and blue above; nothing written."""
    config = write_config(tmp_path, "tgdpo_tiny", num_train_examples=4)
    page = tmp_path / "page.html"
    cli_main(["dpo-heatmap", "--config", config, "--rows", "2", "--output", str(page), "--terminal"])
    printed = capsys.readouterr().out
    assert printed.index("[dpo-heatmap] loading tiny-llama") < printed.index("[dpo-heatmap] computing the token "
                                                                              "signals of 2 pairs") < printed.index(
        "method: tgdpo")
    assert "tgdpo_alpha = 0.5" in printed and printed.count("\n--- pair ") == 4 and "== token_rewards: " in printed
    assert "wrote 4 completions' token values" in printed and not (tmp_path / "run").exists()
    (call,) = recorded
    assert set(call.values) == {"token_rewards"}
    html = page.read_text()
    drawn_against_recorded(html, call, "token_rewards")
    for span in parse(html).spans:
        assert (hsl(span)[0] == 0) == (value_of(span) < 0)  # the sign's colour
    bound = max(abs(value_of(span)) for span in parse(html).spans)
    assert f'<span class="max">{bound:.4g}</span>' in html


def test_the_command_draws_cdpo_weights(tmp_path, tiny_model_cache, one_torch_thread, recorded, scored_pairs):
    """cDPO on scored pairs: the weights drawn are signal_values', the chosen ones 1 (cdpo_weight_chosen off) and the
    rejected ones the prepared dataset's ``rejected_weights`` (1 − s_t)."""
    config = write_config(tmp_path, "cdpo_tiny", dataset_name=scored_pairs, num_train_examples=4)
    page = tmp_path / "page.html"
    cli_main(["dpo-heatmap", "--config", config, "--rows", "2", "--output", str(page)])
    (call,) = recorded
    assert set(call.values) == {"token_weights"}
    drawn = drawn_against_recorded(page.read_text(), call, "token_weights")
    dataset = call.trainer.train_dataset
    for pair in range(2):
        assert drawn[2 * pair] == [1.0] * len(dataset[pair]["chosen_ids"])
        assert drawn[2 * pair + 1] == pytest.approx(dataset[pair]["rejected_weights"], rel=1e-3)
    assert "A weighting: each completion token shaded by its weight" in page.read_text()
