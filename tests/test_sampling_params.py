"""SamplingParams and Config reject bad values with a ValueError that names the field and the allowed range."""
import math

import pytest

from nanovllm.config import Config
from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.1}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 1.5}, "n"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"seed": 2**63}, "seed"), ({"stop": ["ok", ""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_values_are_rejected_clearly(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_good_values_and_defaults():
    p = SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=MAX_LOGPROBS, stop="x")
    assert p.greedy and p.stop_strs == ["x"] and p.stop_token_ids == []
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(max_tokens=None).max_tokens is None
    assert not SamplingParams(temperature=1e-3).greedy and SamplingParams().max_tokens == 16


@pytest.mark.parametrize("kwargs, field", [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
    ({"block_size": 0}, "block_size"), ({"max_model_len": 0}, "max_model_len"),
    ({"num_kvcache_blocks": 0}, "num_kvcache_blocks"), ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"dtype": "int8"}, "dtype"), ({"load_format": "pt"}, "load_format"),
])
def test_bad_engine_values_are_rejected_clearly(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Config(**kwargs)
