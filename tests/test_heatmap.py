"""The critical-token heatmap: HTML page and terminal view of per-token scores."""

import re
from html.parser import HTMLParser

import pytest
from datasets import Dataset

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import render_html, render_terminal, score_lightness, trajectories_from_dataset

ROWS = [
    {
        "prompt": [{"role": "user", "content": "Is 3 < 5 & <script>?"}],
        "chosen_tokens": ["3", " <", " 5", "\n", "The answer is ", '"yes"', ".", "<|im_end|>"],
        "chosen_scores": [0.9, 0.2, 0.75, 1.0, 0.5, 0.01, 0.6, 1.0],
        "rejected_tokens": ["5", " &", " 3\n", "no"],
        "rejected_scores": [0.3, 0.0, 0.42, 0.99],
    },
    {
        "prompt": [{"role": "user", "content": "2 + 2?"}],
        "chosen_tokens": ["4"],
        "chosen_scores": [0.8],
        "rejected_tokens": ["5", "!"],
        "rejected_scores": [0.1, 0.7],
    },
]


class SpanCollector(HTMLParser):
    """The token spans of every trajectory block: (text, title, style) per span, one list per block."""

    def __init__(self):
        super().__init__()
        self.blocks, self.in_block, self.span = [], False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "trajectory":
            self.blocks.append([])
            self.in_block = True
        elif tag == "span" and self.in_block:
            self.span = {"text": "", "title": attrs["title"], "style": attrs["style"]}

    def handle_endtag(self, tag):
        if tag == "span" and self.span is not None:
            self.blocks[-1].append(self.span)
            self.span = None
        elif tag == "div":
            self.in_block = False

    def handle_data(self, data):
        if self.span is not None:
            self.span["text"] += data


@pytest.fixture
def trajectories():
    return trajectories_from_dataset(Dataset.from_list(ROWS))


def parse(page):
    collector = SpanCollector()
    collector.feed(page)
    return collector.blocks


def test_dataset_rows_become_one_trajectory_per_side(trajectories):
    assert [(t.question, t.side) for t in trajectories] == [
        ("Is 3 < 5 & <script>?", "chosen"),
        ("Is 3 < 5 & <script>?", "rejected"),
        ("2 + 2?", "chosen"),
        ("2 + 2?", "rejected"),
    ]
    assert len(trajectories_from_dataset(Dataset.from_list(ROWS), max_examples=1)) == 2


def test_html_has_one_span_per_token_with_its_text_and_score(trajectories):
    blocks = parse(render_html(trajectories))
    assert len(blocks) == len(trajectories)
    for block, trajectory in zip(blocks, trajectories, strict=True):
        assert [span["text"] for span in block] == trajectory.tokens  # escaped text round-trips, newlines kept
        assert [float(span["title"].removeprefix("s = ")) for span in block] == pytest.approx(trajectory.scores)


def test_html_shading_follows_the_scores(trajectories):
    spans = [span for block in parse(render_html(trajectories)) for span in block]
    scores = [score for trajectory in trajectories for score in trajectory.scores]
    lightness = [float(re.search(r"hsl\(0,100%,([\d.]+)%\)", span["style"]).group(1)) for span in spans]
    pairs = sorted(zip(scores, lightness))
    assert all(low[1] < high[1] for low, high in zip(pairs, pairs[1:]) if low[0] < high[0])
    assert min(lightness) == pytest.approx(score_lightness(0.0))  # score 0 is the darkest
    assert score_lightness(0.0) < 40 < 90 < score_lightness(1.0)  # dark red to nearly white


def test_html_escapes_text_and_preserves_newlines(trajectories):
    page = render_html(trajectories)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;|im_end|&gt;" in page and "&quot;yes&quot;" in page
    assert "white-space: pre-wrap" in page
    assert page.count("<span") == sum(len(t.tokens) for t in trajectories) + 1  # + the legend


def test_terminal_view_without_colours_marks_low_scores(trajectories):
    view = render_terminal(trajectories, color=False, threshold=0.5)
    assert "[ <|0.20]" in view and "[\"yes\"|0.01]" in view and "[ &|0.00]" in view
    assert "[The answer is |" not in view  # 0.5 is not below the threshold
    unmarked = re.sub(r"\[(.*?)\|\d\.\d\d\]", r"\1", view, flags=re.S)
    for trajectory in trajectories:
        assert "".join(trajectory.tokens) in unmarked


def test_terminal_view_with_colours_contains_every_token(trajectories):
    view = render_terminal(trajectories, color=True)
    assert "\x1b[48;2;" in view
    plain = re.sub(r"\x1b\[[\d;]*m", "", view)
    for trajectory in trajectories:
        assert "".join(trajectory.tokens) in plain


def test_cli_writes_the_page_and_prints_the_terminal_view(tmp_path, capsys):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "pairs"))
    page = tmp_path / "page.html"
    cli_main(["heatmap", "--scores", str(tmp_path / "pairs"), "--output", str(page), "--terminal"])
    assert len(parse(page.read_text())) == 4
    printed = capsys.readouterr().out
    assert "=== 2 + 2?" in printed and "[5|0.10]" in printed  # not a TTY: bracket markers


def test_a_dataset_without_token_columns_is_refused():
    with pytest.raises(ValueError, match="_tokens / <side>_scores"):
        trajectories_from_dataset(Dataset.from_list([{"chosen_scores": [0.5]}]))

