"""``tokenweave evidence`` end to end on the tiny model (``--budget tiny``, the tiny critical-token pipeline): every
part but Rank-GRPO's (whose warm start is a SmolLM2 run) writes its rows, the table, the JSON and the figure; a
rerun reuses every step. The tiny model never answers right, so the prefix-sharing pairs get a scripted correct
continuation."""

import json

import pytest
from datasets import load_from_disk

from tokenweave.cli import main as cli_main
from tokenweave.pipelines import prefix_pairs as prefix_module

from .conftest import CONFIGS

pytestmark = pytest.mark.slow


def test_the_command_writes_every_parts_rows_and_reuses_its_steps(tmp_path, tiny_model_cache, one_torch_thread,
                                                                   monkeypatch, capsys):
    calls = []

    def scripted(model, tokenizer, prefixes, forbidden, starts, answers, **kwargs):
        calls.append(len(prefixes))
        right = tokenizer(f"The answer is {answers[0]}.", add_special_tokens=False)["input_ids"]
        return [[(right, True)] if index == 0 else [(right[:1], False)] for index in range(len(prefixes))]

    monkeypatch.setattr(prefix_module, "rollout_continuations", scripted)
    work = tmp_path / "evidence"
    argv = ["evidence", "--budget", "tiny", "--seeds", "0", "1", "--critical_config", str(CONFIGS / "critical_tiny.yaml"),
            "--parts", "critical", "preference", "perturbation", "learning", "--work_dir", str(work)]
    cli_main(argv)
    table = (work / "evidence.md").read_text().splitlines()
    rows = json.loads((work / "evidence.json").read_text())
    assert (work / "evidence.png").stat().st_size and (work / "evidence.svg").stat().st_size
    signals = [row["signal"] for row in rows]
    assert signals[:9] == ["critical tokens (lowest score)"] * 2 + [
        "TGDPO token rewards (lowest r̂)", "T-REG token rewards (lowest r̂)"] + ["attention credit (top FAI)"] * 2 + [
        "HAPO entropy (highest entropy)"] + ["attention credit (γ > 1)"] * 2
    assert signals[9:] == ["cDPO (prefix pairs, 1 steps)"] * 2 + ["cDPO (independent pairs, 1 steps)"] * 2 + [
        "cDPO (prefix pairs, 1 steps)"]
    assert len(table) == 2 + len(rows)
    rollout = rows[1]
    assert sorted(rollout["pairs"]) == ["0", "1"] and all(len(units) == 2 for units in rollout["pairs"].values())
    learning = rows[-1]
    assert learning["shared_units"] and all(len(units) == 2 for units in learning["pairs"].values())  # 2 problems
    assert calls == [4, 4]  # each seed's 4 pairs tried once; one prefix pair each
    for seed in (0, 1):  # one prefix pair, scored; the independent pair of the same question
        prefix = load_from_disk(str(work / f"seed{seed}" / "learning" / "prefix_pairs"))
        independent = load_from_disk(str(work / f"seed{seed}" / "learning" / "independent_pairs"))
        assert len(prefix) == len(independent) == 1 and prefix["question_id"] == independent["question_id"]
        assert "chosen_scores" in prefix.column_names and prefix[0]["chosen"] != independent[0]["chosen"]
    before = (work / "evidence.json").read_text()
    capsys.readouterr()
    cli_main(argv)  # everything reused: the same table
    assert (work / "evidence.json").read_text() == before and calls == [4, 4]
