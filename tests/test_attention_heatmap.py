"""The attention-credit view (``tokenweave attention-heatmap``): sampled completions with γ, WAAD and FAI per token,
as an HTML page and in the terminal; the sampling glue hands the signal's computation the right completions."""

from html.parser import HTMLParser

import pytest
import torch

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import CreditTrajectory, render_credit_html, render_credit_terminal, sparkline
from tokenweave.inference import attention_credit as view

TRAJECTORY = CreditTrajectory(
    question="Add <3> & 4.", tokens=["3", " +", " 4", "\n", "=", " 7", "<|im_end|>"],
    gamma=[1.5, 1.0, 1.25, 1.75, 1.0, 1.5, 1.0], waad=[0.0, 1.0, 1.5, 4.0, 1.0, 2.0, 2.5],
    fai=[0.30, 0.10, 0.05, 0.20, 0.00, 0.00, 0.00], amplification=1.5, label="correct: 7",
)


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


def test_summary_names_the_credited_share_the_top_fai_tokens_and_the_largest_waad_jump():
    summary = TRAJECTORY.summary()
    assert summary.startswith("correct: 7; 4 of 7 tokens credited, mean γ 1.286")  # 9.0 / 7
    assert "top FAI '3' (0.300), '\\n' (0.200), ' +' (0.100)" in summary
    assert "largest WAAD jump after '\\n'" in summary  # |4.0 − 1.0| after token 3
    assert [TRAJECTORY.strength(i) for i in range(7)] == [1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0]  # capped at γ_amp


def test_sparkline_scales_from_minimum_to_maximum():
    assert sparkline([0.0, 1.0, 0.5, 2.0]) == "▁▅▃█"  # 7 · (v − 0) / 2 rounded: 0, 3.5 → 4, 1.75 → 2, 7
    assert sparkline([3.0, 3.0]) == "▁▁" and sparkline([]) == ""


def test_html_has_one_span_per_token_with_its_values_and_shading():
    page = render_credit_html([TRAJECTORY], rule="coupled")
    parser = Spans()
    parser.feed(page)
    spans = parser.spans
    assert [span["text"] for span in spans] == TRAJECTORY.tokens  # escaped text comes back as it was
    assert spans[0]["title"] == "γ = 1.500; WAAD = 0.000; FAI = 0.3000"
    assert "style" not in spans[1] and "style" not in spans[4]  # γ = 1: unshaded
    assert spans[2]["style"] == "background:hsl(140,70%,71.0%)" and spans[0]["style"].endswith("45.0%)")
    assert "&lt;3&gt; &amp; 4." in page and "<polyline" in page and "Rule: coupled" in page


def test_terminal_view_marks_credited_tokens_without_colours():
    text = render_credit_terminal([TRAJECTORY], color=False)
    assert "[3|1.50] +[ 4|1.25][\n|1.75]=[ 7|1.50]<|im_end|>" in text
    assert "WAAD ▁▃▄█▃▅▅" in text  # 7 · WAAD / 4 rounded and "=== Add <3> & 4." in text
    coloured = render_credit_terminal([TRAJECTORY], color=True)
    assert "\x1b[48;2;" in coloured and "[3|1.50]" not in coloured
    # the same colour as the page's (one renderer): hsl(140,70%,71%) of token 2 (strength 0.5) is rgb(129,233,164)
    # (HSL to RGB by hand: C = (1 − |2·0.71 − 1|)·0.7 = 0.406, m = 0.71 − C/2 = 0.507; hue 140° lies in 120°-180°:
    # (m, m + C, m + C/3) = (0.507, 0.913, 0.642), times 255)
    assert "\x1b[48;2;129;233;164m\x1b[30m 4" in coloured


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
    parser = Spans()
    parser.feed(page.read_text())
    assert len(parser.spans) >= 2
    assert "WAAD " in capsys.readouterr().out
