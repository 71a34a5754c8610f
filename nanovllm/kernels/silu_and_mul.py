"""SiLU-and-mul of a fused gate/up projection: out = silu(x[:, :I]) * x[:, I:], fp32 math inside."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.kernels import jit
from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use silu_and_mul_ref
    triton = tl = None


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (T, 2I) with unit stride on the last dim -> (T, I) in x's dtype."""
    num_tokens, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(-1) == 1
    out = torch.empty(num_tokens, two_i // 2, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(1024, triton.next_power_of_2(two_i // 2))
        grid, pdl = (num_tokens, triton.cdiv(two_i // 2, block)), pdl_enabled(x.device, num_tokens)
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), two_i // 2, BLOCK=block, PDL=pdl,
                                   launch_pdl=pdl)
    return out


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (T, cdiv(I, BLOCK)). With PDL it launches under the gate_up projection's tail; all it reads is
    that projection's output (nanovllm/kernels/pdl.py)."""
    launch_dependents(PDL)
    wait_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
