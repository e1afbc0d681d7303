"""Token-level preference losses that read frozen models or token columns under 2-process DeepSpeed ZeRO-3, with and
without LoRA: one step of TGDPO (the reward model online, a frozen model sharded like the reference), T-REG (the
rewards from columns) and AlignDistil (two frozen teachers, the heads on chunks of positions) on 2 processes × 4 pairs
trains the weights that 1 process × 8 pairs trains, and logs the same numbers, within 1e-5 (``dpo_signals_probe.py``
says how; one launch for the six cases). ZeRO-2 against ZeRO-3, ± LoRA: ``test_dpo.py``."""

import json

import pytest

from . import dpo_signals_probe
from .runs import accelerate_launch, save_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The policy (seed 0), the reference (seed 1), TGDPO's reward model and AlignDistil's DPO teacher (seed 2), and
    AlignDistil's reverse-DPO teacher (seed 3)."""
    return save_tiny_models(tmp_path_factory.mktemp("dpo-signal-models"),
                            {"policy": 0, "reference": 1, "reward": 2, "reverse": 3})


def test_a_step_on_two_processes_trains_what_one_process_trains(models, tmp_path, one_torch_thread):
    alone = {case: dpo_signals_probe.run(models, tmp_path / "alone", case, per_device_batch=8)
             for case in dpo_signals_probe.CASES}
    accelerate_launch("cpu_zero3.yaml", [str(dpo_signals_probe.__file__), str(models), str(tmp_path / "launched")])
    for case, expected in alone.items():
        assert expected["policy_type"] != "DeepSpeedEngine"
        logged = expected["logged"]
        if case.startswith("aligndistil"):
            assert 0 < logged["aligndistil/tvd_mean"] < 2 and logged["loss"] > 0
        else:
            assert logged["token_rewards/chosen_abs_mean"] > 1e-2, case
        for rank in (0, 1):
            launched = json.loads((tmp_path / "launched" / f"{case}.rank{rank}.json").read_text())
            assert launched["policy_type"] == "DeepSpeedEngine"
            assert set(launched["frozen_types"]) <= {"DeepSpeedEngine"}  # the frozen models, sharded
            for key, value in logged.items():
                assert launched["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (case, key)
            assert launched["weights"].keys() == expected["weights"].keys()
            for name, values in expected["weights"].items():
                assert launched["weights"][name] == pytest.approx(values, abs=1e-5), (case, name)
