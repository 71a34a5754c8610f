"""RMSNorm, with the residual add folded in as nano-vllm does."""
from typing import NamedTuple

import torch
from torch import nn


class Normed(NamedTuple):
    """Passed where a decoder layer expects the residual: the residual stream itself, with the hidden states
    already its RMSNorm by the norm that comes next (the tensor-parallel all-reduce that summed the stream
    normalized it in the same kernel), so that norm is skipped."""
    stream: torch.Tensor


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 like HF's LlamaRMSNorm.

    `forward(x, residual)` first adds the residual and returns `(normed, new_residual)`: the decoder layer
    then carries the residual stream without a separate add. With `use_triton` (set on CUDA) one Triton
    kernel does the add and the norm, updating `residual` in place; `forward_native` is the plain torch
    path (CPU, and the reference), which rounds to the model dtype before the weight multiply as HF does.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.use_triton = False
        self.feeds_projection = True  # a q/k/v or gate/up projection follows, which may fold the norm in

    def rms_forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(orig_dtype)

    def add_rms_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The sum is rounded to the model dtype before the norm, as HF's `residual + hidden_states` is.
        residual = (x.float() + residual.float()).to(x.dtype)
        return self.rms_forward(residual), residual

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.rms_forward(x)
        return self.add_rms_forward(x, residual)

    def forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from nanovllm.kernels.add_rmsnorm import add_rmsnorm, rmsnorm
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return add_rmsnorm(x, residual, self.weight, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.use_triton:
            return self.forward_triton(x, residual)
        return self.forward_native(x, residual)
