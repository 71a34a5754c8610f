"""nanovllm: a small, readable and fast LLM inference engine."""
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in torch and the models: import it lazily so `nanovllm --help` and the config stay light.
    if name == "LLM":
        from nanovllm.llm import LLM
        return LLM
    raise AttributeError(name)
