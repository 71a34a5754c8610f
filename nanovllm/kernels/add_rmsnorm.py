"""RMSNorm, and residual add fused with RMSNorm: one read of x (and the residual), one write of each output.

Math is fp32 inside, but for the sum of squares (`rms_rstd`). The fused form updates the residual in place
(residual = x + residual, cast to its dtype) and normalizes that stored value, so it gives what the unfused
torch path gives. The projection after the norm can fold it instead (fused_attention_output.rmsnorm_project,
one token): it computes rms_rstd and the normalized row the same way, so it multiplies the very values this
kernel would have stored.
"""
from __future__ import annotations

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the *_ref functions
    triton = tl = None


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual.copy_(x.float() + residual.float())
    return rmsnorm_ref(residual, weight, eps), residual


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) with unit stride on N, weight (N,) -> (..., N) in x's dtype."""
    return _launch(x, None, weight, eps)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., N): residual <- x + residual in place; returns (rmsnorm(residual), residual)."""
    assert residual.shape == x.shape and residual.stride(-1) == 1
    return _launch(x, residual, weight, eps), residual


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    assert x.stride(-1) == 1 and weight.shape == (n,)
    x2d = x.reshape(-1, n)  # a view for the usual contiguous input
    r2d = residual.view(-1, n) if residual is not None else x2d
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        block_n, pdl = triton.next_power_of_2(n), pdl_enabled(x.device, x2d.shape[0])
        _rmsnorm_kernel[(x2d.shape[0],)](
            x2d, r2d, weight, out, x2d.stride(0), r2d.stride(0), out.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, PDL=pdl,
            num_warps=min(16, max(1, block_n // 512)), launch_pdl=pdl,
        )
    return out.view(x.shape)


@jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows,): one row of BLOCK_N >= n columns. With PDL the norm weight is loaded before the wait
    (nanovllm/kernels/pdl.py)."""
    launch_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wait_previous(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
        x = x.to(tl.float32)  # normalize the rounded sum, as the unfused path does
    rstd = rms_rstd(x, n, eps)
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def rms_rstd(x, n, eps):
    """1 / sqrt(mean(x^2) + eps) for an fp32 row x (zero past n). The squares are summed in fp64, where each
    is exact and the sum's relative error (~2^-53) vanishes when the mean is rounded to fp32 (unless it
    lands within that of an fp32 rounding tie): the result does not depend on the reduction order, which
    tl.sum takes from the kernel's layout and warps, so kernels of any shape that fold this norm get the
    same bits as this one."""
    x64 = x.to(tl.float64)
    return tl.rsqrt((tl.sum(x64 * x64, 0) / n).to(tl.float32) + eps)
