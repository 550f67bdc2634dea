"""The vLLM engine's parts that run without vLLM: parameter translation and the refusal."""

from __future__ import annotations

import importlib.util

import pytest

from training.rollout import SamplingParams, sample_seed
from training.rollout_vllm import (
    WORKER_EXTENSION,
    VLLMNotAvailableError,
    VLLMRolloutEngine,
    vllm_sampling_kwargs,
)


def test_sampling_params_translate_to_vllm_keywords() -> None:
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, n=4,
                            stop=("</answer>",), seed=5)
    kwargs = vllm_sampling_kwargs(params, prompt_index=3, seed=5)
    assert kwargs == {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64,
                      "stop": ["</answer>"], "seed": sample_seed(5, 3, 0), "logprobs": 0,
                      "include_stop_str_in_output": False, "skip_special_tokens": True}
    assert vllm_sampling_kwargs(SamplingParams(), 0, 1)["stop"] is None
    assert WORKER_EXTENSION == "training.rollout_vllm.PrefloopWorkerExtension"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_engine_without_vllm_refuses_with_an_actionable_error() -> None:
    with pytest.raises(VLLMNotAvailableError, match="hf engine"):
        VLLMRolloutEngine("smollm2-135m-instruct")
