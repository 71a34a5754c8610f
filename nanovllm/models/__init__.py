"""Model registry: ModelConfig.architecture -> model class, and loading a checkpoint into it."""
import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import iter_weights, load_model_config, load_weights

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
}


def get_model(model_config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
              use_fused_output: bool = False) -> nn.Module:
    """The model class for `model_config.architecture`, with uninitialized weights of `dtype` on `device`."""
    model_cls = MODEL_REGISTRY.get(model_config.architecture)
    if model_cls is None:
        raise ValueError(f"Unsupported architecture {model_config.architecture!r}; "
                         f"supported: {', '.join(MODEL_REGISTRY)}.")
    # Parameters are created directly in the target dtype and device: no fp32 copy, no CPU round trip.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(model_config, use_fused_output)
    finally:
        torch.set_default_dtype(default_dtype)


def set_use_triton(model: nn.Module, use_triton: bool) -> None:
    """Switches every layer that has a Triton path (attention, rope + KV store, RMSNorm, SiLU-and-mul) to
    it, or back to plain torch: the runner turns it on for CUDA; tests turn it off to get the reference."""
    for module in model.modules():
        if hasattr(module, "use_triton"):
            module.use_triton = use_triton


def load_model(path: str, dtype: torch.dtype, device: torch.device | str, use_fused_output: bool = False,
               load_format: str = "auto") -> tuple[nn.Module, ModelConfig]:
    """(model in eval mode with the weights of `path` loaded, its ModelConfig). `path` is an HF folder
    or a .gguf file; with load_format="dummy" only its config is read and the weights are random."""
    model_config = load_model_config(path)
    model = get_model(model_config, dtype, device, use_fused_output)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, iter_weights(path), dtype, source=str(path))
    return model.eval(), model_config


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of a realistic scale (norms near 1, matrices with std 0.02), seeded, drawn on the
    parameters' own device so a multi-GB model initializes in a blink."""
    for i, (name, param) in enumerate(sorted(model.named_parameters())):
        gen = torch.Generator(param.device).manual_seed(seed + i)
        if "norm" in name:
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen, device=param.device))
        else:
            param.copy_(0.02 * torch.randn(param.shape, generator=gen, device=param.device))
