"""Model registry: ModelConfig.architecture -> model class, and loading a checkpoint into it."""
from collections.abc import Iterator

import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.distributed.parallel_state import single_rank
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
        init_dummy_weights(model, model_config)
    else:
        load_weights(model, iter_weights(path), dtype, source=str(path))
    return model.eval(), model_config


def init_dummy_weights(model: nn.Module, model_config: ModelConfig, seed: int = 0) -> None:
    """Random weights of a realistic scale (norms near 1, matrices with std 0.02), seeded, drawn on the
    parameters' own device so a multi-GB model initializes in a blink. They reach the model as a checkpoint
    would (dummy_weights -> load_weights), so every tensor-parallel size slices the same model."""
    device = next(model.parameters()).device
    load_weights(model, dummy_weights(type(model), model_config, device, seed), source="the dummy weights")


def dummy_weights(model_cls: type[nn.Module], model_config: ModelConfig, device: torch.device,
                  seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named random tensors at full (unsharded) size: parameter i of the one-rank model, in name order,
    drawn with seed + i, then fused parameters split into their checkpoint parts (q/k/v, gate/up)."""
    with single_rank(), torch.device("meta"):
        full = model_cls(model_config)
    parts = {}  # fused parameter name -> [(HF name, shard id)] in output order
    for hf_name, (fused_name, shard_id) in model_cls.packed_modules_mapping.items():
        parts.setdefault(fused_name, []).append((hf_name, shard_id))
    for i, (name, param) in enumerate(sorted(full.named_parameters())):
        gen = torch.Generator(device).manual_seed(seed + i)
        tensor = torch.randn(param.shape, generator=gen, device=device)
        tensor = 1 + 0.1 * tensor if "norm" in name else 0.02 * tensor
        module_name, _, leaf = name.rpartition(".")
        fused = parts.get(module_name.rpartition(".")[2])
        if fused is None:
            yield name, tensor
            continue
        module = full.get_submodule(module_name)
        if hasattr(module, "output_sizes"):  # gate_up_proj
            sizes = module.output_sizes
        else:  # qkv_proj
            sizes = [(module.num_heads if s == "q" else module.num_kv_heads) * module.head_dim for _, s in fused]
        for (hf_name, _), piece in zip(fused, tensor.split(sizes)):
            yield f"{module_name.rpartition('.')[0]}.{hf_name}.{leaf}", piece
