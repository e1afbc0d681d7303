"""Critical-token heatmaps: every completion token shaded by its score ``s_t`` (cDPO, arXiv 2411.19943).

``tokenweave heatmap --scores outputs/critical_tokens/pairs --output page.html [--terminal]`` reads a
scored dataset (the ``pairs/`` output of ``tokenweave critical``, or any dataset with ``{side}_tokens`` and
``{side}_scores`` columns, as :func:`tokenweave.inference.scoring.score_dataset` writes them) and renders:

* a self-contained HTML page (:func:`render_html`): one ``<span>`` per token, its background going from
  dark red (``s_t = 0``: critical) to white (``s_t = 1``), its score in the ``title`` tooltip, text
  HTML-escaped and newlines kept;
* a plain-terminal view (:func:`render_terminal`): ANSI 24-bit background colours of the same scale, or,
  without colours (output not a TTY), tokens scoring below a threshold marked as ``[token|0.12]``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset

# Lightness (HSL, per cent) of a token's red background at score 0 (critical) and at score 1.
DARKEST, LIGHTEST = 27.0, 97.0
_ANSI_RESET = "\x1b[0m"


@dataclass(frozen=True)
class ScoredTrajectory:
    """One scored completion: its tokens' texts and scores, the question it answers and its side."""

    question: str
    side: str
    tokens: list[str]
    scores: list[float]


def trajectories_from_dataset(dataset: Dataset, max_examples: int | None = None) -> list[ScoredTrajectory]:
    """Every scored completion of the first ``max_examples`` rows (all by default), row by row.

    A side is every ``X`` with both ``X_tokens`` and ``X_scores`` columns (``chosen``, ``rejected``, or
    ``completion``). The question is the last user message of a conversational ``prompt``.
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
            trajectories.append(ScoredTrajectory(_question(row.get("prompt")), side, tokens, scores))
    return trajectories


def _question(prompt) -> str:
    if isinstance(prompt, list):
        user_messages = [message["content"] for message in prompt if message["role"] == "user"]
        return user_messages[-1] if user_messages else ""
    return prompt or ""


def score_lightness(score: float) -> float:
    """HSL lightness (per cent) of a token's background: ``DARKEST`` at score 0, ``LIGHTEST`` at 1, linear."""
    return DARKEST + (LIGHTEST - DARKEST) * min(max(score, 0.0), 1.0)


def _rgb(score: float) -> tuple[int, int, int]:
    """The background of :func:`score_lightness` in RGB (hue 0, saturation 100%), for terminals."""
    lightness = score_lightness(score) / 100
    low = max(0.0, 2 * lightness - 1)  # the HSL -> RGB formula for hue 0 and saturation 1
    return round(255 * min(1.0, 2 * lightness)), round(255 * low), round(255 * low)


def _token_span(token: str, score: float) -> str:
    lightness = score_lightness(score)
    colour = "#fff" if lightness < 55 else "#000"
    return (
        f'<span style="background:hsl(0,100%,{lightness:.1f}%);color:{colour}" '
        f'title="s = {score:.4f}">{html.escape(token)}</span>'
    )


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.trajectory {{ font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc; padding: 0.5em; }}
.legend {{ display: inline-block; width: 12em; height: 1em; vertical-align: middle;
  background: linear-gradient(to right, hsl(0,100%,{darkest}%), hsl(0,100%,{lightest}%)); }}
h3 {{ margin-bottom: 0.2em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>Each completion token is shaded by its critical-token score
s<sub>t</sub> = softmax((1+b)&middot;z<sub>pos</sub> &minus; b&middot;z<sub>neg</sub>)[y<sub>t</sub>]
(cDPO, arXiv 2411.19943): s = 0 <span class="legend"></span> s = 1. Dark red tokens are likely critical;
cDPO weights a rejected token by 1 &minus; s<sub>t</sub>. Hover over a token for its score.</p>
{body}
</body>
</html>
"""


def render_html(trajectories: Sequence[ScoredTrajectory], title: str = "Critical tokens") -> str:
    """A self-contained HTML page: each trajectory a block with one ``<span>`` per token (module docstring)."""
    sections, previous_question = [], None
    for trajectory in trajectories:
        if trajectory.question != previous_question:
            sections.append(f"<h2>{html.escape(trajectory.question)}</h2>")
            previous_question = trajectory.question
        spans = "".join(_token_span(token, score) for token, score in zip(trajectory.tokens, trajectory.scores))
        sections.append(f'<h3>{html.escape(trajectory.side)}</h3>\n<div class="trajectory">{spans}</div>')
    return _PAGE.format(title=html.escape(title), darkest=DARKEST, lightest=LIGHTEST, body="\n".join(sections))


def render_terminal(trajectories: Sequence[ScoredTrajectory], *, color: bool, threshold: float = 0.5) -> str:
    """A plain-text view: ANSI background colours (``color``), or else ``[token|score]`` markers on the tokens
    scoring below ``threshold``; every other token is printed as it is."""
    blocks, previous_question = [], None
    for trajectory in trajectories:
        if trajectory.question != previous_question:
            blocks.append(f"=== {trajectory.question}")
            previous_question = trajectory.question
        parts = []
        for token, score in zip(trajectory.tokens, trajectory.scores):
            if color:
                red, green, blue = _rgb(score)
                foreground = "97" if score_lightness(score) < 55 else "30"
                style = f"\x1b[48;2;{red};{green};{blue}m\x1b[{foreground}m"
                # A background colour running past a line end paints the rest of the line: stop it there.
                parts.append(style + token.replace("\n", _ANSI_RESET + "\n" + style) + _ANSI_RESET)
            elif score < threshold:
                parts.append(f"[{token}|{score:.2f}]")
            else:
                parts.append(token)
        blocks.append(f"--- {trajectory.side}\n" + "".join(parts))
    return "\n".join(blocks) + "\n"
