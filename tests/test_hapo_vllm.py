"""HAPO's adaptive temperature in vLLM (``tokenweave.trainers.hapo_vllm``), everything that needs no GPU: the
processor's math on given logits and statistics against the transformers path, the statistics handed over per
request, the checks, the engine registration in TRL's colocate mode, and the trainer-config checks. The GPU
comparison of both samplers is ``benchmarks/hapo_vllm_sampler.py``."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokenweave.trainers.hapo_vllm as hapo_vllm
from tokenweave.tokens.entropy import adaptive_temperature, entropy_stats
from tokenweave.trainers.grpo import TokenGRPOConfig
from tokenweave.trainers.hapo import AdaptiveTemperatureLogitsProcessor, HapoSignal
from tokenweave.trainers.hapo_vllm import (
    EXTRA_ARGS_KEY, PROCESSOR_PATH, HapoTemperatureProcessor, engine_with_hapo_processor, hapo_extra_args,
)

BASE_TEMPERATURE, TAU = 0.9, 0.3


@pytest.fixture
def stats():
    generator = torch.Generator().manual_seed(0)
    entropies = torch.rand(4, 12, generator=generator) * 3
    return entropy_stats(entropies, torch.ones(4, 12))


def request(stats, temperature=1.0):
    """A vLLM request's SamplingParams as the processor reads them."""
    return SimpleNamespace(temperature=temperature, extra_args=hapo_extra_args(stats, BASE_TEMPERATURE, TAU))


def plain_request():
    return SimpleNamespace(temperature=0.7, extra_args=None)


def logits_with_masked_tokens(rows=6, vocab=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * torch.linspace(0.2, 4.0, rows)[:, None]
    logits[0, :5] = float("-inf")  # e.g. grammar-masked tokens
    return logits


def test_processor_equals_the_transformers_path_on_given_logits_and_statistics(stats):
    logits = logits_with_masked_tokens()
    expected = AdaptiveTemperatureLogitsProcessor(stats, BASE_TEMPERATURE, TAU)(None, logits.clone())
    processor = HapoTemperatureProcessor()
    slots = [7, 3, 11, 0, 5, 2]  # row -> request slot, not in order
    for slot in (7, 3, 11, 0, 2):
        assert processor.add_request(slot, request(stats)) is True
    assert processor.add_request(5, plain_request()) is False  # row 4's request did not ask for it
    scaled = processor.apply(logits.clone(), SimpleNamespace(expanded_idx_mapping=torch.tensor(slots)))
    hapo_rows = [0, 1, 2, 3, 5]
    torch.testing.assert_close(scaled[hapo_rows], expected[hapo_rows], rtol=1e-6, atol=0)
    assert torch.equal(scaled[4], logits[4])
    assert torch.isinf(scaled[0, :5]).all()
    # And the temperatures are not all T_base: the statistics moved them (within T_base·[1 − τ, 1 + τ]).
    implied = logits[1:4, :] / scaled[1:4, :]
    temperatures = implied[:, 0]
    assert torch.allclose(implied, temperatures[:, None], rtol=1e-5)
    assert ((temperatures - BASE_TEMPERATURE).abs() > 1e-3).all()
    assert (temperatures >= BASE_TEMPERATURE * (1 - TAU) - 1e-6).all()
    assert (temperatures <= BASE_TEMPERATURE * (1 + TAU) + 1e-6).all()


def test_one_row_by_hand(stats):
    # Two tokens with logits 0 and log 3 at T_base: p = (1/4, 3/4), H = −(¼ ln ¼ + ¾ ln ¾).
    logits = torch.tensor([[0.0, BASE_TEMPERATURE * math.log(3.0)]])
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    z = (math.log(entropy) - stats.pivot.item()) / stats.rms.item()
    signal = z * (stats.scale_pos.item() if z > 0 else stats.scale_neg.item())
    temperature = BASE_TEMPERATURE * (1 + TAU * max(-1.0, min(1.0, signal)))
    processor = HapoTemperatureProcessor()
    processor.add_request(0, request(stats))
    scaled = processor.apply(logits.clone(), SimpleNamespace(expanded_idx_mapping=torch.tensor([0])))
    torch.testing.assert_close(scaled, logits / temperature, rtol=1e-6, atol=0)
    assert adaptive_temperature(torch.tensor([entropy]), stats, BASE_TEMPERATURE, TAU).item() == pytest.approx(
        temperature, rel=1e-6)


def test_the_first_generation_samples_at_the_base_temperature():
    logits = logits_with_masked_tokens()
    processor = HapoTemperatureProcessor()
    processor.add_request(0, request(None))
    scaled = processor.apply(logits.clone(), SimpleNamespace(expanded_idx_mapping=torch.zeros(6, dtype=torch.long)))
    torch.testing.assert_close(scaled, logits / BASE_TEMPERATURE)


def test_a_reused_slot_forgets_its_previous_request(stats):
    processor = HapoTemperatureProcessor()
    processor.add_request(4, request(stats))
    processor.add_request(4, plain_request())
    logits = logits_with_masked_tokens(rows=2)
    assert torch.equal(processor.apply(logits.clone(), SimpleNamespace(expanded_idx_mapping=torch.tensor([4, 4]))),
                       logits)


@pytest.mark.parametrize(
    "extra_args, temperature, message",
    [
        ({"tau": 0.1}, 1.0, "needs base_temperature, tau"),
        ({"base_temperature": 1.0, "tau": 0.1, "pivot": 0.0}, 1.0, "all or none of"),
        ({"base_temperature": 1.0, "tau": 1.0}, 1.0, "tau in"),
        ({"base_temperature": 0.0, "tau": 0.1}, 1.0, "base_temperature must be > 0"),
        ({"base_temperature": float("nan"), "tau": 0.1}, 1.0, "finite numbers"),
        ({"base_temperature": 1.0, "tau": 0.1}, 0.7, "must have temperature 1.0"),
    ],
)
def test_malformed_requests_are_refused_at_admission(extra_args, temperature, message):
    with pytest.raises(ValueError, match=message):
        HapoTemperatureProcessor.validate_params(
            SimpleNamespace(temperature=temperature, extra_args={EXTRA_ARGS_KEY: extra_args}))
    HapoTemperatureProcessor.validate_params(plain_request())  # no key: not this processor's request


def test_each_generation_hands_the_engine_its_statistics_through_trls_generation_kwargs(stats):
    """What HapoSignal puts into TRL's generation_kwargs (TRL passes them to SamplingParams last) makes the
    processor sample exactly as the transformers processor holding the same statistics."""
    transformers_processor = AdaptiveTemperatureLogitsProcessor(stats, BASE_TEMPERATURE, TAU)
    generation = SimpleNamespace(generation_kwargs={"top_k": 5, "extra_args": {"other": 1}})
    signal = SimpleNamespace(trainer=SimpleNamespace(vllm_generation=generation),
                             temperature_processor=transformers_processor)
    with HapoSignal._vllm_adaptive_temperature_sampling(signal):
        sampling_params = SimpleNamespace(**{"temperature": BASE_TEMPERATURE, **generation.generation_kwargs})
    assert generation.generation_kwargs == {"top_k": 5, "extra_args": {"other": 1}}  # restored
    assert sampling_params.temperature == 1.0 and sampling_params.top_k == 5
    assert sampling_params.extra_args["other"] == 1
    processor = HapoTemperatureProcessor()
    processor.add_request(0, sampling_params)
    logits = logits_with_masked_tokens()
    scaled = processor.apply(logits.clone(), SimpleNamespace(expanded_idx_mapping=torch.zeros(6, dtype=torch.long)))
    torch.testing.assert_close(scaled, transformers_processor(None, logits.clone()), rtol=1e-6, atol=0)


def test_trls_colocated_engine_is_built_with_the_processor(monkeypatch):
    import trl.generation.vllm_generation as trl_vllm

    built = []
    monkeypatch.setattr(trl_vllm, "LLM", lambda **kwargs: built.append(kwargs), raising=False)
    engine = trl_vllm.LLM
    with engine_with_hapo_processor():
        trl_vllm.LLM(model="some/model", seed=0)
    assert trl_vllm.LLM is engine
    assert built == [{"model": "some/model", "seed": 0, "logits_processors": [PROCESSOR_PATH]}]
    module, name = PROCESSOR_PATH.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is hapo_vllm.HapoTemperatureProcessor


def _config(tmp_path, **kwargs):
    return TokenGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, policy_loss="hapo", **kwargs)


def test_vllm_colocate_is_accepted_and_server_mode_refused_with_a_reason(tmp_path):
    assert _config(tmp_path, use_vllm=True, vllm_mode="colocate").hapo_adaptive_temperature is True
    with pytest.raises(ValueError, match="vllm_mode: colocate.*trl vllm-serve"):
        _config(tmp_path, use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match="not with use_transformers_continuous_batching"):
        _config(tmp_path, use_transformers_continuous_batching=True)
    _config(tmp_path, use_vllm=True, vllm_mode="server", hapo_adaptive_temperature=False)  # the other parts work


def test_the_gpu_benchmark_parses_and_stops_without_a_gpu():
    """``benchmarks/hapo_vllm_sampler.py`` (run on a GPU machine) imports everything it uses and says why it stops
    here."""
    script = Path(__file__).parents[1] / "benchmarks" / "hapo_vllm_sampler.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode != 0 and "needs a GPU" in result.stderr
