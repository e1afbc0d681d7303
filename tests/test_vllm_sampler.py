"""The vllm sampler (``tokenweave.inference.vllm_sampling``, ``sampler: vllm``) without a GPU: a stand-in ``vllm``
module records what the engine is given (token ids of the chat prompts, one seed per prompt, K samples, the
temperature) and returns texts; the labelled dataset has the transformers path's format. On a GPU machine
``benchmarks/hapo_vllm_sampler.py`` runs the real engine."""

import sys
from types import ModuleType, SimpleNamespace

import pytest

from tokenweave.data.preferences import SAMPLE_COLUMNS
from tokenweave.inference.generation import chat_prompt_ids
from tokenweave.inference.loading import load_model_and_tokenizer
from tokenweave.inference.sampling import sample_trajectories
from tokenweave.inference.shards import Shard, batch_seed
from tokenweave.inference.vllm_sampling import import_vllm

from .conftest import CONFIGS


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose engine answers request i's sample k with "... The answer is <i + k>." """
    calls = SimpleNamespace(engine=None, requests=None, parameters=None)

    class LLM:
        def __init__(self, **kwargs):
            calls.engine = kwargs

        def generate(self, requests, parameters, use_tqdm=True):
            calls.requests, calls.parameters = requests, parameters
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f" step\nThe answer is {index + k}. ")
                                             for k in range(params.kwargs["n"])])
                    for index, params in enumerate(parameters)]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    module = ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_the_engine_gets_the_chat_prompts_one_seed_each_and_the_dataset_has_the_usual_format(fake_vllm,
                                                                                               tiny_model_cache):
    samples = sample_trajectories("tiny-llama", num_examples=3, num_samples_per_prompt=2, temperature=0.8,
                                  max_new_tokens=20, seed=7, sampler="vllm",
                                  vllm_options={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5})
    assert fake_vllm.engine["tensor_parallel_size"] == 2 and fake_vllm.engine["gpu_memory_utilization"] == 0.5
    assert fake_vllm.engine["seed"] == 7 and fake_vllm.engine["dtype"] == "float32"
    _, tokenizer = load_model_and_tokenizer("tiny-llama")
    prompts = sorted({(row["question_id"], str(row["prompt"])) for row in samples})
    assert len(prompts) == 3
    rows_prompts = [samples[2 * index]["prompt"] for index in range(3)]
    assert [request["prompt_token_ids"] for request in fake_vllm.requests] == chat_prompt_ids(tokenizer, rows_prompts)
    for index, params in enumerate(fake_vllm.parameters):
        assert params.kwargs == {"n": 2, "temperature": 0.8, "top_p": 1.0, "max_tokens": 20,
                                 "seed": batch_seed(7, index), "skip_special_tokens": True}
    assert set(SAMPLE_COLUMNS) <= set(samples.column_names)
    assert [row["completion"][0]["content"] for row in samples][:2] == ["step\nThe answer is 0.",
                                                                         "step\nThe answer is 1."]
    assert [row["parsed"] for row in samples] == ["0", "1", "1", "2", "2", "3"]
    assert [row["correct"] for row in samples] == [row["parsed"] == str(row["answer"]) for row in samples]


def test_greedy_is_temperature_zero(fake_vllm, tiny_model_cache):
    sample_trajectories("tiny-llama", num_examples=1, num_samples_per_prompt=1, temperature=None, sampler="vllm")
    assert fake_vllm.parameters[0].kwargs["temperature"] == 0.0


def test_an_adapter_or_several_processes_are_refused(fake_vllm, tiny_model_cache):
    with pytest.raises(ValueError, match="plain model .no adapter. in one process"):
        sample_trajectories("tiny-llama", num_examples=1, sampler="vllm", adapter="some/adapter")
    with pytest.raises(ValueError, match="in one process"):
        sample_trajectories("tiny-llama", num_examples=1, sampler="vllm", shard=Shard(0, 2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_trajectories("tiny-llama", num_examples=1, sampler="sglang")


def test_without_vllm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match="pip install vllm"):
        import_vllm()


def test_the_critical_pipeline_refuses_sampler_vllm_without_vllm_before_anything_trains(monkeypatch, tmp_path):
    from tokenweave.pipelines.critical import parse_pipeline_config

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match=r"sampler: vllm needs vLLM, which is not installed: pip install vllm"):
        parse_pipeline_config(["--config", str(CONFIGS / "critical_tiny.yaml"), "--sampler", "vllm",
                               "--work_dir", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_the_critical_pipeline_accepts_sampler_vllm_where_it_is_installed(fake_vllm, tmp_path):
    from tokenweave.pipelines.critical import parse_pipeline_config

    config = parse_pipeline_config(["--config", str(CONFIGS / "critical_tiny.yaml"), "--sampler", "vllm"])
    assert config.sampler == "vllm"
