"""The critical-token heatmap: HTML page and terminal view of per-token scores."""

import re
from html.parser import HTMLParser

import pytest
from datasets import Dataset

from tokenweave.cli import main as cli_main
from tokenweave.heatmap import render_html, render_terminal, score_lightness, terminal_color, trajectories_from_dataset

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
        if tag == "div" and attrs.get("class", "").split()[:1] == ["trajectory"]:
            self.blocks.append([])
            self.in_block = True
        elif tag == "span" and self.in_block:
            self.span = {"text": "", "title": attrs["title"], "style": attrs.get("style", ""), "class": attrs.get("class", "")}

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
        assert [float(re.match(r"s = ([\d.]+)", span["title"]).group(1)) for span in block] == pytest.approx(
            trajectory.scores
        )


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
    assert page.count("<span") == sum(len(t.tokens) for t in trajectories) + 3  # + the legend's three


def test_terminal_view_without_colours_marks_low_scores(trajectories):
    view = render_terminal(trajectories, color=False, threshold=0.5)
    assert "[ <|0.20]" in view and "[\"yes\"|0.01]" in view and "[ &|0.00]" in view
    assert "[The answer is |" not in view  # 0.5 is not below the threshold
    body = view.split("\n", 1)[1]  # after the legend line, which names the marker
    unmarked = re.sub(r"\[(.*?)\|\d\.\d\d\]", r"\1", body, flags=re.S)
    for trajectory in trajectories:
        assert "".join(trajectory.tokens) in unmarked


def test_terminal_views_say_what_they_show_and_honour_no_color(trajectories, monkeypatch):
    assert render_terminal(trajectories, color=False, threshold=0.3).splitlines()[0] == (
        "message tokens with a critical-token score s below 0.3 marked [token|s]; cDPO weights a rejected token by 1 - s")
    assert render_terminal(trajectories, color=True).startswith("background: critical-token score s, dark red")

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert terminal_color(Stream(True)) and not terminal_color(Stream(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not terminal_color(Stream(True))


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



# ---------------------------------------------------------------------------------------------------
# What the heatmap says it shows: pairs as the pipeline writes them

INSTRUCTION = "Solve it step by step.\n\n"
PIPELINE_ROWS = [
    {
        "prompt": [{"role": "user", "content": INSTRUCTION + "Ava has 23 apples and gets 45. How many?"}],
        "chosen": [{"role": "assistant", "content": "23 + 45 = 68"}],
        "rejected": [{"role": "assistant", "content": "23 + 45 = 67"}],
        "answer": "68",
        "solution": "23 + 45 = 68\nThe answer is 68.",
        "chosen_source": "reference",
        "chosen_tokens": ["23", " +", " 45", " =", " 68", "<|im_end|>", "\n"],
        "chosen_scores": [0.9, 0.8, 0.7, 0.9, 0.6, 0.01, 0.5],
        "rejected_tokens": ["23", " +", " 45", " =", " 6", "7", "<|im_end|>", "\n"],
        "rejected_scores": [0.9, 0.3, 0.8, 0.9, 0.7, 0.2, 0.001, 0.4],
    },
    {
        "prompt": [{"role": "user", "content": INSTRUCTION + "Ben has 5 pens and gives 2. How many?"}],
        "chosen": [{"role": "assistant", "content": "5 - 2 = 3"}],
        "rejected": [{"role": "assistant", "content": "5 + 2 = 7"}],
        "answer": "3",
        "solution": "5 - 2 = 3\nThe answer is 3.",
        "chosen_source": "sample",
        "chosen_tokens": ["5", " -", " 2", " =", " 3", "<|im_end|>"],
        "chosen_scores": [0.9, 0.5, 0.9, 0.9, 0.9, 0.2],
        "rejected_tokens": ["5", " +", " 2", " =", " 7", "<|im_end|>"],
        "rejected_scores": [0.9, 0.05, 0.9, 0.9, 0.3, 0.01],
    },
]


@pytest.fixture
def pipeline_trajectories():
    return trajectories_from_dataset(Dataset.from_list(PIPELINE_ROWS))


def test_eos_and_template_tokens_are_drawn_as_such_and_never_the_most_critical(pipeline_trajectories):
    rejected = pipeline_trajectories[1]
    assert rejected.message == (0, 6)  # "<|im_end|>" and "\n" are outside the message text
    spans = parse(render_html(pipeline_trajectories))[1]
    assert [span["class"] for span in spans[6:]] == ["template", "template"]
    assert "EOS: cDPO weight 1" in spans[6]["title"] and "EOS" not in spans[7]["title"]
    assert all("template" not in span["class"] for span in spans[:6])
    assert "most critical token '7' (s = 0.200)" in rejected.summary()  # not <|im_end|> at 0.001


def test_first_error_is_outlined_with_its_rank(pipeline_trajectories):
    first, second = pipeline_trajectories[1], pipeline_trajectories[3]
    assert first.tokens[first.first_error] == "7" and second.tokens[second.first_error] == " +"
    assert "first error '7': rank 1 of 6" in first.summary()  # 0.2 is the lowest message score
    assert "first error ' +': rank 1 of 5" in second.summary()
    spans = parse(render_html(pipeline_trajectories))[1]
    assert [i for i, span in enumerate(spans) if "first-error" in span["class"]] == [5]


def test_summary_lines_give_the_verdict_source_and_mean_weight(pipeline_trajectories):
    chosen, rejected = pipeline_trajectories[0], pipeline_trajectories[1]
    assert "correct: 68, the reference solution" in chosen.summary()
    assert "correct: 3, the model's own" in pipeline_trajectories[2].summary()
    assert "incorrect: 67, gold 68" in rejected.summary()
    assert f"mean weight {sum(1 - s for s in PIPELINE_ROWS[0]['rejected_scores'][:6]) / 6:.2f}" in rejected.summary()


def test_unused_chosen_scores_are_faded_and_labelled_unless_weight_chosen(pipeline_trajectories):
    page = render_html(pipeline_trajectories)
    assert page.count('class="trajectory unused"') == 2 and page.count('class="trajectory"') == 2
    assert "scores not used by the loss" in pipeline_trajectories[0].summary()
    used = trajectories_from_dataset(Dataset.from_list(PIPELINE_ROWS), weight_chosen=True)
    assert "unused" not in render_html(used) .split("</p>", 1)[1].replace("not used", "")
    assert used[0].weights == PIPELINE_ROWS[0]["chosen_scores"]


def test_the_shared_instruction_is_shown_once(pipeline_trajectories):
    page = render_html(pipeline_trajectories)
    assert page.count("Solve it step by step.") == 1
    assert "<h2>Ava has 23 apples and gets 45. How many?</h2>" in page
    view = render_terminal(pipeline_trajectories, color=False)
    assert view.count("Solve it step by step.") == 1 and "=== Ben has 5 pens" in view
