"""Critical-token heatmaps: every completion token shaded by its score ``s_t`` (cDPO, arXiv 2411.19943).

``tokenweave heatmap --scores outputs/critical_tokens/pairs --output page.html [--terminal]`` reads a
scored dataset (the ``pairs/`` output of ``tokenweave critical``, or any dataset with ``{side}_tokens`` and
``{side}_scores`` columns, as :func:`tokenweave.inference.scoring.score_dataset` writes them) and renders:

* a self-contained HTML page (:func:`render_html`): one ``<span>`` per token, its background going from
  dark red (``s_t = 0``: critical) to white (``s_t = 1``), its score in the ``title`` tooltip, text
  HTML-escaped and newlines kept;
* a plain-terminal view (:func:`render_terminal`): ANSI 24-bit background colours of the same scale, or,
  without colours (output not a TTY, or ``NO_COLOR`` set), tokens scoring below a threshold marked as
  ``[token|0.12]``; a legend line says which.

Both views (and the attention-credit ones) draw the same cells (:class:`Cell`: text, HSL background, hover title,
marker) through one renderer per format. Both say what they show. A task instruction that opens every question is shown once. Each completion has a summary
line: its side and verdict (a chosen response that is the model's own or the reference solution), the most
critical message token, and the mean cDPO weight of its message tokens (rejected: ``1 − s_t``; chosen: ``s_t`` with
``weight_chosen``, else 1). Tokens outside the message text (EOS, which cDPO weights 1 whatever its score, and the
template tokens after it) are drawn grey and outlined as such. The chosen side's scores, unused by the loss
without ``weight_chosen`` (cDPO's default), are drawn faded and labelled so. Where the pairs carry the task's
reference ``solution``, the ground-truth first error of the rejected trajectory
(:func:`tokenweave.pipelines.localization.first_error_token`) is outlined, with its rank among the message tokens.

The attention-credit view (``tokenweave attention-heatmap``; :func:`render_credit_html`,
:func:`render_credit_terminal`: pure functions of :class:`CreditTrajectory` and the run's ``attention_credit_*``
options) shades each sampled token by its γ on a scale from 1 to the largest γ the configured rule can give
(:func:`largest_credit`: 1.75 for the coupled rule's defaults, not γ_amp), and draws WAAD and FAI with one point per
token aligned with it: on the page an SVG chart with a column per token (its label under it), axes, ticks and labels;
in the terminal rows of levels above the tokens. Completions are labelled by
:func:`tokenweave.inference.evaluate.answer_verdict` (correct only with the task's answer line, never from the
reward's fallback to the last number).

The SFT token-weight view (``tokenweave sft-heatmap --config run.yaml [--rows 8]``) draws the same cells for the
weights an SFT run's token signals put on its label tokens (:func:`sft_weights_from_config`: the trainer built as
``tokenweave train`` builds it, its first rows weighed by ``TokenSFTTrainer.signal_weights``; :func:`render_sft_html`,
:func:`render_sft_terminal`: pure functions of :class:`WeightedRow`): a selection's kept and dropped tokens, or a
weighting's scale from the smallest to the largest weight shown, prompt text plain, the planted noise of the
``noisy_arithmetic`` task outlined, and per row the kept share and the mean weight on planted and on clean tokens.

The DPO token-signal view (``tokenweave dpo-heatmap --config run.yaml [--rows 8]``) draws the same cells for the
per-token values a DPO run's token signals give its token-level loss, for each pair's chosen and rejected completion
(:func:`dpo_signals_from_config`: the trainer built as ``tokenweave train`` builds it, its first pairs collated and
read by ``TokenDPOTrainer.signal_values``, the random control applied; :func:`render_dpo_html`,
:func:`render_dpo_terminal`: pure functions of :class:`SignalRow`), one section per loss input
(:func:`signal_scale`): ``token_weights`` (cDPO's critical-token weights, ``weights``, ``weight_rules``) as the SFT
view draws weights; ``token_rewards`` (TGDPO, T-REG) and any input with a value below 0 on a diverging scale, red
below 0, blue above, white at 0, symmetric to the largest ``|value|`` shown; any other (AlignDistil's
``distillation_loss``, on the chosen completions only) on a sequential scale from the smallest to the largest value
shown. Each pair's prompt is plain and shown once; each completion has a summary line (its side, the mean, minimum and
maximum of its values) and each token its value on hover. A config whose loss is TRL's, or gets no per-token value,
is refused with a ``ValueError`` that says what to set.
"""

from __future__ import annotations

import colorsys
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datasets import Dataset

from .data.loading import last_user_message
from .inference.attention_credit import CreditTrajectory
from .pipelines.localization import first_error_token, message_tokens
from .rewards.math import extract_answer
from .trainers.attention import AttentionCreditConfig

# Lightness (HSL, per cent) of a token's red background at score 0 (critical) and at score 1.
DARKEST, LIGHTEST = 27.0, 97.0
_ANSI_RESET = "\x1b[0m"


@dataclass(frozen=True)
class ScoredTrajectory:
    """One scored completion: its tokens' texts and scores, the question it answers and its side.

    ``message`` is the token range ``[first, end)`` of its message text (None: every token); ``first_error`` the
    token of its ground-truth first error (None: unknown); ``label`` what it is (e.g. "incorrect: 67, gold 68");
    ``scores_used`` whether the loss weights its tokens by these scores; ``weights`` its cDPO weights.
    """

    question: str
    side: str
    tokens: list[str]
    scores: list[float]
    message: tuple[int, int] | None = None
    first_error: int | None = None
    label: str = ""
    scores_used: bool = True
    weights: list[float] | None = None

    def in_message(self, index: int) -> bool:
        return self.message is None or self.message[0] <= index < self.message[1]

    def message_indices(self) -> list[int]:
        return [index for index in range(len(self.tokens)) if self.in_message(index)]

    def summary(self) -> str:
        """One line: the label, the most critical message token, the mean weight, the first error's rank."""
        indices = self.message_indices()
        parts = [self.side + (f" ({self.label})" if self.label else "")]
        if indices:
            lowest = min(indices, key=self.scores.__getitem__)
            parts.append(f"most critical token {self.tokens[lowest]!r} (s = {self.scores[lowest]:.3f})")
            if self.weights is not None:
                mean = sum(self.weights[index] for index in indices) / len(indices)
                parts.append(f"mean weight {mean:.2f}")
        if not self.scores_used:
            parts.append("scores not used by the loss (weight 1 on every token)")
        if self.first_error is not None and self.in_message(self.first_error):
            score = self.scores[self.first_error]
            rank = 1 + sum(self.scores[index] < score for index in indices)
            parts.append(f"first error {self.tokens[self.first_error]!r}: rank {rank} of {len(indices)}")
        return "; ".join(parts)


def trajectories_from_dataset(
    dataset: Dataset, max_examples: int | None = None, weight_chosen: bool = False
) -> list[ScoredTrajectory]:
    """Every scored completion of the first ``max_examples`` rows (all by default), row by row.

    A side is every ``X`` with both ``X_tokens`` and ``X_scores`` columns (``chosen``, ``rejected``, or
    ``completion``). The question is the last user message of a conversational ``prompt``. With the message
    columns (``X`` itself), the message tokens are found; with ``answer`` and ``parsed``-able messages, the label
    says the verdict; with ``solution``, the rejected side's first error is located. ``weight_chosen`` is the cDPO
    run's ``cdpo_weight_chosen``: whether the chosen scores are used by the loss.
    """
    sides = [
        column[: -len("_tokens")]
        for column in dataset.column_names
        if column.endswith("_tokens") and column[: -len("_tokens")] + "_scores" in dataset.column_names
    ]
    if not sides:
        raise ValueError(
            f"The dataset has no pair of <side>_tokens / <side>_scores columns (it has {dataset.column_names}); "
            "score it with `tokenweave critical` or tokenweave.inference.scoring.score_dataset."
        )
    rows = dataset if max_examples is None else dataset.select(range(min(max_examples, len(dataset))))
    trajectories = []
    for row in rows:
        for side in sides:
            tokens, scores = row[f"{side}_tokens"], row[f"{side}_scores"]
            if len(tokens) != len(scores):
                raise ValueError(f"A row has {len(tokens)} {side} tokens but {len(scores)} scores.")
            has_message = isinstance(row.get(side), list) and bool(row[side])
            content = message_tokens(row, side) if has_message else None
            message = None if content is None else (content.first, content.end)
            first_error, label = None, ""
            if side == "rejected" and has_message and row.get("solution"):
                located = first_error_token(row)
                first_error = located[0] if isinstance(located, tuple) else None
            if has_message and row.get("answer") is not None:
                label = _verdict(side, extract_answer(row[side][-1]["content"]), row["answer"], row.get("chosen_source"))
            scores_used = side != "chosen" or weight_chosen
            if side == "rejected":
                weights = [1 - score for score in scores]
            else:
                weights = list(scores) if scores_used else [1.0] * len(scores)
            trajectories.append(
                ScoredTrajectory(
                    last_user_message(row.get("prompt")), side, tokens, scores, message, first_error, label, scores_used,
                    weights,
                )
            )
    return trajectories


def _verdict(side: str, parsed: str | None, gold: str, chosen_source: str | None) -> str:
    """What a completion is: correct or incorrect against ``gold``, and a chosen response's source."""
    verdict = f"correct: {parsed}" if parsed == gold else f"incorrect: {parsed}, gold {gold}"
    if side == "chosen" and chosen_source == "reference":
        return verdict + ", the reference solution"
    if side == "chosen" and chosen_source == "sample":
        return verdict + ", the model's own"
    return verdict


def shared_instruction(questions: Sequence[str]) -> str:
    """The text up to a blank line that opens every question (a task instruction), or ``""``."""
    if not questions:
        return ""
    head, separator, _ = questions[0].partition("\n\n")
    if not separator:
        return ""
    prefix = head + separator
    return prefix if all(question.startswith(prefix) for question in questions) else ""


def score_lightness(score: float) -> float:
    """HSL lightness (per cent) of a token's background: ``DARKEST`` at score 0, ``LIGHTEST`` at 1, linear."""
    return DARKEST + (LIGHTEST - DARKEST) * min(max(score, 0.0), 1.0)


@dataclass(frozen=True)
class Cell:
    """One token as both views draw it (one renderer: :func:`_html_cells`, :func:`_terminal_cells`): its text, its
    background as HSL (hue in degrees, saturation and lightness in per cent; None: none), the text colour on it
    (``"#fff"`` / ``"#000"``; None: the page's), the HTML hover ``title`` and CSS ``classes``, and the terminal's
    ``marker`` when colours are off (None: printed as it is), and its further terminal attributes in colour
    (``sgr``)."""

    text: str
    background: tuple[int, int, float] | None = None
    text_colour: str | None = None
    title: str = ""
    classes: tuple[str, ...] = ()
    marker: str | None = None
    sgr: tuple[str, ...] = ()
    """Further ANSI SGR attributes of the terminal view in colour (``"4"``: underlined)."""


def _html_cells(cells: Sequence[Cell]) -> str:
    """One ``<span>`` per cell."""
    spans = []
    for cell in cells:
        style = []
        if cell.background is not None:
            hue, saturation, lightness = cell.background
            style.append(f"background:hsl({hue},{saturation}%,{lightness:.1f}%)")
        if cell.text_colour is not None:
            style.append(f"color:{cell.text_colour}")
        attributes = f' class="{" ".join(cell.classes)}"' if cell.classes else ""
        attributes += f' style="{";".join(style)}"' if style else ""
        spans.append(f'<span{attributes} title="{html.escape(cell.title)}">{html.escape(cell.text)}</span>')
    return "".join(spans)


def _terminal_cells(cells: Sequence[Cell], color: bool) -> str:
    """The cells as text: on their background in 24-bit ANSI colour (``color``; the HSL converted by
    ``colorsys``, stopped at each line end, where a background running on would paint the rest of the line), or
    with their markers."""
    parts = []
    for cell in cells:
        if color and (cell.background is not None or cell.sgr):
            style = ""
            if cell.background is not None:
                hue, saturation, lightness = cell.background
                rgb = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
                red, green, blue = (round(255 * channel) for channel in rgb)
                style = f"\x1b[48;2;{red};{green};{blue}m\x1b[{'97' if cell.text_colour == '#fff' else '30'}m"
            style += f"\x1b[{';'.join(cell.sgr)}m" if cell.sgr else ""
            parts.append(style + cell.text.replace("\n", _ANSI_RESET + "\n" + style) + _ANSI_RESET)
        elif not color and cell.marker is not None:
            parts.append(cell.marker)
        else:
            parts.append(cell.text)
    return "".join(parts)


def _critical_cells(trajectory: ScoredTrajectory, threshold: float = 0.5) -> list[Cell]:
    """Each token shaded by its score (:func:`score_lightness`), marked below ``threshold``; grey and outlined
    outside the message text; outlined at the first error; its score (and weight) on hover."""
    cells = []
    for index, (token, score) in enumerate(zip(trajectory.tokens, trajectory.scores)):
        title = f"s = {score:.4f}"
        classes = []
        if not trajectory.in_message(index):
            classes.append("template")
            title += "; outside the message text" + (
                " (EOS: cDPO weight 1)" if trajectory.message is not None and index == trajectory.message[1] else ""
            )
            background = text_colour = marker = None
        else:
            lightness = score_lightness(score)
            background, text_colour = (0, 100, lightness), "#fff" if lightness < 55 else "#000"
            marker = f"[{token}|{score:.2f}]" if score < threshold else None
        if index == trajectory.first_error:
            classes.append("first-error")
            title += "; the first error (ground truth)"
        if trajectory.weights is not None and trajectory.in_message(index):
            title += f"; weight {trajectory.weights[index]:.3f}"
        cells.append(Cell(token, background, text_colour, title, tuple(classes), marker))
    return cells


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.trajectory {{ font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc; padding: 0.5em; }}
.legend {{ display: inline-block; width: 12em; height: 1em; vertical-align: middle; background: {legend}; }}
.summary {{ font-size: 0.9em; color: #333; margin: 0.2em 0; }}
.instruction {{ white-space: pre-wrap; background: #f6f6f6; padding: 0.5em; }}
h3 {{ margin-bottom: 0.2em; }}
{style}
</style>
</head>
<body>
<h1>{title}</h1>
{intro}
{body}
</body>
</html>
"""


def _page(title: str, legend: str, style: str, intro: str, blocks: Sequence[str]) -> str:
    """A self-contained HTML page: the shared layout, a view's own ``style`` rules, its ``intro`` (which may use a
    ``legend`` span, drawn with the CSS background ``legend``) and its ``blocks``."""
    return _PAGE.format(title=html.escape(title), legend=legend, style=style, intro=intro, body="\n".join(blocks))


def _by_question(trajectories, instruction_block, question_block, trajectory_block) -> list[str]:
    """The blocks of a view: the task instruction shared by every question once (``instruction_block``), then each
    question once (``question_block``, without the instruction) followed by its trajectories (``trajectory_block``)."""
    instruction = shared_instruction([trajectory.question for trajectory in trajectories])
    blocks, previous_question = ([instruction_block(instruction)] if instruction else []), None
    for trajectory in trajectories:
        if trajectory.question != previous_question:
            blocks.append(question_block(trajectory.question.removeprefix(instruction)))
            previous_question = trajectory.question
        blocks.append(trajectory_block(trajectory))
    return blocks


def _html_instruction(instruction: str) -> str:
    return f'<p>Every prompt opens with:</p>\n<div class="instruction">{html.escape(instruction)}</div>'


def _html_question(question: str) -> str:
    return f"<h2>{html.escape(question)}</h2>"


def _terminal_instruction(instruction: str) -> str:
    return f"Every prompt opens with:\n{instruction.rstrip()}"


def _terminal_question(question: str) -> str:
    return f"=== {question}"


_CRITICAL_STYLE = """.trajectory.unused { opacity: 0.45; }
.template { background: #e4e4e4; color: #666; outline: 1px dashed #888; }
.first-error { outline: 3px solid #1565c0; outline-offset: 1px; }"""
_CRITICAL_INTRO = """<p>Each completion token is shaded by its critical-token score
s<sub>t</sub> = softmax((1+b)&middot;z<sub>pos</sub> &minus; b&middot;z<sub>neg</sub>)[y<sub>t</sub>]
(cDPO, arXiv 2411.19943): s = 0 <span class="legend"></span> s = 1. Dark red tokens are likely critical;
cDPO weights a rejected token by 1 &minus; s<sub>t</sub>. Hover over a token for its score and weight.
<span class="template">Grey, dashed</span>: outside the message text (EOS, weighted 1 by cDPO whatever its score,
and the chat template after it). <span class="first-error">Outlined in blue</span>: the ground-truth first error
of a rejected trajectory. Faded: scores the loss does not use (the chosen side, without
<code>cdpo_weight_chosen</code>).</p>"""


def render_html(trajectories: Sequence[ScoredTrajectory], title: str = "Critical tokens") -> str:
    """A self-contained HTML page: each trajectory a block with one ``<span>`` per token (module docstring)."""

    def block(trajectory: ScoredTrajectory) -> str:
        spans = _html_cells(_critical_cells(trajectory))
        unused = "" if trajectory.scores_used else " unused"
        return (f"<h3>{html.escape(trajectory.side)}</h3>\n<p class=\"summary\">{html.escape(trajectory.summary())}"
                f'</p>\n<div class="trajectory{unused}">{spans}</div>')

    legend = f"linear-gradient(to right, hsl(0,100%,{DARKEST}%), hsl(0,100%,{LIGHTEST}%))"
    blocks = _by_question(trajectories, _html_instruction, _html_question, block)
    return _page(title, legend, _CRITICAL_STYLE, _CRITICAL_INTRO, blocks)


def render_terminal(trajectories: Sequence[ScoredTrajectory], *, color: bool, threshold: float = 0.5) -> str:
    """A plain-text view: ANSI background colours (``color``), or else ``[token|score]`` markers on the message
    tokens scoring below ``threshold``; every other token is printed as it is. Each completion starts with its
    summary line; the task instruction shared by every question is printed once."""

    def block(trajectory: ScoredTrajectory) -> str:
        return f"--- {trajectory.summary()}\n" + _terminal_cells(_critical_cells(trajectory, threshold), color)

    legend = ("background: critical-token score s, dark red (s = 0, likely critical) to light (s = 1)" if color else
              f"message tokens with a critical-token score s below {threshold} marked [token|s]")
    legend += "; cDPO weights a rejected token by 1 - s"
    blocks = _by_question(trajectories, _terminal_instruction, _terminal_question, block)
    return "\n".join([legend, *blocks]) + "\n"


def terminal_color(stream) -> bool:
    """Whether a terminal view on ``stream`` is in colour: a TTY, and no ``NO_COLOR`` set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


# ---------------------------------------------------------------------------------------------------------------
# Attention credit (arXiv 2510.13554): γ, WAAD and FAI of sampled completions (tokenweave attention-heatmap).
# ---------------------------------------------------------------------------------------------------------------
CREDIT_HUE = 140  # green: a credited token's background, darker as γ goes from 1 to the rule's largest γ
CREDIT_DARKEST = 45.0  # the lightness of the largest γ
WAAD_COLOUR, FAI_COLOUR = "#1565c0", "#e65100"
_SPARKS = "▁▂▃▄▅▆▇█"
# The chart above each completion (px): one column per token, the axes' labels left and right, the tokens below.
_COLUMN, _MARGIN, _TOP, _PLOT_HEIGHT, _LABELS_HEIGHT = 16, 64, 12, 90, 64
_LABEL_CHARS = 8  # a token's label on the chart's x axis is cut to this many characters
TERMINAL_WIDTH = 100  # the columns of the terminal view's aligned rows (label included)


def largest_credit(options: AttentionCreditConfig) -> float:
    """The largest γ the configured rule can give a token, the dark end of the colour scale (with γ_amp < 1: the γ
    furthest below 1). ``local_chunk`` and ``global_anchor`` give γ_amp; ``coupled`` (Eq. 19,
    :mod:`tokenweave.tokens.attention`) gives up to 1 + (γ_amp − 1)·(1 + α), to an anchor credited in full that is
    also the introduction of a dominated anchor. A scale that stopped at γ_amp would draw those tokens as γ_amp."""
    share = 1.0 + options.attention_credit_alpha if options.attention_credit_rule == "coupled" else 1.0
    return 1.0 + (options.attention_credit_amplification - 1.0) * share


def credit_strength(gamma: float, largest: float) -> float:
    """Where γ lies on the colour scale from 1 (0) to ``largest`` (1), clipped to [0, 1]."""
    if largest == 1.0:
        return 0.0
    return min(max((gamma - 1.0) / (largest - 1.0), 0.0), 1.0)


def _credit_background(gamma: float, largest: float) -> tuple[int, int, float] | None:
    """A token's green background: none at γ = 1, darker up to ``largest``."""
    strength = credit_strength(gamma, largest)
    return (CREDIT_HUE, 70, LIGHTEST - (LIGHTEST - CREDIT_DARKEST) * strength) if strength > 0 else None


def _hex_colour(background: tuple[int, int, float]) -> str:
    """An HSL background as ``#rrggbb`` (SVG renderers other than browsers may not read ``hsl()``)."""
    hue, saturation, lightness = background
    rgb = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
    return "#" + "".join(f"{round(255 * channel):02x}" for channel in rgb)


def _axis_range(values: Sequence[float]) -> tuple[float, float]:
    """A curve's axis: from its smallest to its largest value in the completion (a flat curve: to its value + 1), so
    that the rhythm shows where the values are close (WAAD near its window W on every token)."""
    low, high = min(values), max(values)
    return low, high if high > low else low + 1.0


def _shown(token: str) -> str:
    """A token on one line: a newline as ↵, a tab as ⇥ (where tokens stand in columns)."""
    return token.replace("\n", "↵").replace("\t", "⇥")


def _credit_svg(trajectory: CreditTrajectory, largest: float) -> str:
    """A chart of WAAD (left axis) and FAI (right axis) over the completion: one column per token, shaded by its γ,
    with one point of each curve at the column's centre and the token as the x-axis label below it; each axis from
    the curve's minimum to its maximum in the completion (:func:`_axis_range`), ticks at both ends and half-way."""
    n = len(trajectory.tokens)
    if n == 0:
        return ""
    left, right, bottom = _MARGIN, _MARGIN + n * _COLUMN, _TOP + _PLOT_HEIGHT
    width, height = right + _MARGIN, bottom + _LABELS_HEIGHT
    parts = []
    for index, gamma in enumerate(trajectory.gamma):
        background = _credit_background(gamma, largest)
        if background is not None:
            parts.append(f'<rect class="gamma" x="{left + index * _COLUMN}" y="{_TOP}" width="{_COLUMN}" '
                         f'height="{_PLOT_HEIGHT}" fill="{_hex_colour(background)}"/>')
    parts.append(f'<g class="axis" stroke="#555"><line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>'
                 f'<line x1="{left}" y1="{_TOP}" x2="{left}" y2="{bottom}"/>'
                 f'<line x1="{right}" y1="{_TOP}" x2="{right}" y2="{bottom}"/></g>')
    for name, values, colour, axis_x, side in (("waad", trajectory.waad, WAAD_COLOUR, left, -1),
                                               ("fai", trajectory.fai, FAI_COLOUR, right, 1)):
        low, high = _axis_range(values)
        anchor = "end" if side < 0 else "start"
        for fraction in (0.0, 0.5, 1.0):
            y = bottom - _PLOT_HEIGHT * fraction
            parts.append(f'<line class="tick" x1="{axis_x}" y1="{y:.1f}" x2="{axis_x + 4 * side}" y2="{y:.1f}" '
                         f'stroke="{colour}"/><text class="tick {name}" x="{axis_x + 6 * side}" y="{y:.1f}" '
                         f'text-anchor="{anchor}" dominant-baseline="middle" fill="{colour}">'
                         f'{_number(low + (high - low) * fraction)}</text>')
        title_x, middle = axis_x + (_MARGIN - 10) * side, _TOP + _PLOT_HEIGHT / 2
        parts.append(f'<text class="axis-label {name}" transform="rotate(-90 {title_x} {middle})" x="{title_x}" '
                     f'y="{middle}" text-anchor="middle" dominant-baseline="middle" fill="{colour}">'
                     f'{name.upper()}</text>')
        points = [(left + _COLUMN * (index + 0.5), bottom - _PLOT_HEIGHT * (value - low) / (high - low))
                  for index, value in enumerate(values)]
        parts.append(f'<polyline class="{name}" fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>')
        parts.extend(f'<circle class="{name}" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"><title>'
                     f'{html.escape(f"{name.upper()} of token {index} {trajectory.tokens[index]!r}: {value:.4f}")}'
                     f'</title></circle>' for index, ((x, y), value) in enumerate(zip(points, values, strict=True)))
    for index, token in enumerate(trajectory.tokens):
        x = left + _COLUMN * (index + 0.5)
        shown = _shown(token)
        label = shown if len(shown) <= _LABEL_CHARS else shown[: _LABEL_CHARS - 1] + "…"
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 3}" stroke="#555"/>'
                     f'<text class="tick token" transform="rotate(90 {x:.1f} {bottom + 5})" x="{x:.1f}" '
                     f'y="{bottom + 5}" dominant-baseline="middle" font-family="monospace" xml:space="preserve">'
                     f'<title>{html.escape(f"token {index}: {token!r}")}</title>{html.escape(label)}</text>')
    parts.append(f'<text class="axis-label token" x="{left - 6}" y="{bottom + 22}" text-anchor="end">token</text>')
    return (f'<div class="chart"><svg class="curves" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="sans-serif" font-size="10" role="img" aria-label="WAAD and FAI per token">'
            f'{"".join(parts)}</svg></div>')


def _credit_cells(trajectory: CreditTrajectory, largest: float, shown=lambda token: token) -> list[Cell]:
    """Each token (as ``shown``) on green, darker as its γ goes from 1 to ``largest`` (none at γ = 1), marked where
    γ ≠ 1; γ, WAAD and FAI on hover."""
    cells = []
    for index, token in enumerate(trajectory.tokens):
        gamma = trajectory.gamma[index]
        title = f"γ = {gamma:.3f}; WAAD = {trajectory.waad[index]:.3f}; FAI = {trajectory.fai[index]:.4f}"
        text = shown(token)
        cells.append(Cell(text, _credit_background(gamma, largest), title=title,
                          marker=None if gamma == 1.0 else f"[{text}|{gamma:.2f}]"))
    return cells


def _aligned_rows(trajectory: CreditTrajectory, largest: float, color: bool, width: int = TERMINAL_WIDTH) -> str:
    """The terminal's chart: rows of WAAD and FAI levels (▁ … █: the completion's minimum … maximum, :func:`_axis_range`)
    over the tokens they belong to, each level repeated across its token's width, the tokens on one line (↵ for a newline), cut into
    lines of ``width`` columns."""
    cells = _credit_cells(trajectory, largest, shown=_shown)
    ranges = _axis_range(trajectory.waad), _axis_range(trajectory.fai)
    labels = ("WAAD │", "FAI  │", "     │")
    lines, waad_row, fai_row, token_row, used = [], "", "", [], 0

    def flush():
        if token_row:
            lines.extend([labels[0] + waad_row, labels[1] + fai_row, labels[2] + _terminal_cells(token_row, color)])

    for index, cell in enumerate(cells):
        cell_width = len(cell.marker) if not color and cell.marker is not None else len(cell.text)
        if token_row and used + cell_width > width - len(labels[0]):
            flush()
            waad_row, fai_row, token_row, used = "", "", [], 0
        levels = [_SPARKS[round((len(_SPARKS) - 1) * (values[index] - low) / (high - low))]
                  for values, (low, high) in zip((trajectory.waad, trajectory.fai), ranges, strict=True)]
        waad_row += levels[0] * cell_width
        fai_row += levels[1] * cell_width
        token_row.append(cell)
        used += cell_width
    flush()
    axes = "; ".join(f"{name} {_SPARKS[0]} {_number(low)} … {_SPARKS[-1]} {_number(high)}"
                     for name, (low, high) in zip(("WAAD", "FAI"), ranges, strict=True)) + "; each level above its token"
    return "\n".join([axes, *lines])


_CREDIT_STYLE = """.chart { overflow-x: auto; margin: 0.3em 0; }
.curves { display: block; background: #fafafa; }
.waad { color: #1565c0; font-weight: bold; } .fai { color: #e65100; font-weight: bold; }"""
_CREDIT_INTRO = """<p>Attention-derived credit (the preplan-and-anchor rhythm, arXiv 2510.13554) of sampled completions: the
advantage of each token is multiplied by &gamma;. Background: &gamma; = 1 <span class="legend"></span>
&gamma; = {largest}, {scale}. Above each completion, a chart with one column per token (its label under it, shaded as
the token is): <span class="waad">WAAD</span> (left axis; the windowed average attention distance of the local heads:
how far back the token's state looks) and <span class="fai">FAI</span> (right axis; future attention influence: how
much the global heads of later tokens attend to it), one point per token, each axis from the completion's minimum
to its maximum. Hover over a token or a point for its values. Rule: {rule}. A completion is labelled correct or incorrect
only when it ends with the task's answer line "The answer is N."; any other is labelled "no answer" (the rewards and
the accuracy of <code>tokenweave eval</code> fall back to the last number of the text; this label does not).</p>"""


def _scale_text(options: AttentionCreditConfig) -> str:
    """What the top of the colour scale is, for the page's intro."""
    amplification = options.attention_credit_amplification
    if options.attention_credit_rule == "coupled":
        return (f"the largest &gamma; of the coupled rule, 1 + (&gamma;<sub>amp</sub> &minus; 1)(1 + &alpha;) with "
                f"&gamma;<sub>amp</sub> = {amplification}, &alpha; = {options.attention_credit_alpha} (an anchor "
                "credited in full that also introduces a dominated anchor)")
    return f"&gamma;<sub>amp</sub>, the one &gamma; the {html.escape(options.attention_credit_rule)} rule gives"


def render_credit_html(trajectories: Sequence[CreditTrajectory], *, options: AttentionCreditConfig,
                       title: str = "Attention credit") -> str:
    """A self-contained HTML page: per completion its summary, the WAAD / FAI chart aligned with its tokens and the
    tokens shaded by γ on a scale up to the largest γ of ``options``' rule (:func:`largest_credit`)."""
    largest = largest_credit(options)

    def block(trajectory: CreditTrajectory) -> str:
        spans = _html_cells(_credit_cells(trajectory, largest))
        return (f'<p class="summary">{html.escape(trajectory.summary())}</p>\n{_credit_svg(trajectory, largest)}\n'
                f'<div class="trajectory">{spans}</div>')

    legend = (f"linear-gradient(to right, hsl({CREDIT_HUE},70%,{LIGHTEST}%), "
              f"hsl({CREDIT_HUE},70%,{CREDIT_DARKEST}%))")
    intro = _CREDIT_INTRO.format(largest=_number(largest), scale=_scale_text(options),
                                 rule=html.escape(options.attention_credit_rule))
    blocks = _by_question(trajectories, _html_instruction, _html_question, block)
    return _page(title, legend, _CREDIT_STYLE, intro, blocks)


def render_credit_terminal(trajectories: Sequence[CreditTrajectory], *, options: AttentionCreditConfig,
                           color: bool) -> str:
    """A plain-text view: per completion its summary, then rows of WAAD and FAI levels over the tokens they belong to,
    credited tokens on green (``color``, up to the largest γ of ``options``' rule) or marked ``[token|γ]``."""
    largest = largest_credit(options)

    def block(trajectory: CreditTrajectory) -> str:
        return f"--- {trajectory.summary()}\n" + _aligned_rows(trajectory, largest, color)

    shading = (f"credited tokens (γ ≠ 1) on green, darker as γ goes to {_number(largest)}" if color else
               "credited tokens marked [token|γ]")
    legend = (f"{shading}; a completion is correct or incorrect only when it ends with \"The answer is N.\", else "
              "\"no answer\"")
    blocks = _by_question(trajectories, _terminal_instruction, _terminal_question, block)
    return "\n".join([legend, *blocks]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# SFT token weights (tokenweave sft-heatmap): the weights TokenSFTTrainer's loss puts on each label token.
# ---------------------------------------------------------------------------------------------------------------
WEIGHT_HUE = 215  # blue: a label token's background, darker as its weight grows (a weighting) or kept (a selection)
WEIGHT_DARKEST = 35.0  # the lightness of the largest weight of a weighting
KEPT_LIGHTNESS = 68.0  # the lightness of a kept token of a selection
DROPPED_BACKGROUND = (0, 0, 88.0)  # a dropped token of a selection: grey
PLANTED_COLOUR = "#c62828"
_SPREAD = 1e-6  # relative: nonzero weights closer than this are one value (a selection's constant)


@dataclass(frozen=True)
class WeightedRow:
    """One row of an SFT run's prepared train dataset as :func:`render_sft_html` / :func:`render_sft_terminal` draw
    it: the text of each of its tokens (prompt and completion), the weight the loss puts on each (None where the token
    has no label: the prompt, the template), and per token whether it is planted noise (ground truth; None: unknown).
    ``label`` says what the row is (e.g. "row 2, noise: junk"); ``note`` why its planted tokens are unknown."""

    tokens: list[str]
    weights: list[float | None]
    planted: list[bool] | None = None
    label: str = ""
    note: str = ""

    def __post_init__(self):
        if len(self.weights) != len(self.tokens) or (self.planted is not None and len(self.planted) != len(self.tokens)):
            raise ValueError(f"A weighted row has {len(self.tokens)} tokens, {len(self.weights)} weights and "
                             f"{'no' if self.planted is None else len(self.planted)} planted flags: one each.")

    def labelled(self) -> list[int]:
        """The tokens with a label (a weight), in order."""
        return [index for index, weight in enumerate(self.weights) if weight is not None]

    def summary(self) -> str:
        """One line: the label, the kept share (weight > 0) and mean weight of the label tokens, and the mean weight
        (and kept share) on the planted and on the clean ones."""
        labelled = self.labelled()
        parts = [self.label] if self.label else []
        if not labelled:
            return "; ".join([*parts, "no label tokens"])
        parts.append(f"kept {_kept_share(self, labelled)} label tokens, mean weight {_mean(self, labelled)}")
        if self.planted is None:
            parts += [self.note] if self.note else []
        else:
            planted = [index for index in labelled if self.planted[index]]
            clean = [index for index in labelled if not self.planted[index]]
            parts.append(f"planted: mean weight {_mean(self, planted)}, kept {_kept_share(self, planted)}"
                         if planted else "no planted tokens")
            parts.append(f"clean: mean weight {_mean(self, clean)}, kept {_kept_share(self, clean)}")
        return "; ".join(parts)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _mean(row: WeightedRow, indices: Sequence[int]) -> str:
    return _number(sum(row.weights[index] for index in indices) / len(indices)) if indices else "-"


def _kept_share(row: WeightedRow, indices: Sequence[int]) -> str:
    kept = sum(row.weights[index] > 0 for index in indices)
    return f"{kept} of {len(indices)} ({kept / len(indices):.0%})" if indices else "0 of 0"


def weight_range(rows: Sequence[WeightedRow]) -> tuple[float, float]:
    """The smallest and the largest weight of every label token of ``rows`` ((0, 0) without one): the colour scale
    of a weighting."""
    weights = [weight for row in rows for weight in row.weights if weight is not None]
    return (min(weights), max(weights)) if weights else (0.0, 0.0)


def kept_weights(rows: Sequence[WeightedRow]) -> list[float]:
    """The distinct weights > 0 of the label tokens of ``rows``, ascending (those closer than a relative 1e-6 as
    one)."""
    values = sorted({weight for row in rows for weight in row.weights if weight is not None and weight > 0})
    distinct: list[float] = []
    for value in values:
        if not distinct or value - distinct[-1] > _SPREAD * max(abs(value), 1.0):
            distinct.append(value)
    return distinct


def is_selection(rows: Sequence[WeightedRow]) -> bool:
    """Whether ``rows``' weights are a selection's: 0 or one constant (the kept tokens' 1/k)."""
    return len(kept_weights(rows)) <= 1


def _weight_strength(weight: float, low: float, high: float) -> float:
    """Where ``weight`` lies in ``[low, high]``, from 0 to 1 (1 when the range is one value)."""
    return (weight - low) / (high - low) if high > low else 1.0


def _sft_runs(row: WeightedRow, merge: bool) -> list[tuple[str, float | None, bool]]:
    """``(text, weight, planted)`` of each token of a row, or with ``merge`` of each run of tokens with the same
    weight and ground truth; runs of tokens without a label are merged either way."""
    runs: list[tuple[str, float | None, bool]] = []
    for index, (token, weight) in enumerate(zip(row.tokens, row.weights, strict=True)):
        planted = row.planted is not None and weight is not None and row.planted[index]
        if runs and runs[-1][1:] == (weight, planted) and (merge or weight is None):
            runs[-1] = (runs[-1][0] + token, weight, planted)
        else:
            runs.append((token, weight, planted))
    return runs


def _sft_cells(row: WeightedRow, *, selection: bool, low: float, high: float, prefix: str = "",
               merge: bool = False) -> list[Cell]:
    """The cells of a row: each run of tokens without a label one plain cell (``prefix``, the text shared by every
    row and shown once, left out of the first); each label token (``merge``: each run of label tokens with the same
    weight and ground truth) coloured by its weight (a selection: kept blue, dropped grey; a weighting: light to dark
    blue from ``low`` to ``high``), marked when colours are off (``{token}`` dropped, ``{token|w}`` weighted),
    outlined (HTML) / underlined (colour) / bracketed (no colour) where planted; its weight and ground truth on
    hover."""
    cells: list[Cell] = []
    for token, weight, planted in _sft_runs(row, merge):
        if weight is None:
            cells.append(Cell(token, title="no label (prompt or template): no loss"))
            continue
        title = f"weight {_number(weight)}"
        if selection:
            kept = weight > 0
            title += "; kept" if kept else "; dropped"
            background = (WEIGHT_HUE, 70, KEPT_LIGHTNESS) if kept else DROPPED_BACKGROUND
            classes, marker = ("kept",) if kept else ("dropped",), None if kept else "{" + token + "}"
            text_colour = "#000" if kept else None  # dropped: the page's grey (CSS)
        else:
            lightness = LIGHTEST - (LIGHTEST - WEIGHT_DARKEST) * _weight_strength(weight, low, high)
            background, classes = (WEIGHT_HUE, 70, lightness), ()
            marker = "{" + token + "|" + f"{weight:.2g}" + "}"
            text_colour = "#fff" if lightness < 55 else "#000"
        if row.planted is not None:
            title += "; planted (noise)" if planted else "; clean"
        if planted:
            classes += ("planted",)
            marker = f"[{token if marker is None else marker}]"
        cells.append(Cell(token, background, text_colour, title, classes, marker, ("4",) if planted else ()))
    if prefix and cells and cells[0].background is None and cells[0].text.startswith(prefix):
        cells[0] = Cell(cells[0].text[len(prefix):], title=cells[0].title)
    return cells


def shared_prompt(rows: Sequence[WeightedRow]) -> str:
    """The text up to a line end that opens every row's first run of unlabelled tokens (the chat template's system
    prompt, a task instruction), or ``""``: shown once."""
    heads = []
    for row in rows:
        labelled = row.labelled()
        heads.append("".join(row.tokens[: labelled[0] if labelled else len(row.tokens)]))
    return _common_lines(heads)


def _common_lines(texts: Sequence[str]) -> str:
    """The whole lines (up to a line end) that open every one of two or more ``texts``, or ``""``."""
    if len(texts) < 2:
        return ""
    common = os.path.commonprefix(list(texts))
    return common[: common.rfind("\n") + 1]


def _options_text(options: dict) -> str:
    return ", ".join(f"{name} = {value}" for name, value in options.items()) or "(none)"


def _selection_legend(rows: Sequence[WeightedRow]) -> str:
    kept = kept_weights(rows)
    if not kept:
        return "none kept"
    return f"kept tokens weigh {_number(kept[0])}" if len(kept) == 1 else (
        f"kept tokens weigh {_number(kept[0])} to {_number(kept[-1])}")


def _weights_scale_html(rows: Sequence[WeightedRow], selection: bool, low: float, high: float,
                        token: str = "label token") -> tuple[str, str]:
    """The CSS background of a weight view's legend and the sentence that states its scale: a selection's kept and
    dropped tokens and the kept weight, or a weighting's scale from ``low`` to ``high`` (the SFT view, and the DPO
    view's ``token_weights``)."""
    if selection:
        kept = f"hsl({WEIGHT_HUE},70%,{KEPT_LIGHTNESS}%)"
        return kept, (f'A selection: <span class="swatch kept" style="background:{kept}">kept</span> '
                      f'({html.escape(_selection_legend(rows))}) and <span class="swatch dropped" style="background:'
                      f'hsl(0,0%,{DROPPED_BACKGROUND[2]}%)">dropped</span> (weight 0) {token}s.')
    legend = (f"linear-gradient(to right, hsl({WEIGHT_HUE},70%,{LIGHTEST}%), "
              f"hsl({WEIGHT_HUE},70%,{WEIGHT_DARKEST}%))")
    return legend, (f'A weighting: each {token} shaded by its weight, from the smallest weight of these rows, '
                    f'<span class="min">{_number(low)}</span> <span class="legend" style="background:{legend}"></span> '
                    f'<span class="max">{_number(high)}</span>, the largest.')


def _weights_scale_terminal(rows: Sequence[WeightedRow], selection: bool, low: float, high: float,
                            color: bool, token: str = "label token") -> str:
    """The terminal legend line of a weight view (:func:`_weights_scale_html`): in colour, a swatch of a weighting's
    scale with its minimum and maximum; without, what the markers mean."""
    if selection:
        meaning = (f"{token}s kept on blue, dropped on grey" if color else
                   f"dropped {token}s (weight 0) marked {{token}}, kept ones plain")
        return f"a selection: {meaning}; {_selection_legend(rows)}"
    if color:
        steps = 8
        swatch = _terminal_cells([Cell(" ", (WEIGHT_HUE, 70, LIGHTEST - (LIGHTEST - WEIGHT_DARKEST) * step / (steps - 1)),
                                       "#000") for step in range(steps)], color=True)
        return (f"a weighting: {token}s on blue, weight {_number(low)} {swatch} {_number(high)} "
                "(the smallest to the largest weight of these rows)")
    return f"a weighting: {token}s marked {{token|weight}}, weights from {_number(low)} to {_number(high)}"


_SFT_STYLE = f""".dropped {{ color: #666; text-decoration: line-through; }}
.planted {{ outline: 2px solid {PLANTED_COLOUR}; outline-offset: -1px; }}
.swatch {{ display: inline-block; min-width: 3em; text-align: center; }}"""


def render_sft_html(rows: Sequence[WeightedRow], *, method: str, options: dict, selection: bool | None = None,
                    title: str = "SFT token weights", source: str = "") -> str:
    """A self-contained HTML page of the weights an SFT run's loss puts on its label tokens: a legend (the method,
    its options, what the colours and outlines mean: a selection's kept and dropped tokens and the kept weight, or a
    weighting's scale from the smallest to the largest weight of ``rows``), then per row its summary line and its
    text, prompt plain and label tokens coloured, planted tokens outlined, each label token's weight on hover.
    ``selection`` None: a selection when the weights are 0 or one constant (:func:`is_selection`)."""
    selection = is_selection(rows) if selection is None else selection
    low, high = weight_range(rows)
    has_truth = any(row.planted is not None for row in rows)
    prefix = shared_prompt(rows)
    legend, scale = _weights_scale_html(rows, selection, low, high)
    truth = (' <span class="planted">Outlined in red</span>: planted noise (the task\'s ground truth, '
             '<code>planted_spans</code>).' if has_truth else "")
    intro = (f'<p class="method">Method: <b>{html.escape(method)}</b>; options: '
             f'{html.escape(_options_text(options))}.</p>\n'
             f"<p>The weight the loss puts on each label token (0 on a dropped one), from one forward of the model as "
             f"it starts training{', ' + html.escape(source) if source else ''}. Prompt and template text (no label) "
             f"plain. {scale}{truth} Hover over a token for its weight.</p>")
    blocks = [f'<p>Every row opens with:</p>\n<div class="instruction">{html.escape(prefix)}</div>'] if prefix else []
    for row in rows:
        cells = _sft_cells(row, selection=selection, low=low, high=high, prefix=prefix)
        blocks.append(f'<p class="summary">{html.escape(row.summary())}</p>\n'
                      f'<div class="trajectory">{_html_cells(cells)}</div>')
    return _page(title, legend, _SFT_STYLE, intro, blocks)


def render_sft_terminal(rows: Sequence[WeightedRow], *, method: str, options: dict, color: bool,
                        selection: bool | None = None) -> str:
    """A plain-text view of the same: the method and its options, a legend, then per row its summary and its text;
    in colour, label tokens on blue (a selection: kept; dropped on grey; a weighting: darker as the weight grows, a
    swatch of the scale with its minimum and maximum in the legend) and planted tokens underlined; without colours,
    dropped tokens marked ``{token}`` (a weighting: every label token ``{token|weight}``) and planted tokens
    ``[...]``."""
    selection = is_selection(rows) if selection is None else selection
    low, high = weight_range(rows)
    has_truth = any(row.planted is not None for row in rows)
    lines = [f"method: {method}; options: {_options_text(options)}",
             _weights_scale_terminal(rows, selection, low, high, color) + "; prompt and template text plain"]
    if has_truth:
        lines.append("planted noise (ground truth) " + ("underlined" if color else "marked [token]"))
    prefix = shared_prompt(rows)
    if prefix:
        lines.append(f"Every row opens with:\n{prefix.rstrip()}")
    for row in rows:
        cells = _sft_cells(row, selection=selection, low=low, high=high, prefix=prefix, merge=True)
        lines.append(f"--- {row.summary()}\n" + _terminal_cells(cells, color))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SFTWeights:
    """What :func:`sft_weights_from_config` computed: the token-level method (``method``, as run_info.json names it),
    its options, whether its weights are a selection (every signal that weighs tokens declares one, or the weights
    are 0 or one constant) and the rows."""

    method: str
    options: dict
    selection: bool
    rows: list[WeightedRow]


def _row_positions(batch: dict, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(row, offset)`` of each example in a collated batch: a padded batch's row ``i`` from 0, or a padding-free
    batch's one row, the examples one after another."""
    packed = "attention_mask" not in batch and "position_ids" in batch
    if not packed:
        return [(index, 0) for index in range(len(lengths))]
    offsets = [0]
    for length in lengths[:-1]:
        offsets.append(offsets[-1] + length)
    return [(0, offset) for offset in offsets]


def _view_trainer(config: str, run_args, training_args, model_args, view: str):
    """The trainer of run config ``config`` built as ``tokenweave train`` builds it (model, frozen models, token
    signals, random control; nothing trained), writing nothing: a temporary ``output_dir``, no hub push, no tracker."""
    import logging
    import tempfile

    from .train import build_trainer

    logging.getLogger(__name__).info("[%s] loading %s and preparing %s (the trainer of %s)...", view,
                                     model_args.model_name_or_path, run_args.dataset_name, config)
    training_args.push_to_hub, training_args.report_to = False, []
    with tempfile.TemporaryDirectory(prefix=f"{view}-") as output_dir:
        training_args.output_dir = output_dir
        return build_trainer(run_args, training_args, model_args)


def _first_rows(trainer, num_rows: int, config: str) -> list[dict]:
    """The first ``num_rows`` rows of the trainer's prepared train dataset, in order; ``ValueError`` when it has
    none."""
    dataset = trainer.train_dataset
    examples = list(dataset.take(num_rows)) if not hasattr(dataset, "select") else [
        dataset[index] for index in range(min(num_rows, len(dataset)))]
    if not examples:
        raise ValueError(f"{config}: the prepared train dataset has no rows.")
    return examples


def sft_weights_from_config(config: str, num_rows: int = 8) -> SFTWeights:
    """The weights an SFT run's loss puts on the label tokens of the first ``num_rows`` rows of its prepared train
    dataset, in order: the trainer built from the YAML ``config`` as ``tokenweave train`` builds it (model, frozen
    models, token signals, random control; nothing trained), the rows collated by its data collator into one batch
    and weighed by :meth:`~tokenweave.trainers.sft.TokenSFTTrainer.signal_weights` (the model as loaded, in eval
    mode); each token's text decoded (:func:`~tokenweave.data.token_columns.token_texts`). Rows with
    ``planted_spans`` (the ``noisy_arithmetic`` task) get their planted tokens
    (:func:`~tokenweave.data.noisy_arithmetic.planted_label_mask`). It writes nothing (the trainer is built with a
    temporary ``output_dir``, no hub push, no tracker)."""
    import logging

    from .config import load_run_config
    from .data.noisy_arithmetic import planted_label_mask
    from .data.token_columns import token_texts
    from .trainers.card import token_method
    from .trainers.signals import active_signal_classes

    log = logging.getLogger(__name__)
    run_args, training_args, model_args = load_run_config(config)
    if run_args.method != "sft":
        raise ValueError(f"{config}: method {run_args.method!r}; the SFT token-weight view needs an SFT run config.")
    trainer = _view_trainer(config, run_args, training_args, model_args, "sft-heatmap")
    described = token_method(trainer.args, "sft")
    weighing = [signal for signal in active_signal_classes(trainer.args) if "token_weights" in signal.provides]
    if not weighing:
        raise ValueError(f"{config}: no token signal weighs the tokens (token_signals {trainer.args.token_signals}): "
                         "every label token would weigh 1. Give token_signals, e.g. [dft] or [profit].")
    examples = _first_rows(trainer, num_rows, config)
    log.info("[sft-heatmap] weighing the label tokens of %d rows...", len(examples))
    batch = trainer.data_collator(examples)
    weights = trainer.signal_weights(batch).float().cpu()
    labels = batch["labels"].cpu()
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    rows = []
    lengths = [len(example["input_ids"]) for example in examples]
    for index, (example, (row, offset)) in enumerate(zip(examples, _row_positions(batch, lengths), strict=True)):
        ids = list(example["input_ids"])
        if batch["input_ids"][row, offset : offset + len(ids)].tolist() != ids:
            raise RuntimeError(f"Row {index}'s tokens are not where the collated batch should have them.")
        row_labels = labels[row, offset : offset + len(ids)].tolist()
        row_weights = [float(weights[row, offset + position - 1]) if label != -100 and position > 0 else None
                       for position, label in enumerate(row_labels)]
        planted, note = None, ""
        if example.get("planted_spans") is not None and example.get("completion") is not None:
            try:
                mask = planted_label_mask(tokenizer, ids, example["labels"], example["completion"],
                                          example["planted_spans"])
                labelled = [position for position, label in enumerate(example["labels"]) if label != -100]
                planted = [False] * len(ids)
                for position, flag in zip(labelled, mask, strict=True):
                    planted[position] = bool(flag)
            except ValueError as error:
                note = f"planted tokens unknown ({error})"
        label = f"row {index}" + (f", noise: {example['noise_kind']}" if example.get("noise_kind") else "")
        rows.append(WeightedRow(token_texts(tokenizer, ids), row_weights, planted, label, note))
    selection = all(signal.selection for signal in weighing) or is_selection(rows)
    return SFTWeights(described["method"], described["options"], selection, rows)


# ---------------------------------------------------------------------------------------------------------------
# DPO token signals (tokenweave dpo-heatmap): the per-token inputs TokenDPOTrainer's token-level loss gets.
# ---------------------------------------------------------------------------------------------------------------
NEGATIVE_HUE, POSITIVE_HUE = 0, WEIGHT_HUE  # a diverging scale: red below 0, blue above, white at 0
SEQUENTIAL_HUE = 275  # purple: a sequential scale (a per-token loss), darker as the value grows
WHITE = 100.0  # the lightness of 0 on a diverging scale: pure white whatever the hue
WEIGHT_SIGNALS = frozenset({"token_weights"})
"""Loss inputs drawn as the SFT view draws weights (a selection, or a weighting from the smallest to the largest)."""
DIVERGING_SIGNALS = frozenset({"token_rewards"})
"""Loss inputs drawn on a diverging scale centred on 0 whatever their values (any other: when a value is below 0)."""
CHOSEN_ONLY_SIGNALS = {"distillation_loss": "AlignDistil distils the chosen responses only"}
"""Loss inputs computed on the chosen rows only (the rejected rows hold 0): their rejected completions are drawn
without values, for the reason given."""
SIGNAL_MEANINGS = {
    "token_rewards": "The token reward r&#x302;<sub>t</sub> the loss gets for each completion token (TGDPO: "
                     "log &pi;<sub>RM</sub> &minus; log &pi;<sub>ref</sub>, any real value; T-REG: in "
                     "(&minus;&frac12;, &frac12;))",
    "token_weights": "The weight of each completion token's log-ratio in the DPO margin (cDPO's critical-token "
                     "weights, <code>weights</code>, <code>weight_rules</code>)",
    "distillation_loss": "AlignDistil's per-token distillation loss L<sub>t</sub> on each chosen completion token",
}
GRPO_SIGNAL_MEANINGS = {
    "advantages": "Each completion token's advantage as the policy loss gets it (GRPO's one advantage per "
                  "completion, or a signal's per-token advantages: attention credit's &gamma;<sub>t</sub>&middot;A, "
                  "Rank-GRPO's per-rank advantages)",
    "token_weights": "The factor on each completion token's policy loss, the token signals' weights multiplied "
                     "(RLSD's (1 &minus; &lambda;) + &lambda;&middot;clip(exp(sign(A)&middot;&delta;<sub>t</sub>), "
                     "1 &minus; &epsilon;, 1 + &epsilon;), a critical-token or column weight)",
    "entropy_signal": "HAPO's entropy signal &#x125;<sub>t</sub> in [&minus;1, 1] (above its pivot: positive)",
}


@dataclass(frozen=True)
class SignalRow:
    """One completion of a DPO pair as :func:`render_dpo_html` / :func:`render_dpo_terminal` draw it: the loss input
    ``signal`` (e.g. ``token_rewards``), the ``side`` (chosen / rejected), the text of each completion token and the
    value the signal gives it (``values`` None: the loss gets none for this completion; ``note`` says why), the pair's
    ``label`` (e.g. "pair 0") and the text of its prompt (chat template included), shown once per pair."""

    signal: str
    side: str
    tokens: list[str]
    values: list[float] | None
    label: str = ""
    prompt: str = ""
    note: str = ""

    def __post_init__(self):
        if self.values is not None and len(self.values) != len(self.tokens):
            raise ValueError(f"A {self.signal} row has {len(self.tokens)} tokens and {len(self.values)} values: one "
                             "each.")

    def summary(self) -> str:
        """One line: the pair and side, then the mean, the minimum and the maximum of the values over its tokens
        (with the token that has each extreme)."""
        head = f"{self.label}: {self.side}" if self.label else self.side
        if self.values is None:
            return f"{head}; no {self.signal} values" + (f" ({self.note})" if self.note else "")
        if not self.values:
            return f"{head}; no completion tokens"
        values = self.values
        lowest = min(range(len(values)), key=values.__getitem__)
        highest = max(range(len(values)), key=values.__getitem__)
        return (f"{head}; {self.signal} over its {len(values)} tokens: mean {_number(sum(values) / len(values))}, "
                f"min {_number(values[lowest])} ({self.tokens[lowest]!r}), "
                f"max {_number(values[highest])} ({self.tokens[highest]!r})")


def signal_scale(signal: str, values: Iterable[float]) -> str:
    """How a loss input is drawn: ``"weights"`` (:data:`WEIGHT_SIGNALS`: as the SFT view draws weights),
    ``"diverging"`` (:data:`DIVERGING_SIGNALS`, or any input with a value below 0: red below 0, blue above, white at 0,
    symmetric to the largest ``|value|``) or ``"sequential"`` (from the smallest to the largest value)."""
    if signal in WEIGHT_SIGNALS:
        return "weights"
    if signal in DIVERGING_SIGNALS or any(value < 0 for value in values):
        return "diverging"
    return "sequential"


def diverging_background(value: float, bound: float) -> tuple[int, int, float]:
    """The HSL background of ``value`` on a diverging scale from ``-bound`` to ``bound``: white at 0, red below,
    blue above, reaching ``WEIGHT_DARKEST`` at ``|value| = bound``."""
    strength = min(abs(value) / bound, 1.0) if bound > 0 else 0.0
    return (NEGATIVE_HUE if value < 0 else POSITIVE_HUE, 70, WHITE - (WHITE - WEIGHT_DARKEST) * strength)


def sequential_background(value: float, low: float, high: float) -> tuple[int, int, float]:
    """The HSL background of ``value`` on a sequential scale: light purple at ``low``, ``WEIGHT_DARKEST`` at
    ``high``."""
    return (SEQUENTIAL_HUE, 70, LIGHTEST - (LIGHTEST - WEIGHT_DARKEST) * _weight_strength(value, low, high))


def _signal_groups(rows: Sequence[SignalRow]) -> dict[str, list[SignalRow]]:
    """The rows of each loss input, in the order they first come."""
    groups: dict[str, list[SignalRow]] = {}
    for row in rows:
        groups.setdefault(row.signal, []).append(row)
    return groups


@dataclass(frozen=True)
class _Scale:
    """The scale of one loss input over the rows shown (:func:`_signal_scale_of`)."""

    kind: str  # signal_scale's
    low: float
    high: float
    selection: bool = False

    @property
    def bound(self) -> float:
        """A diverging scale's end: the largest |value| shown."""
        return max(abs(self.low), abs(self.high))


def _signal_scale_of(signal: str, rows: Sequence[SignalRow]) -> _Scale:
    values = [value for row in rows if row.values is not None for value in row.values]
    kind = signal_scale(signal, values)
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    selection = kind == "weights" and is_selection([_weighted(row) for row in rows])
    return _Scale(kind, low, high, selection)


def _weighted(row: SignalRow) -> WeightedRow:
    """A row of weights as the SFT view's :class:`WeightedRow` (no value: no weight)."""
    return WeightedRow(row.tokens, [None] * len(row.tokens) if row.values is None else list(row.values))


def _signal_cells(row: SignalRow, scale: _Scale, merge: bool = False) -> list[Cell]:
    """The cells of a completion: weights as the SFT view draws them (:func:`_sft_cells`), else each token on the
    diverging or sequential scale, ``{signal} = value`` on hover, marked ``{token|value}`` when colours are off; a
    completion without values one plain cell, the reason on hover."""
    if row.values is None:
        return [Cell("".join(row.tokens), title=f"no {row.signal} value" + (f": {row.note}" if row.note else ""),
                     classes=("novalue",))]
    if scale.kind == "weights":
        return _sft_cells(_weighted(row), selection=scale.selection, low=scale.low, high=scale.high, merge=merge)
    cells = []
    for token, value in zip(row.tokens, row.values, strict=True):
        if scale.kind == "diverging":
            background, marker = diverging_background(value, scale.bound), "{" + token + "|" + f"{value:+.2g}" + "}"
        else:
            background = sequential_background(value, scale.low, scale.high)
            marker = "{" + token + "|" + f"{value:.2g}" + "}"
        text_colour = "#fff" if background[2] < 55 else "#000"
        cells.append(Cell(token, background, text_colour, f"{row.signal} = {_number(value)}", (), marker))
    return cells


def _dpo_scale_html(signal: str, rows: Sequence[SignalRow], scale: _Scale) -> tuple[str, str]:
    """The CSS background of a loss input's legend and the sentence that states its scale."""
    if scale.kind == "weights":
        return _weights_scale_html([_weighted(row) for row in rows], scale.selection, scale.low, scale.high,
                                   "completion token")
    if scale.kind == "diverging":
        bound = _number(scale.bound)
        legend = (f"linear-gradient(to right, hsl({NEGATIVE_HUE},70%,{WEIGHT_DARKEST}%), "
                  f"hsl({NEGATIVE_HUE},70%,{WHITE}%), hsl({POSITIVE_HUE},70%,{WEIGHT_DARKEST}%))")
        return legend, (f'A diverging scale centred on 0: <span class="min">&minus;{bound}</span> '
                        f'<span class="legend" style="background:{legend}"></span> <span class="max">{bound}</span>, '
                        f'red below 0, blue above, white at 0, symmetric to the largest |value| of these rows '
                        f'({bound}; values from {_number(scale.low)} to {_number(scale.high)}).')
    legend = (f"linear-gradient(to right, hsl({SEQUENTIAL_HUE},70%,{LIGHTEST}%), "
              f"hsl({SEQUENTIAL_HUE},70%,{WEIGHT_DARKEST}%))")
    return legend, (f'A sequential scale, from the smallest value of these rows, <span class="min">'
                    f'{_number(scale.low)}</span> <span class="legend" style="background:{legend}"></span> '
                    f'<span class="max">{_number(scale.high)}</span>, the largest.')


def _dpo_scale_terminal(signal: str, rows: Sequence[SignalRow], scale: _Scale, color: bool) -> str:
    """The terminal legend line of a loss input (:func:`_dpo_scale_html`)."""
    if scale.kind == "weights":
        return _weights_scale_terminal([_weighted(row) for row in rows], scale.selection, scale.low, scale.high, color,
                                       "completion token")
    if scale.kind == "diverging":
        bound = _number(scale.bound)
        if not color:
            return (f"a diverging scale: tokens marked {{token|value}}, values from {_number(scale.low)} to "
                    f"{_number(scale.high)}")
        steps = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]
        swatch = _terminal_cells([Cell(" ", diverging_background(step, 1.0), "#000") for step in steps], color=True)
        return (f"a diverging scale centred on 0: -{bound} {swatch} {bound} (red below 0, blue above, white at 0; "
                f"symmetric to the largest |value| of these rows; values from {_number(scale.low)} to "
                f"{_number(scale.high)})")
    if not color:
        return (f"a sequential scale: tokens marked {{token|value}}, values from {_number(scale.low)} to "
                f"{_number(scale.high)}")
    swatch = _terminal_cells([Cell(" ", sequential_background(step / 7, 0.0, 1.0), "#000") for step in range(8)],
                             color=True)
    return (f"a sequential scale: {_number(scale.low)} {swatch} {_number(scale.high)} (the smallest to the largest "
            "value of these rows)")


def _pair_blocks(rows: Sequence[SignalRow], prefix: str, prompt_block, row_block) -> list[str]:
    """The blocks of one loss input's rows: each pair's prompt once (``prompt_block(label, prompt)``, ``prefix``, the
    lines every prompt opens with, left out), then each of its completions (``row_block``)."""
    blocks, previous = [], None
    for row in rows:
        if (row.label, row.prompt) != previous:
            blocks.append(prompt_block(row.label, row.prompt.removeprefix(prefix)))
            previous = (row.label, row.prompt)
        blocks.append(row_block(row))
    return blocks


def _shared_prompt_lines(rows: Sequence[SignalRow]) -> str:
    """The whole lines every pair's prompt opens with (the chat template's system prompt, a task instruction), or
    ``""``: shown once."""
    return _common_lines(list(dict.fromkeys(row.prompt for row in rows)))


_DPO_STYLE = """.prompt { font-family: monospace; white-space: pre-wrap; color: #555; margin: 0.2em 0; }
.novalue { color: #666; }
.dropped { color: #666; text-decoration: line-through; }
.swatch { display: inline-block; min-width: 3em; text-align: center; }
h2 code { font-size: 1em; }"""


def render_dpo_html(rows: Sequence[SignalRow], *, method: str, options: dict, title: str = "DPO token signals",
                    source: str = "", trainer: str = "dpo") -> str:
    """A self-contained HTML page of the per-token values a DPO run's token signals give its token-level loss (a GRPO
    run's, with ``trainer="grpo"``: :func:`grpo_signals_from_config`): the method and its options, then for each loss input of ``rows`` (:func:`_signal_groups`) what it is and its scale
    (:func:`signal_scale`: weights as the SFT view draws them; a diverging scale centred on 0, symmetric to the largest
    ``|value|`` shown; or a sequential one), the lines every prompt opens with, and per pair its prompt (plain) and
    each completion's summary line and tokens, coloured by their values, each value on hover."""
    what = ("for each pair's chosen and rejected completion, from one forward of the model as it starts training"
            if trainer == "dpo" else "for completions the model samples as it starts training, from one generation "
            "batch and one forward")
    meanings = SIGNAL_MEANINGS if trainer == "dpo" else GRPO_SIGNAL_MEANINGS
    intro = (f'<p class="method">Method: <b>{html.escape(method)}</b>; options: '
             f'{html.escape(_options_text(options))}.</p>\n'
             f"<p>The per-token values the token-level loss gets {what}{', ' + html.escape(source) if source else ''} "
             f"(the random control, if any, applied). Only the completion tokens carry values; the prompt is plain. "
             f"Hover over a token for its value.</p>")
    blocks, first_legend = [], None
    for signal, group in _signal_groups(rows).items():
        scale = _signal_scale_of(signal, group)
        legend, sentence = _dpo_scale_html(signal, group, scale)
        first_legend = first_legend or legend
        meaning = meanings.get(signal, "A per-token input of the loss")
        blocks.append(f'<h2><code>{html.escape(signal)}</code></h2>\n<p class="scale">{meaning}. {sentence}</p>')
        prefix = _shared_prompt_lines(group)
        if prefix:
            blocks.append(f'<p>Every prompt opens with:</p>\n<div class="instruction">{html.escape(prefix)}</div>')

        def prompt_block(label: str, prompt: str) -> str:
            return f"<h3>{html.escape(label)}</h3>\n" + (
                f'<div class="prompt">{html.escape(prompt)}</div>' if prompt else "")

        def row_block(row: SignalRow, scale: _Scale = scale) -> str:
            return (f'<p class="summary">{html.escape(row.summary())}</p>\n'
                    f'<div class="trajectory {html.escape(row.side)}">{_html_cells(_signal_cells(row, scale))}</div>')

        blocks += _pair_blocks(group, prefix, prompt_block, row_block)
    return _page(title, first_legend or "none", _DPO_STYLE, intro, blocks)


def render_dpo_terminal(rows: Sequence[SignalRow], *, method: str, options: dict, color: bool) -> str:
    """A plain-text view of the same: the method and its options, then per loss input a legend line (in colour, a
    swatch of its scale; without, ``{token|value}`` markers), the lines every prompt opens with, and per pair its
    prompt and each completion's summary and tokens."""
    lines = [f"method: {method}; options: {_options_text(options)}"]
    for signal, group in _signal_groups(rows).items():
        scale = _signal_scale_of(signal, group)
        lines.append(f"== {signal}: {_dpo_scale_terminal(signal, group, scale, color)}; the prompt plain")
        prefix = _shared_prompt_lines(group)
        if prefix:
            lines.append(f"Every prompt opens with:\n{prefix.rstrip()}")

        def prompt_block(label: str, prompt: str) -> str:
            return f"=== {label}" + (f"\n{prompt}" if prompt else "")

        def row_block(row: SignalRow, scale: _Scale = scale) -> str:
            return f"--- {row.summary()}\n" + _terminal_cells(_signal_cells(row, scale, merge=True), color)

        lines += _pair_blocks(group, prefix, prompt_block, row_block)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SignalView:
    """What :func:`dpo_signals_from_config` (or :func:`grpo_signals_from_config`) computed: the token-level method
    (as run_info.json names it), its options and the rows (per loss input, pair by pair, chosen then rejected; or
    prompt by prompt, each sampled completion)."""

    method: str
    options: dict
    rows: list[SignalRow]


def _per_token_losses() -> list[str]:
    """The registered preference losses that read a per-token input of the token signals."""
    from .losses.preference import PREFERENCE_LOSSES
    from .trainers.dpo import TRAINER_INPUTS

    return sorted(name for name, loss in PREFERENCE_LOSSES.items() if loss.needs - TRAINER_INPUTS and ":" not in name)


def dpo_signals_from_config(config: str, num_rows: int = 8) -> SignalView:
    """The per-token values a DPO run's token signals give its token-level loss for the chosen and the rejected
    completion of the first ``num_rows`` rows of its prepared train dataset: the trainer built from the YAML
    ``config`` as ``tokenweave train`` builds it (model, reference, frozen models, token signals, random control;
    nothing trained), the rows collated by its data collator into one batch, and
    :meth:`~tokenweave.trainers.dpo.TokenDPOTrainer.signal_values` (the model as loaded, in eval mode) read at each
    completion token (entry ``t`` is about token ``t + 1``); each token's text decoded
    (:func:`~tokenweave.data.token_columns.token_texts`). A loss input computed on the chosen rows only
    (:data:`CHOSEN_ONLY_SIGNALS`) leaves the rejected completions without values. ``ValueError`` for a config that
    is not a DPO run, whose loss is TRL's, or whose loss gets no per-token value. It writes nothing (the trainer is
    built with a temporary ``output_dir``, no hub push, no tracker)."""
    import logging

    from .config import load_run_config
    from .data.token_columns import token_texts
    from .losses.preference import get_preference_loss
    from .trainers.card import token_method
    from .trainers.dpo import TRAINER_INPUTS

    log = logging.getLogger(__name__)
    run_args, training_args, model_args = load_run_config(config)
    if run_args.method != "dpo":
        raise ValueError(f"{config}: method {run_args.method!r}; the DPO token-signal view needs a DPO run config "
                         "(method: dpo).")
    loss_type = training_args.token_loss_type
    choices = ", ".join(_per_token_losses())
    if loss_type is None:
        raise ValueError(f"{config}: loss_type {training_args.loss_type} is TRL's, which has no token-level inputs to "
                         f"show: set loss_type to a token-level loss with per-token inputs ({choices}).")
    needs = get_preference_loss(loss_type).needs
    if not needs - TRAINER_INPUTS:
        raise ValueError(f"{config}: loss_type {loss_type!r} gets no per-token value from the token signals (it needs "
                         f"{sorted(needs) or 'nothing'}): set loss_type to one that does ({choices}).")
    trainer = _view_trainer(config, run_args, training_args, model_args, "dpo-heatmap")
    described = token_method(trainer.args, "dpo")
    examples = _first_rows(trainer, num_rows, config)
    log.info("[dpo-heatmap] computing the token signals of %d pairs...", len(examples))
    batch = trainer.data_collator(examples)
    values = {name: tensor.float().cpu() for name, tensor in
              trainer.signal_values(batch).items()}
    if not values:
        raise ValueError(f"{config}: the token signals give loss_type {loss_type!r} no per-token value "
                         f"(token_signals {trainer.args.token_signals}): set loss_type to a loss with per-token inputs "
                         f"({choices}) and the token signals it reads.")
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    input_ids, completion_mask = batch["input_ids"].cpu(), batch["completion_mask"].cpu()
    attention_mask = batch["attention_mask"].cpu()
    sequences = {}  # (pair, side) -> (prompt text, completion token texts, completion positions)
    for index, example in enumerate(examples):
        for offset, side in enumerate(("chosen", "rejected")):
            row = offset * len(examples) + index
            positions = attention_mask[row].nonzero().flatten().tolist()
            ids = input_ids[row, positions].tolist()
            full = list(example["prompt_ids"]) + list(example[f"{side}_ids"])
            if ids not in (full[: len(ids)], full[len(full) - len(ids) :]):
                raise RuntimeError(f"Row {index}'s {side} tokens are not where the collated batch should have them.")
            texts = token_texts(tokenizer, ids)
            completion = [(position, text) for position, text in zip(positions, texts, strict=True)
                          if completion_mask[row, position] and position > 0]
            prompt = "".join(text for position, text in zip(positions, texts, strict=True)
                             if not completion_mask[row, position])
            sequences[index, side] = (prompt, [text for _, text in completion],
                                      [position for position, _ in completion])
    rows = []
    for name, tensor in values.items():
        for index in range(len(examples)):
            for offset, side in enumerate(("chosen", "rejected")):
                prompt, tokens, positions = sequences[index, side]
                row = offset * len(examples) + index
                note = CHOSEN_ONLY_SIGNALS.get(name, "") if side == "rejected" else ""
                row_values = None if note else [float(tensor[row, position - 1]) for position in positions]
                rows.append(SignalRow(name, side, tokens, row_values, f"pair {index}", prompt, note))
    return SignalView(described["method"], described["options"], rows)



def grpo_signals_from_config(config: str, num_prompts: int = 2) -> SignalView:
    """The per-token values a GRPO run's token signals give its policy loss for completions of the first
    ``num_prompts`` prompts of its prepared train dataset: the trainer built from the YAML ``config`` as ``tokenweave
    train`` builds it (nothing trained), in evaluation mode, generates and scores one batch of
    ``num_generations_eval`` completions per prompt (``_generate_and_score_completions``, every signal's after-
    generation step included), then :meth:`~tokenweave.trainers.grpo.TokenGRPOTrainer.signal_values`: each
    completion token's advantage and the signals' per-token loss inputs (RLSD's factor, a weight, HAPO's entropy
    signal). ``ValueError`` for a config that is not a GRPO run or has no token signal. It writes nothing."""
    import logging

    from .config import load_run_config
    from .data.token_columns import token_texts
    from .trainers.card import token_method

    run_args, training_args, model_args = load_run_config(config)
    if run_args.method != "grpo":
        raise ValueError(f"{config}: method {run_args.method!r}; the GRPO token-signal view needs a GRPO run config "
                         "(method: grpo).")
    if not training_args.token_signals:
        raise ValueError(f"{config}: no token_signals: the view shows what a GRPO run's token signals give its loss "
                         "(set token_signals, e.g. [rlsd]).")
    trainer = _view_trainer(config, run_args, training_args, model_args, "grpo-heatmap")
    described = token_method(trainer.args, "grpo")
    prompts = _first_rows(trainer, num_prompts, config)
    generations = trainer.num_generations_eval
    logging.getLogger(__name__).info("[grpo-heatmap] sampling %d completions of %d prompts and computing the token "
                                     "signals...", generations * len(prompts), len(prompts))
    trainer.model.eval()
    output = trainer._generate_and_score_completions([row for row in prompts for _ in range(generations)])
    values = {name: tensor.cpu() for name, tensor in trainer.signal_values(output).items()}
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    rows = []
    for name, tensor in values.items():
        for row in range(output["completion_ids"].size(0)):
            prompt_ids = output["prompt_ids"][row][output["prompt_mask"][row].bool()].tolist()
            length = int(output["completion_mask"][row].sum())
            ids = output["completion_ids"][row, :length].tolist()
            rows.append(SignalRow(name, f"completion {row % generations}", token_texts(tokenizer, ids),
                                  tensor[row, :length].tolist(), f"prompt {row // generations}",
                                  tokenizer.decode(prompt_ids)))
    return SignalView(described["method"], described["options"], rows)
