"""One-token projections whose whole weight slice is in flight before the PDL wait (Hopper, Gluon).

At batch 1 a decode step is a chain of small kernels, each memory-bound on its weight. Under programmatic
dependent launch (nanovllm/kernels/pdl.py) a kernel's programs may start while the kernel before them
runs, but a register-tiled gemv (fused_attention_output.tiled_gemv_kernel) can only hold one tile a thread
before its wait: the rest of the weight is read after the kernel ahead has finished, so the chain never
keeps HBM busy. Here each program copies its whole slice of W (ROWS rows of K, up to ~200 KB) into shared
memory with the tensor memory accelerator first, then waits for the kernel ahead, then reads x (2-6 KB)
and multiplies from shared memory: the next projection's weights stream while the current kernel and the
attention kernels between them run, as far as shared memory holds them. How many rows a program takes
decides what it leaves free of each SM for the kernels after it, so a batch-1 step's tilings are chosen
by the step's own time (fused_attention_output.tune_in_step), not each kernel's alone.

`staged_gemv_kernel` has the epilogues of the tiled gemv, with its rounding, so either kernel gives what
the unfused path stores: bias, residual add (o_proj, down_proj), a folded RMSNorm of x [+ add] (qkv_proj,
gate_up_proj) and SiLU-and-mul of [gate; up] (gate_up_proj). One row of x (M = 1), 16-bit dtypes; it is
one of the tuner's candidates in fused_attention_output (KernelConfig kernel "staged"). Without Gluon (a
CPU install, an older Triton), or with NANOVLLM_STAGED_GEMV=0, the tuner never offers it.
"""
from __future__ import annotations

import os

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # CPU installs and older Triton: the tuner's other candidates only
    gluon = gl = mbarrier = tma = TensorDescriptor = None

MAX_SMEM_BYTES = 192 * 1024  # W slice plus x row: under the H100's 227 KB, with room for the next kernel


def enabled() -> bool:
    """Whether the tuner may offer the staged gemv: Gluon is there, and NANOVLLM_STAGED_GEMV is not 0 (read
    per call, so a benchmark can compare in one process; the tuning file keeps the two apart)."""
    return gluon is not None and os.environ.get("NANOVLLM_STAGED_GEMV", "1") != "0"


def available(x: torch.Tensor) -> bool:
    """Whether the staged gemv can run for x: Gluon, a Hopper-or-newer CUDA device, a 16-bit dtype."""
    return (gluon is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def smem_bytes(rows: int, box_k: int, k: int) -> int:
    """Shared memory a program of `rows` rows of W (both halves, when gated) takes: W's and the x row."""
    return rows * -(-k // box_k) * box_k * 2 + _next_pow2(k) * 2


def box_k(k: int) -> int:
    """The K width of the TMA boxes for a K-wide W: 256 elements, the most a box takes, or K's power of two."""
    return min(256, max(8, _next_pow2(k)))


def fits(rows: int, num_warps: int, k: int) -> bool:
    """Whether a tiling of `rows` rows a program at num_warps runs for a K-wide W: rows 16-byte aligned for
    TMA (K a multiple of 8), its shared memory under MAX_SMEM_BYTES, a column of the x row a thread."""
    return k % 8 == 0 and smem_bytes(rows, box_k(k), k) <= MAX_SMEM_BYTES and _next_pow2(k) >= 32 * num_warps


def supports(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """The strides the kernel takes: one row of x, out and residual of unit stride (W: as TMA reads it,
    fused_attention_output._tma_ok)."""
    return (x.shape[0] == 1 and x.stride(1) == 1 and out.stride(1) == 1
            and (residual is None or residual.stride(1) == 1))


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None,
           bias: torch.Tensor | None, rows: int, box_k: int, num_warps: int, pdl: bool, launch_pdl: bool,
           norm=None, gated: bool = False, direct: bool = False) -> torch.Tensor:
    """out (1, N) = x (1, K) @ weight^T [+ bias] [+ residual]; norm (fused_attention_output.FoldedNorm):
    of rmsnorm(x [+ norm.add]); gated: weight is [gate; up] (2N, K) and out silu(gate) * up. Each program
    takes `rows` rows of W (of each half when gated) in K boxes of box_k. pdl: the kernel waits for the one
    ahead (griddepcontrol); launch_pdl: it is launched so that it may start early. Checks (`supports`, W's
    alignment) are the caller's."""
    n, k = out.shape[1], x.shape[1]
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    desc = TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1], [rows, box_k], layout)
    has_res, has_bias = residual is not None, bias is not None
    norm_w, add, sum_out, eps = (out, out, out, 0.0) if norm is None else (
        norm.weight, norm.add if norm.add is not None else out, norm.sum_out if norm.add is not None else out,
        norm.eps)
    staged_gemv_kernel[(-(-n // rows),)](
        desc, x, residual if has_res else out, bias if has_bias else out, out, norm_w, add, sum_out, eps, n, k,
        HAS_BIAS=has_bias, HAS_RESIDUAL=has_res, GATED=gated, NORM=norm is not None,
        NORM_ADD=norm is not None and norm.add is not None, PDL=pdl, ROWS=rows, BOX_K=box_k,
        NUM_K=-(-k // box_k), BLOCK_R=_next_pow2(k), WARPS=num_warps, DIRECT=direct, num_warps=num_warps,
        launch_pdl=launch_pdl)
    return out


def _gluon_jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


@_gluon_jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@_gluon_jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@_gluon_jit
def _x_box(x_ptr, add_ptr, sum_ptr, offs, K, NORM_ADD: gl.constexpr, STORE_SUM: gl.constexpr):
    """x at offs, or with NORM_ADD the residual stream x + add rounded (which the first program stores)."""
    x = gl.load(x_ptr + offs, mask=offs < K, other=0.0)
    if NORM_ADD:
        x = (x.to(gl.float32) + gl.load(add_ptr + offs, mask=offs < K, other=0.0).to(gl.float32)).to(x.dtype)
        if STORE_SUM:
            gl.store(sum_ptr + offs, x, mask=offs < gl.where(gl.program_id(0) == 0, K, 0))
    return x


@_gluon_jit
def staged_gemv_kernel(w_desc, x_ptr, res_ptr, bias_ptr, out_ptr, nw_ptr, add_ptr, sum_ptr, eps, N, K,
                       HAS_BIAS: gl.constexpr, HAS_RESIDUAL: gl.constexpr, GATED: gl.constexpr,
                       NORM: gl.constexpr, NORM_ADD: gl.constexpr, PDL: gl.constexpr, ROWS: gl.constexpr,
                       BOX_K: gl.constexpr, NUM_K: gl.constexpr, BLOCK_R: gl.constexpr, WARPS: gl.constexpr,
                       DIRECT: gl.constexpr):
    """Grid (cdiv(N, ROWS),): out[0, pid * ROWS:][:ROWS]. The program's W rows (gated: those of gate, then
    the same of up, N rows below) arrive by TMA in NUM_K boxes of (ROWS, BOX_K), all issued at once on one
    mbarrier before the PDL wait. After it, x (normalized, if NORM) goes to shared memory, so each box meets
    its slice of x with 16-byte shared-memory loads and CUDA-core FMAs; or, DIRECT, each box loads its
    slice of x from global memory itself (no shared-memory round trip or barrier; for the norm, a first
    pass over the slices). Neither is faster everywhere (results/post_wait-h100.json). Either way the
    products are summed over K once at the end where registers allow (results/staged_acc2d-h100.json)."""
    PARTS: gl.constexpr = 2 if GATED else 1
    row0 = gl.program_id(0) * ROWS
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [PARTS * NUM_K, ROWS, BOX_K], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, PARTS * NUM_K * w_desc.block_type.nbytes)
    for p in gl.static_range(PARTS):
        for i in gl.static_range(NUM_K):
            tma.async_copy_global_to_shared(w_desc, [row0 + p * N, i * BOX_K], bar, w_smem.index(p * NUM_K + i))

    # Registers: a (ROWS, BOX_K) box as 16-byte vectors along K, warps over rows.
    TK: gl.constexpr = BOX_K // 8
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TK, TK], [WARPS, 1], [1, 0])
    row_layout: gl.constexpr = gl.SliceLayout(1, layout)
    k_layout: gl.constexpr = gl.SliceLayout(0, layout)
    x_layout: gl.constexpr = gl.BlockedLayout([BLOCK_R // (32 * WARPS)], [32], [WARPS], [0])
    offs_r = row0 + gl.arange(0, ROWS, layout=row_layout)
    offs_x = gl.arange(0, BLOCK_R, layout=x_layout)
    bias = 0.0
    if HAS_BIAS:
        bias = gl.load(bias_ptr + offs_r, mask=offs_r < N, other=0.0).to(gl.float32)
    nw = 0.0
    if NORM and not DIRECT:  # the norm's weight, which no kernel writes: its load is off the chain after the wait
        nw = gl.load(nw_ptr + offs_x, mask=offs_x < K, other=0.0).to(gl.float32)
    if PDL:
        _gdc_launch_dependents()
        _gdc_wait()

    res = 0.0
    if HAS_RESIDUAL:  # after the wait: an earlier kernel's output
        res = gl.load(res_ptr + offs_r, mask=offs_r < N, other=0.0).to(gl.float32)
    if DIRECT:  # x straight from global memory in each box's K layout (every warp reads the same slice: L1)
        rstd = 1.0
        if NORM:  # a first pass for the rms; the second reads the same lines again from L1
            sumsq = gl.sum(gl.zeros([BOX_K], gl.float64, k_layout), 0)
            for i in gl.static_range(NUM_K):
                xk = _x_box(x_ptr, add_ptr, sum_ptr, i * BOX_K + gl.arange(0, BOX_K, layout=k_layout), K, NORM_ADD,
                            True).to(gl.float64)
                sumsq += gl.sum(xk * xk, 0)  # rms_rstd's fp64 sum (add_rmsnorm.py): the same bits in any order
            rstd = gl.rsqrt((sumsq / K).to(gl.float32) + eps)
    else:  # x through shared memory: one load of the row, normalized once
        x = _x_box(x_ptr, add_ptr, sum_ptr, offs_x, K, NORM_ADD, True)
        if NORM:
            xf = x.to(gl.float32)
            x64 = xf.to(gl.float64)  # rms_rstd's sum (add_rmsnorm.py): the same bits in any layout
            rstd = gl.rsqrt((gl.sum(x64 * x64, 0) / K).to(gl.float32) + eps)
            x = (xf * rstd * nw).to(x.dtype)
        x_smem = gl.allocate_shared_memory(x.dtype, [BLOCK_R], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        x_smem.store(x)
        gl.thread_barrier()
    mbarrier.wait(bar, 0)
    # Elementwise products summed over the boxes, then over K once, if that fits 64 registers a thread
    # (a reduction across lanes per box otherwise).
    ACC2D: gl.constexpr = PARTS * ROWS * BOX_K <= 64 * 32 * WARPS
    acc = gl.zeros([ROWS], gl.float32, row_layout)
    acc_up = gl.zeros([ROWS], gl.float32, row_layout)
    acc2 = gl.zeros([ROWS, BOX_K], gl.float32, layout)
    acc2_up = gl.zeros([ROWS, BOX_K], gl.float32, layout)
    for i in gl.static_range(NUM_K):
        if DIRECT:
            offs_k = i * BOX_K + gl.arange(0, BOX_K, layout=k_layout)
            xk = _x_box(x_ptr, add_ptr, sum_ptr, offs_k, K, NORM_ADD, False)
            if NORM:
                xk = (xk.to(gl.float32) * rstd * gl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0).to(gl.float32))
            xk = xk.to(x_ptr.dtype.element_ty).to(gl.float32)[None, :]
        else:
            xk = x_smem.slice(i * BOX_K, BOX_K).load(k_layout).to(gl.float32)[None, :]
        if ACC2D:
            acc2 += w_smem.index(i).load(layout).to(gl.float32) * xk
            if GATED:
                acc2_up += w_smem.index(NUM_K + i).load(layout).to(gl.float32) * xk
        else:
            acc += gl.sum(w_smem.index(i).load(layout).to(gl.float32) * xk, 1)
            if GATED:
                acc_up += gl.sum(w_smem.index(NUM_K + i).load(layout).to(gl.float32) * xk, 1)
    if ACC2D:
        acc = gl.sum(acc2, 1)
        acc_up = gl.sum(acc2_up, 1)
    mbarrier.invalidate(bar)

    # The tiled gemv's epilogue and rounding: the product (with its bias) rounded to out's dtype, then
    # the residual add rounded again; or SiLU-and-mul of the rounded gate and up products.
    dtype: gl.constexpr = out_ptr.dtype.element_ty
    y = (acc + bias).to(dtype).to(gl.float32)
    if GATED:
        up = acc_up.to(dtype).to(gl.float32)
        y = y * (1 / (1 + gl.exp(-y))) * up
    elif HAS_RESIDUAL:
        y += res
    gl.store(out_ptr + offs_r, y.to(dtype), mask=offs_r < N)
