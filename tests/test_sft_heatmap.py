"""The SFT token-weight view (``tokenweave sft-heatmap``): the weights an SFT run's loss puts on each label token, as
an HTML page and in the terminal, planted noise outlined; the renderers on hand-made rows, then the command once on
the tiny model."""

import re
from html.parser import HTMLParser

import pytest
import yaml

from tokenweave.cli import main as cli_main
from tokenweave.config import RunArguments
from tokenweave.data.noisy_arithmetic import load_noisy_arithmetic
from tokenweave.heatmap import (
    LIGHTEST,
    WEIGHT_DARKEST,
    WeightedRow,
    is_selection,
    render_sft_html,
    render_sft_terminal,
    shared_prompt,
    weight_range,
)

PROMPT = ["<user>", "Add 2 and 2.\n", "<assistant>"]
# a selection (ProFit-like, kept weight 1/0.5 = 2): " 4" kept, "!!" planted and dropped, "." dropped
SELECTED = WeightedRow(tokens=[*PROMPT, "2 + 2 =", " 4", "!!", ".", "<end>"],
                       weights=[None, None, None, 2.0, 2.0, 0.0, 0.0, 2.0],
                       planted=[False, False, False, False, False, True, False, False], label="row 0, noise: junk")
# a weighting (DFT-like): weights well above 1, so that a scale clipped at 1 would show
WEIGHTED = WeightedRow(tokens=[*PROMPT, "2 + 2 =", " 5", "<end>"], weights=[None, None, None, 0.25, 3.5, 1.0],
                       planted=[False, False, False, False, True, False], label="row 1, noise: wrong_step")
OPTIONS = {"token_signals": ["profit"], "profit_threshold": 0.5}


class Spans(HTMLParser):
    """The titled ``<span>``s of a page: their attributes and text."""

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


def spans_of(page: str) -> list[dict]:
    parser = Spans()
    parser.feed(page)
    return parser.spans


def lightness(span: dict) -> float:
    return float(re.search(r"hsl\(\d+,\d+%,([\d.]+)%\)", span["style"]).group(1))


def test_a_selection_is_drawn_kept_and_dropped_with_the_planted_token_outlined():
    page = render_sft_html([SELECTED], method="sft+profit", options=OPTIONS)
    spans = {span["text"]: span for span in spans_of(page)}
    assert spans["<user>Add 2 and 2.\n<assistant>"]["title"].startswith("no label")  # the prompt: plain, one span
    assert "style" not in spans["<user>Add 2 and 2.\n<assistant>"]
    assert spans[" 4"]["class"] == "kept" and spans[" 4"]["title"] == "weight 2; kept; clean"
    assert spans["."]["class"] == "dropped" and spans["."]["title"] == "weight 0; dropped; clean"
    assert spans["!!"]["class"] == "dropped planted" and spans["!!"]["title"] == "weight 0; dropped; planted (noise)"
    assert spans["."]["style"].startswith("background:hsl(0,0%,88.0%)")  # grey
    assert re.search(r"\.planted \{ outline: 2px solid", page) and re.search(r"\.dropped \{[^}]*line-through", page)
    # the legend: the method, its options, what the colours, the outlines and the kept weight mean
    assert "Method: <b>sft+profit</b>; options: token_signals = [&#x27;profit&#x27;], profit_threshold = 0.5" in page
    assert "kept tokens weigh 2" in page and "(weight 0)" in page and "Outlined in red</span>: planted" in page
    # the summary line: kept share, mean weight on planted and on clean tokens
    assert SELECTED.summary() == ("row 0, noise: junk; kept 3 of 5 (60%) label tokens, mean weight 1.2; planted: "
                                  "mean weight 0, kept 0 of 1 (0%); clean: mean weight 1.5, kept 3 of 4 (75%)")
    assert SELECTED.summary() in page


def test_a_weightings_legend_runs_from_the_smallest_to_the_largest_weight():
    assert not is_selection([WEIGHTED]) and is_selection([SELECTED])
    assert weight_range([WEIGHTED]) == (0.25, 3.5) and weight_range([SELECTED, WEIGHTED]) == (0.0, 3.5)
    page = render_sft_html([WEIGHTED], method="sft+dft", options={"token_signals": ["dft"]})
    assert '<span class="min">0.25</span>' in page and '<span class="max">3.5</span>' in page
    spans = {span["text"]: span for span in spans_of(page)}
    assert lightness(spans["2 + 2 ="]) == LIGHTEST and lightness(spans[" 5"]) == WEIGHT_DARKEST  # not clipped at 1
    assert lightness(spans["<end>"]) == pytest.approx(LIGHTEST - (LIGHTEST - WEIGHT_DARKEST) * 0.75 / 3.25, abs=0.05)
    assert spans[" 5"]["class"] == "planted" and spans[" 5"]["title"] == "weight 3.5; planted (noise)"
    assert "color:#fff" in spans[" 5"]["style"]  # white text on the darkest background
    # a row without ground truth: no outline, no word of planted tokens
    plain = WeightedRow(WEIGHTED.tokens, WEIGHTED.weights)
    page = render_sft_html([plain], method="sft+dft", options={})
    assert 'class="planted"' not in page and "Outlined" not in page and "planted" not in plain.summary()


def test_the_terminal_view_marks_without_colour_and_colours_and_underlines_with_it():
    text = render_sft_terminal([SELECTED], method="sft+profit", options=OPTIONS, color=False)
    assert "\x1b" not in text
    assert "method: sft+profit; options: token_signals = ['profit'], profit_threshold = 0.5" in text
    assert "<user>Add 2 and 2.\n<assistant>2 + 2 = 4[{!!}]{.}<end>" in text  # kept plain, dropped {..}, planted [..]
    assert f"--- {SELECTED.summary()}" in text and "kept tokens weigh 2" in text and "marked [token]" in text
    weighted = render_sft_terminal([WEIGHTED], method="sft+dft", options={}, color=False)
    assert "{2 + 2 =|0.25}[{ 5|3.5}]{<end>|1}" in weighted and "weights from 0.25 to 3.5" in weighted

    coloured = render_sft_terminal([SELECTED, WEIGHTED], method="sft+dft", options={}, color=True)
    assert "\x1b[48;2;" in coloured and "{" not in coloured.split("\n--- ")[1]  # colours, no markers
    assert "\x1b[4m!!" in coloured and "\x1b[4m 5" in coloured  # planted: underlined
    assert "weight 0 " in coloured and " 3.5 (the smallest to the largest" in coloured  # the swatch's ends
    # the prompt text every row shares is printed once, then each row's own
    assert shared_prompt([SELECTED, WEIGHTED]) == "<user>Add 2 and 2.\n"
    assert coloured.count("Add 2 and 2.") == 1 and "Every row opens with:\n<user>Add 2 and 2." in coloured


def test_weights_and_tokens_must_match_in_number():
    with pytest.raises(ValueError, match="3 tokens, 2 weights"):
        WeightedRow(["a", "b", "c"], [None, 1.0])


def test_the_command_shows_a_profit_runs_weights_with_the_planted_tokens(tmp_path, tiny_model_cache, capsys):
    """End to end on the tiny model: the junk planted in half the rows is exactly what is outlined, each row's label
    tokens spell its completion, ProFit's weights are 0 or 1, and the run's output_dir is not created."""
    config = tmp_path / "profit.yaml"
    config.write_text(yaml.safe_dump({
        "method": "sft", "model_name_or_path": "tiny-llama", "dataset_name": "noisy_arithmetic",
        "num_train_examples": 4, "task_noise_share": 0.5, "task_noise_kinds": ["junk"],
        "token_signals": ["profit"], "profit_threshold": 0.01, "max_length": 1024, "output_dir": str(tmp_path / "run"),
        "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no", "seed": 0,
    }))
    page = tmp_path / "page.html"
    cli_main(["sft-heatmap", "--config", str(config), "--rows", "3", "--output", str(page), "--terminal"])
    printed = capsys.readouterr().out
    assert printed.index("[sft-heatmap] loading tiny-llama") < printed.index("method: sft+profit")
    assert "profit_threshold = 0.01" in printed and printed.count("\n--- row ") == 3
    assert "wrote 3 weighted rows" in printed and not (tmp_path / "run").exists()

    defaults = RunArguments()
    rows = load_noisy_arithmetic("train", 4, defaults.task_difficulty, defaults.task_seed, 0.5, ["junk"])
    html = page.read_text()
    blocks = html.split('<div class="trajectory">')[1:]
    assert len(blocks) == 3
    for row, block in zip(rows, blocks, strict=False):
        spans = spans_of(block.split("</div>")[0])
        labelled = [span for span in spans if span["title"].startswith("weight")]
        assert {span["title"].split(";")[0] for span in labelled} <= {"weight 0", "weight 1"}
        content = row["completion"][0]["content"]
        assert content in "".join(span["text"] for span in labelled)
        planted = "".join(span["text"] for span in labelled if "planted" in span.get("class", ""))
        assert planted == "".join(content[start:end] for start, end in row["planted_spans"])
        assert bool(planted) == (row["noise_kind"] == "junk")
    assert any(row["noise_kind"] == "junk" for row in rows.select(range(3)))
