"""Token-weighted SFT with a frozen reference under 2-process DeepSpeed ZeRO-2 and ZeRO-3, with and without LoRA: one
step of rho1 (``global_batch``) + asft + eaft + sstoken on 2 processes × 4 rows trains the weights that 1 process ×
8 rows trains, within 1e-5 (``sft_signals_probe.py`` says how; one launch per ZeRO stage for both cases)."""

import json

import pytest

from . import sft_signals_probe
from .runs import accelerate_launch, save_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The policy (seed 0) and the reference (seed 1)."""
    return save_tiny_models(tmp_path_factory.mktemp("sft-signal-models"), {"policy": 0, "reference": 1})


@pytest.fixture(scope="module")
def alone(models, tmp_path_factory):
    """Each case's step on one process, 8 rows (no DeepSpeed)."""
    output = tmp_path_factory.mktemp("sft-signals-alone")
    return {case: sft_signals_probe.run(models, output, case, per_device_batch=8) for case in sft_signals_probe.CASES}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_step_on_two_processes_trains_what_one_process_trains(models, alone, tmp_path, one_torch_thread,
                                                                zero_stage):
    accelerate_launch(f"cpu_zero{zero_stage}.yaml", [str(sft_signals_probe.__file__), str(models), str(tmp_path)])
    for case, expected in alone.items():
        assert expected["policy_type"] != "DeepSpeedEngine"
        for rank in (0, 1):
            launched = json.loads((tmp_path / f"{case}.rank{rank}.json").read_text())
            assert launched["policy_type"] == "DeepSpeedEngine"
            assert launched["loss"] == pytest.approx(expected["loss"], abs=1e-5), case
            assert launched["grad_norm"] == pytest.approx(expected["grad_norm"], abs=1e-5), case
            assert launched["weights"].keys() == expected["weights"].keys()
            for name, values in expected["weights"].items():
                assert launched["weights"][name] == pytest.approx(values, abs=1e-5), (case, name)
