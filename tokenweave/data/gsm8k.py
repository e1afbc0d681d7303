"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168) as a built-in task: ``task: gsm8k`` / ``dataset_name: gsm8k`` reads the
hub dataset ``openai/gsm8k`` (config ``main``; a hub cache serves offline) and formats it like the arithmetic task.

A GSM8K row has ``question`` and ``answer``; the answer is the worked solution with calculator annotations
(``48/2 = <<48/2=24>>24``) and a last line ``#### 72``. :func:`format_gsm8k` makes:

- ``prompt``: the arithmetic task's instruction and the question (:func:`.arithmetic.build_prompt`), so both tasks
  ask for the same final line, which the answer reward reads;
- ``answer``: the number after ``####`` (thousands commas removed);
- ``solution``: the worked lines without the annotations, then ``The answer is 72.``;
- ``fmt="sft"``: ``prompt`` / ``completion`` (the solution as an assistant message); ``fmt="prompt"`` (GRPO,
  evaluation, sampling): ``prompt``, ``question``, ``answer``, ``solution``.
"""

from __future__ import annotations

import re

from datasets import Dataset

from .arithmetic import build_prompt

GSM8K_HUB_ID, GSM8K_CONFIG = "openai/gsm8k", "main"
FORMATS = ("sft", "prompt")
_ANNOTATION = re.compile(r"<<[^>]*>>")


def parse_gsm8k_answer(answer: str) -> tuple[str, str]:
    """``(worked solution, final answer)`` of a GSM8K ``answer`` field; ``ValueError`` without its ``####`` line."""
    reasoning, separator, final = answer.rpartition("####")
    if not separator or not final.strip():
        raise ValueError(f"A GSM8K answer ends with '#### <number>'; got {answer[-80:]!r}.")
    final = final.strip().replace(",", "")
    lines = [_ANNOTATION.sub("", line).strip() for line in reasoning.strip().splitlines()]
    return "\n".join([*(line for line in lines if line), f"The answer is {final}."]), final


def format_gsm8k(dataset: Dataset, fmt: str = "prompt") -> Dataset:
    """GSM8K rows (``question``, ``answer``) in the task's format ``fmt`` (module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"The gsm8k task has the formats {FORMATS} (no preference pairs), not {fmt!r}.")
    rows = []
    for question, answer in zip(dataset["question"], dataset["answer"], strict=True):
        solution, final = parse_gsm8k_answer(answer)
        prompt = build_prompt(question)
        if fmt == "sft":
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": solution}]})
        else:
            rows.append({"prompt": prompt, "question": question, "answer": final, "solution": solution})
    return Dataset.from_list(rows)
