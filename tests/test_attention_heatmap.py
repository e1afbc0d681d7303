"""The attention-credit view (``tokenweave attention-heatmap``): sampled completions with γ, WAAD and FAI per token,
as an HTML page and in the terminal; the sampling glue hands the signal's computation the right completions."""

import re
from html.parser import HTMLParser

import pytest
import torch

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import (
    CreditTrajectory,
    credit_strength,
    largest_credit,
    render_credit_html,
    render_credit_terminal,
)
from tokenweave.inference import attention_credit as view
from tokenweave.inference.evaluate import NO_ANSWER, answer_verdict
from tokenweave.rewards.math import extract_answer
from tokenweave.trainers.attention import AttentionCreditConfig

TRAJECTORY = CreditTrajectory(
    question="Add <3> & 4.", tokens=["3", " +", " 4", "\n", "=", " 7", "<|im_end|>"],
    gamma=[1.5, 1.0, 1.25, 1.75, 1.0, 1.5, 1.0], waad=[0.0, 1.0, 1.5, 4.0, 1.0, 2.0, 2.5],
    fai=[0.30, 0.10, 0.05, 0.20, 0.00, 0.00, 0.00], label="correct: 7",
)
COUPLED = AttentionCreditConfig()  # the paper's defaults: coupled, γ_amp 1.5, α 0.5


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span" and "title" in dict(attrs):
            self._open = dict(attrs) | {"text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


class Chart(HTMLParser):
    """The chart's points (``circle``), shaded columns (``rect``) and texts (``text``, with their class and the text
    outside their ``title``)."""

    def __init__(self):
        super().__init__()
        self.circles, self.rects, self.texts, self._text, self._in_title = [], [], [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "circle":
            self.circles.append(attrs)
        elif tag == "rect":
            self.rects.append(attrs)
        elif tag == "text":
            self._text = attrs | {"text": ""}
        elif tag == "title":
            self._in_title = True

    def handle_data(self, data):
        if self._text is not None and not self._in_title:
            self._text["text"] += data

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "text" and self._text is not None:
            self.texts.append(self._text)
            self._text = None


def test_summary_names_the_credited_share_the_top_fai_tokens_and_the_largest_waad_jump():
    summary = TRAJECTORY.summary()
    assert summary.startswith("correct: 7; 4 of 7 tokens credited, mean γ 1.286")  # 9.0 / 7
    assert "top FAI '3' (0.300), '\\n' (0.200), ' +' (0.100)" in summary
    assert "largest WAAD jump after '\\n'" in summary  # |4.0 − 1.0| after token 3


def test_the_colour_scale_reaches_the_largest_gamma_of_the_configured_rule():
    # coupled (Eq. 19): an anchor credited in full that also introduces a dominated anchor gets 1 + 0.5·(1 + α)
    assert largest_credit(COUPLED) == 1.75
    assert largest_credit(AttentionCreditConfig(attention_credit_alpha=0.2)) == pytest.approx(1.6)
    assert largest_credit(AttentionCreditConfig(attention_credit_rule="global_anchor")) == 1.5
    assert largest_credit(AttentionCreditConfig(attention_credit_rule="local_chunk",
                                                attention_credit_amplification=2.0)) == 2.0
    assert [credit_strength(gamma, 1.75) for gamma in (1.0, 1.375, 1.75, 2.0)] == [0.0, 0.5, 1.0, 1.0]
    # on the page, γ = 1.75 is darker than γ = 1.5 (the old scale stopped at γ_amp: both drawn the darkest)
    spans = page_spans(render_credit_html([TRAJECTORY], options=COUPLED))
    assert spans[3]["style"] == "background:hsl(140,70%,45.0%)"  # γ 1.75: the darkest
    assert spans[0]["style"] == "background:hsl(140,70%,62.3%)"  # γ 1.5: 97 − 52·(0.5 / 0.75)
    assert spans[2]["style"] == "background:hsl(140,70%,79.7%)"  # γ 1.25: 97 − 52·(0.25 / 0.75)
    assert "&gamma; = 1.75, the largest &gamma; of the coupled rule" in render_credit_html([TRAJECTORY],
                                                                                            options=COUPLED)
    # with a rule whose largest γ is γ_amp, 1.5 is the darkest
    anchor = page_spans(render_credit_html([TRAJECTORY], options=AttentionCreditConfig(
        attention_credit_rule="global_anchor")))
    assert anchor[0]["style"] == anchor[3]["style"] == "background:hsl(140,70%,45.0%)"
    # the terminal's colours follow the same scale
    coloured = render_credit_terminal([TRAJECTORY], options=COUPLED, color=True)
    assert "\x1b[48;2;34;195;88m\x1b[30m↵" in coloured and "\x1b[48;2;34;195;88m\x1b[30m3" not in coloured


def page_spans(page: str) -> list[dict]:
    parser = Spans()
    parser.feed(page)
    return parser.spans


def test_html_has_one_span_per_token_with_its_values_and_shading():
    page = render_credit_html([TRAJECTORY], options=COUPLED)
    spans = page_spans(page)
    assert [span["text"] for span in spans] == TRAJECTORY.tokens  # escaped text comes back as it was
    assert spans[0]["title"] == "γ = 1.500; WAAD = 0.000; FAI = 0.3000"
    assert "style" not in spans[1] and "style" not in spans[4]  # γ = 1: unshaded
    assert "&lt;3&gt; &amp; 4." in page and "Rule: coupled" in page


def test_the_chart_has_axes_and_one_point_per_token_under_that_token():
    page = render_credit_html([TRAJECTORY], options=COUPLED)
    svg = re.search(r"<svg.*?</svg>", page, re.DOTALL).group(0)
    chart = Chart()
    chart.feed(svg)
    n = len(TRAJECTORY.tokens)
    token_labels = [text for text in chart.texts if text["class"] == "tick token"]
    assert [text["text"] for text in token_labels] == ["3", " +", " 4", "↵", "=", " 7", "<|im_en…"]
    label_x = [float(text["x"]) for text in token_labels]
    assert label_x == sorted(label_x) and len(set(label_x)) == n
    for curve, values in (("waad", TRAJECTORY.waad), ("fai", TRAJECTORY.fai)):
        points = [circle for circle in chart.circles if circle["class"] == curve]
        assert [float(point["cx"]) for point in points] == label_x  # one point per token, above its label
        heights = [float(point["cy"]) for point in points]  # SVG's y grows downwards: the largest value highest
        assert heights.index(min(heights)) == values.index(max(values))
        ticks = [text["text"] for text in chart.texts if text["class"] == f"tick {curve}"]
        assert ticks == ["0", f"{max(values) / 2:.4g}", f"{max(values):.4g}"]  # the completion's minimum (0) to maximum
    axis_labels = {text["text"] for text in chart.texts if text["class"].startswith("axis-label")}
    assert axis_labels == {"WAAD", "FAI", "token"}
    assert len(chart.rects) == 4  # the credited columns, shaded as their tokens are
    assert len(re.findall(r'<g class="axis"', svg)) == 1
    # an axis runs from the completion's minimum to its maximum: WAAD near its window W still shows its rhythm
    shifted = CreditTrajectory(question="q", tokens=["a", "b", "c"], gamma=[1.0] * 3, waad=[9.0, 9.5, 10.0],
                               fai=[0.0] * 3)
    chart = Chart()
    chart.feed(render_credit_html([shifted], options=COUPLED))
    assert [text["text"] for text in chart.texts if text["class"] == "tick waad"] == ["9", "9.5", "10"]
    assert [text["text"] for text in chart.texts if text["class"] == "tick fai"] == ["0", "0.5", "1"]  # flat: 0 to 1
    assert [float(circle["cy"]) for circle in chart.circles if circle["class"] == "waad"] == [102.0, 57.0, 12.0]


def test_terminal_view_aligns_the_curves_with_the_tokens():
    text = render_credit_terminal([TRAJECTORY], options=COUPLED, color=False)
    waad, fai, tokens = (line.split("│", 1)[1] for line in text.splitlines()
                         if line.startswith(("WAAD │", "FAI  │", "     │")))
    assert tokens == "[3|1.50] +[ 4|1.25][↵|1.75]=[ 7|1.50]<|im_end|>"
    assert len(waad) == len(fai) == len(tokens)
    # each token's level fills its width: 7 · WAAD / 4 rounded (0, 2, 3, 7, 2, 4, 4), over 8, 2, 9, 8, 1, 9, 10 columns
    assert waad == "▁" * 8 + "▃" * 2 + "▄" * 9 + "█" * 8 + "▃" + "▅" * 9 + "▅" * 10
    assert "WAAD ▁ 0 … █ 4; FAI ▁ 0 … █ 0.3" in text
    coloured = render_credit_terminal([TRAJECTORY], options=COUPLED, color=True)
    assert "\x1b[48;2;" in coloured and "[3|1.50]" not in coloured
    # the same colour as the page's (one renderer): γ 1.25 is hsl(140,70%,79.67%), rgb(167,239,191) (HSL to RGB by
    # hand: C = (1 − |2·0.7967 − 1|)·0.7 = 0.2847, m = 0.7967 − C/2 = 0.6543; hue 140° lies in 120°-180°:
    # (m, m + C, m + C/3) = (0.654, 0.939, 0.749), times 255)
    assert "\x1b[48;2;167;239;191m\x1b[30m 4" in coloured


def test_a_completion_without_the_answer_line_is_not_labelled_correct():
    gibberish = "qx 7 ## 7 zz 7"
    assert extract_answer(gibberish) == "7"  # the reward's fallback: the last number, which labelled this correct
    assert answer_verdict(gibberish, "7") == NO_ANSWER
    assert answer_verdict("The answer is 7. And then 7 7", "7") == NO_ANSWER  # not the task's final line
    assert answer_verdict("3 + 4 = 7\nThe answer is 7.", "7") == "correct: 7"
    assert answer_verdict("3 + 4 = 8\nThe answer is 8.\n", "7") == "incorrect: 8, gold 7"
    page = render_credit_html([TRAJECTORY], options=COUPLED)
    assert "ends with the task's answer line" in page and "no answer" in page


def test_an_unknown_attention_credit_option_in_the_config_is_refused():
    from tokenweave.trainers.attention import credit_options

    with pytest.raises(ValueError, match="run.yaml: unknown attention credit option.*attention_credit_windw"):
        credit_options({"method": "grpo", "learning_rate": 1e-5, "attention_credit_windw": 4}, source="run.yaml")
    with pytest.raises(ValueError, match="attention_credit_quantile must be in"):
        credit_options({"attention_credit_quantile": 2.0})
    assert credit_options({"method": "grpo", "attention_credit_window": 4}).attention_credit_window == 4


def test_completions_end_at_their_first_eos():
    ids = torch.tensor([[5, 9, 2, 7], [5, 6, 7, 8], [2, 3, 2, 2]])
    assert view._completion_mask(ids, eos_token_id=2).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_sampled_trajectories_carry_the_credit_of_their_own_tokens(tiny_model_cache, monkeypatch):
    # the view hands attention_credit the sampled completions (cut after the first EOS, the prompts of their
    # questions); each trajectory's tokens decode to its completion and its γ / WAAD / FAI are that row's
    calls = []
    credit = view.attention_credit

    def recording(model, prompt_ids, prompt_mask, completion_ids, completion_mask, options, layers, **kwargs):
        result = credit(model, prompt_ids, prompt_mask, completion_ids, completion_mask, options, layers, **kwargs)
        calls.append((prompt_ids, completion_ids, completion_mask, result, kwargs))
        return result

    monkeypatch.setattr(view, "attention_credit", recording)
    trajectories = view.sample_credit_trajectories("tiny-llama", num_examples=2, num_samples_per_prompt=2,
                                                   max_new_tokens=12, batch_size=2)
    (prompt_ids, completion_ids, completion_mask, result, kwargs), = calls
    assert len(trajectories) == 4 and prompt_ids.size(0) == 4 and torch.equal(prompt_ids[0], prompt_ids[1])
    assert kwargs == {"batch_size": 2}
    _, tokenizer = view.load_model_and_tokenizer("tiny-llama")
    for row, trajectory in enumerate(trajectories):
        length = int(completion_mask[row].sum())
        assert "".join(trajectory.tokens) == tokenizer.decode(completion_ids[row, :length])
        assert trajectory.gamma == result.gamma[row, :length].tolist() and len(trajectory.fai) == length
    assert any(gamma != 1.0 for trajectory in trajectories for gamma in trajectory.gamma)


def test_cli_needs_an_output_and_writes_the_page(tiny_model_cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["attention-heatmap", "--model", "tiny-llama"])
    page = tmp_path / "credit.html"
    cli_main(["attention-heatmap", "--model", "tiny-llama", "--num_examples", "1", "--max_new_tokens", "8",
              "--output", str(page), "--terminal"])
    assert len(page_spans(page.read_text())) >= 2
    assert "WAAD │" in capsys.readouterr().out
