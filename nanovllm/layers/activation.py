"""The gated activation of the Llama/Qwen MLP."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, where gate and up are the two halves of the fused gate_up_proj output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # (T, I) each
        return F.silu(gate) * up
