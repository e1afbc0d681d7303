"""Frozen models under 2-process DeepSpeed ZeRO-3: a reference by path and a history model (restored, then updated
from the policy's effective weights), with and without LoRA, give the per-token log-probs of one process within
1e-5 (``frozen_probe.py`` says how; one launch for both cases)."""

import json

import pytest
import torch

from tokenweave.models import build_tiny_llama

from . import frozen_probe
from .runs import accelerate_launch, save_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The policy (seed 0), the reference (seed 1) and the model the history is restored from (seed 2)."""
    root = save_tiny_models(tmp_path_factory.mktemp("frozen-models"), {"policy": 0, "reference": 1})
    other = build_tiny_llama(seed=2)[0].named_parameters(remove_duplicate=False)
    torch.save({name: param.detach() for name, param in other}, root / "other_weights.pt")
    return root


def test_frozen_models_under_zero3_read_what_one_process_reads(models, tmp_path, one_torch_thread):
    accelerate_launch("cpu_zero3.yaml", [str(frozen_probe.__file__), str(models), str(tmp_path / "zero3")])
    launched = [json.loads((tmp_path / "zero3" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for case in frozen_probe.CASES:
        for rank in launched:  # sharded: the policy and the two frozen models are DeepSpeed engines
            assert rank[case]["policy_type"] == "DeepSpeedEngine"
            assert rank[case]["frozen_types"] == ["DeepSpeedEngine", "DeepSpeedEngine"]
        result = frozen_probe.run(models, tmp_path / "alone", case, per_device_batch=4)
        assert "DeepSpeedEngine" not in (result["policy_type"], *result["frozen_types"])
        alone = result["rows"]
        seen = {**launched[0][case]["rows"], **launched[1][case]["rows"]}
        assert len(alone) == 4 and seen.keys() == alone.keys()  # every row, on one of the two processes
        assert launched[0][case]["rows"].keys().isdisjoint(launched[1][case]["rows"].keys())
        for row, values in alone.items():
            for name in ("reference", "history"):
                assert seen[row][name] == pytest.approx(values[name], abs=1e-5), (case, name)
        assert any(abs(a - b) > 1e-3 for values in alone.values()
                   for a, b in zip(values["reference"], values["history"]))  # two different models
