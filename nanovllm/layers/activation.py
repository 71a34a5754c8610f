"""The gated activation of the Llama/Qwen MLP."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, where gate and up are the two halves of the fused gate_up_proj output.
    With `use_triton` (set on CUDA) one Triton kernel reads x once; `forward_native` is plain torch."""

    def __init__(self) -> None:
        super().__init__()
        self.use_triton = False

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # (T, I) each
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from nanovllm.kernels.silu_and_mul import silu_and_mul
            return silu_and_mul(x)
        return self.forward_native(x)
