"""The attention output projection fused with the residual add: out = x @ W^T (+ bias) + residual.

x (M, K) is the attention output of M tokens, W (N, K) is o_proj.weight as nn.Linear stores it, residual and
out are (M, N). At decode M is small and the op is memory-bound: W is read from HBM once, x and residual are
read once, out is written once, and no (M, N) intermediate makes a round trip. Two Triton kernels:

- `tiled_gemv_kernel` (M <= 16): a tall-skinny tile of W (BLOCK_N rows) meets all M rows of x at once, so W
  is streamed once whatever M is; many programs (optionally split over K, reduced deterministically by a
  second tiny pass) keep enough bytes in flight to saturate HBM.
- `fused_o_proj_add_residual_kernel` (larger M): a tensor-core GEMM tile with residual and bias added in the
  epilogue, programs grouped so the M tiles that share a W tile run together and W comes from L2.

`fused_o_proj_add_residual` picks the fastest of these configurations and cuBLAS addmm per (shape, dtype,
M bucket), timed once outside CUDA-graph capture and cached; a launch then does no host sync and, given
`out`, no allocation, so it captures in a CUDA graph. out may alias residual (each element is read before
the same program writes it). Without CUDA or Triton it runs `fused_o_proj_add_residual_ref`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use fused_o_proj_add_residual_ref
    triton = tl = None

# The interpreter treats bf16 operands of tl.dot as raw bits: upcast there (on a GPU that would lose the
# bf16 tensor cores).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_WORKSPACE_NUMEL = 1 << 20  # fp32 split-K partials: split_k * M * N must fit (4 MiB per device)


def _jit(**kwargs):
    """triton.jit, or the plain function where Triton is missing (then only the torch path runs)."""
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


def fused_o_proj_add_residual_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                  bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch (fp32 math, one rounding at the end): the CPU path and the test oracle."""
    y = torch.addmm(residual.float(), x.float(), weight.float().t())  # (M, N)
    if bias is not None:
        y += bias.float()
    return y.to(residual.dtype) if out is None else out.copy_(y)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One way to compute the op. kernel: "gemv" (tiled_gemv_kernel), "gemm" (the tensor-core kernel)
    or "cublas" (torch.addmm into out). use_dot: the gemv multiplies on tensor cores (else CUDA cores)."""
    kernel: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 4

    def __str__(self) -> str:
        if self.kernel == "cublas":
            return "cublas"
        dot = "" if self.use_dot else "-fma"
        split = f"-sk{self.split_k}" if self.split_k > 1 else ""
        return (f"{self.kernel}{dot}-{self.block_m}x{self.block_n}x{self.block_k}{split}"
                f"-w{self.num_warps}s{self.num_stages}")


_CUBLAS = KernelConfig("cublas")
_GEMV_CONFIGS = [  # (block_n, block_k, split_k, use_dot, num_warps, num_stages); block_m 16 for dot
    (16, 256, 1, True, 4, 4), (32, 256, 1, True, 4, 4), (16, 512, 1, True, 4, 3), (64, 128, 1, True, 4, 4),
    (16, 256, 2, True, 4, 4), (32, 128, 2, True, 4, 4), (16, 128, 4, True, 4, 4),
    (8, 256, 1, False, 4, 3), (4, 512, 1, False, 4, 3), (16, 256, 1, False, 8, 2),
]
_GEMM_CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4), (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
]


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype) -> list[KernelConfig]:
    """The configurations the tuner times for M tokens (m is a bucket: a power of two)."""
    configs = [_CUBLAS]
    if m <= 16:
        for bn, bk, split, dot, warps, stages in _GEMV_CONFIGS:
            bm = 16 if dot else min(m, 4)  # tl.dot needs 16 rows; the CUDA-core product keeps M small
            if (not dot and m > 4) or split * m * n > _WORKSPACE_NUMEL or (split > 1 and k < split * bk):
                continue
            configs.append(KernelConfig("gemv", bm, bn, bk, split, dot, warps, stages))
    for bm, bn, bk, warps, stages in _GEMM_CONFIGS:
        if m >= 16 and bm <= m and (m // bm <= 8 if m <= 256 else bm >= 64):
            configs.append(KernelConfig("gemm", bm, bn, bk, 1, True, warps, stages))
    if dtype == torch.float32:  # fp32 tiles take twice the bytes: halve K to keep the same shared memory
        configs = [replace(c, block_k=max(32, c.block_k // 2)) for c in configs]
    return configs


def launch(config: KernelConfig, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Runs one configuration (no checks, no tuning): what the dispatcher and the kernel tests call."""
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=residual.dtype, device=residual.device) if out is None else out
    if config.kernel == "cublas":
        torch.addmm(residual, x, weight.t(), out=out)
        return out if bias is None else out.add_(bias)
    args = (x, weight, residual, bias if bias is not None else out, out)
    strides = (*x.stride(), *weight.stride(), *residual.stride(), *out.stride())
    meta = dict(HAS_BIAS=bias is not None, UPCAST=_INTERPRET,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)
    num_m, num_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    if config.kernel == "gemm":
        fused_o_proj_add_residual_kernel[(num_m * num_n,)](*args, m, n, k, *strides, GROUP_M=8, **meta)
        return out
    partials = _workspace(x.device) if config.split_k > 1 else out
    tiled_gemv_kernel[(num_m, num_n, config.split_k)](
        *args, partials, m, n, k, *strides, SPLIT_K=config.split_k, USE_DOT=config.use_dot, **meta)
    if config.split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
            partials, *args[2:], m, n, *strides[4:], SPLIT_K=config.split_k, HAS_BIAS=bias is not None,
            BLOCK_N=block)
    return out


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    # Allocated once and never freed: CUDA graphs captured with it keep its address.
    if device not in _WORKSPACES:
        _WORKSPACES[device] = torch.empty(_WORKSPACE_NUMEL, dtype=torch.float32, device=device)
    return _WORKSPACES[device]


def launch_rmsnorm_fold(config: KernelConfig, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                        norm_weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, normed: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs tiled_gemv_rmsnorm_kernel with a gemv configuration (split_k is ignored: the fold needs whole K)."""
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=residual.dtype, device=x.device) if out is None else out
    normed = torch.empty((m, n), dtype=residual.dtype, device=x.device) if normed is None else normed
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    assert grid[0] <= _counters(x.device).numel() and grid[1] * m <= _WORKSPACE_NUMEL
    tiled_gemv_rmsnorm_kernel[grid](
        x, weight, residual, bias if bias is not None else out, out, norm_weight, normed, _workspace(x.device),
        _counters(x.device), m, n, k, eps, *x.stride(), *weight.stride(), *residual.stride(), *out.stride(),
        *normed.stride(), HAS_BIAS=bias is not None, UPCAST=_INTERPRET,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_DOT=config.use_dot,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NORM_BLOCK=min(1024, triton.next_power_of_2(n)), num_warps=config.num_warps, num_stages=config.num_stages)
    return out, normed


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    # Zeroed once; each fold launch leaves its counters at zero again.
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1024, dtype=torch.int32, device=device)
    return _COUNTERS[device]


_BEST: dict[tuple, KernelConfig] = {}  # (device, dtype, n, k, has_bias, m bucket) -> fastest config
TUNING_LOG: dict[tuple, dict[str, float]] = {}  # same key -> {config: median ms}, for benchmarks and notes
TUNING_ERRORS: dict[str, str] = {}  # config -> why it could not run


def _bucket(m: int) -> int:
    return 1 << (m - 1).bit_length()  # 1, 2, 4, ..., the next power of two


def _tune(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, m: int) -> KernelConfig:
    """Times every candidate on random inputs of M = m rows (L2 flushed between calls) and keeps the fastest
    of those whose output matches the reference."""
    _workspace(device), _counters(device)  # allocated here, never during a capture
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    weight = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).to(dtype)
    residual = torch.randn(m, n, generator=gen, device=device).to(dtype)
    bias = torch.randn(n, generator=gen, device=device).to(dtype) if has_bias else None
    ref = fused_o_proj_add_residual_ref(x, weight, residual, bias).float()
    out = torch.empty_like(residual)
    times = {}
    for config in candidate_configs(m, n, k, dtype):
        try:
            times[config] = triton.testing.do_bench(lambda c=config: launch(c, x, weight, residual, bias, out),
                                                    warmup=5, rep=25, return_mode="median")
            if not (out.float() - ref).norm() <= 1e-2 * ref.norm():  # also catches NaN
                raise ArithmeticError("output differs from the reference")
        except Exception as e:  # e.g. a tile over this card's shared memory: skip it, keep the reason
            times[config] = float("inf")
            TUNING_ERRORS[str(config)] = f"{type(e).__name__}: {e}"[:300]
    best = min(times, key=times.get)
    key = (device, dtype, n, k, has_bias, m)
    _BEST[key], TUNING_LOG[key] = best, {str(c): t for c, t in times.items()}
    return best


def warmup(n: int, k: int, dtype: torch.dtype, device: torch.device | str = "cuda", max_m: int = 256,
           has_bias: bool = False) -> dict[int, KernelConfig]:
    """Tunes every M bucket up to max_m for an (N, K) weight; call before CUDA-graph capture."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buckets = [1 << i for i in range(_bucket(max_m).bit_length())]
    return {m: _BEST.get((device, dtype, n, k, has_bias, m)) or _tune(device, dtype, n, k, has_bias, m)
            for m in buckets}


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (M, K) and weight (N, K); got {tuple(x.shape)} and {tuple(weight.shape)}.")
    shape = (x.shape[0], weight.shape[0])
    for name, t, want in (("residual", residual, shape), ("out", out, shape), ("bias", bias, shape[1:])):
        if t is not None and (tuple(t.shape) != want or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be {want} {x.dtype} on {x.device}; got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}.")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight and x must share a dtype; got {weight.dtype} and {x.dtype}.")


def fused_o_proj_add_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                              bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ weight (N, K)^T + bias (N,) + residual (M, N); returns out.

    Any M >= 1, K, N; bf16, fp16 or fp32; row-strided x, residual and out. Math in fp32, one rounding.
    The first call of an (N, K, dtype, M bucket) outside CUDA-graph capture tunes it (see `warmup`); an
    untuned bucket met during capture runs cuBLAS addmm, which captures too.
    """
    _check(x, weight, residual, bias, out)
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return fused_o_proj_add_residual_ref(x, weight, residual, bias, out)
    if x.shape[0] == 0:
        return residual.new_empty(residual.shape) if out is None else out
    key = (x.device, x.dtype, weight.shape[0], x.shape[1], bias is not None, _bucket(x.shape[0]))
    config = _BEST.get(key)
    if config is None:
        config = _CUBLAS if torch.cuda.is_current_stream_capturing() else _tune(*key)
    return launch(config, x, weight, residual, bias, out)


def fused_o_proj_add_residual_rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                          norm_weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None
                                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, normed): out as fused_o_proj_add_residual_ref; normed = RMSNorm of the rounded out, fp32 math."""
    out = fused_o_proj_add_residual_ref(x, weight, residual, bias)
    h = out.float()
    return out, (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(out.dtype)


def fused_o_proj_add_residual_rmsnorm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                      norm_weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None,
                                      out: torch.Tensor | None = None, normed: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layer's o_proj, residual add and post_attention_layernorm: returns (out, normed), out the
    new residual stream (M, N) and normed = RMSNorm(out) * norm_weight (N,), the input of the MLP.

    One kernel for a tuned bucket of M <= 16 on CUDA (the fastest tuned gemv tiling); otherwise
    fused_o_proj_add_residual followed by the norm in torch.
    """
    _check(x, weight, residual, bias, out)
    times = TUNING_LOG.get((x.device, x.dtype, weight.shape[0], x.shape[1], bias is not None, _bucket(x.shape[0])))
    folds = [c for c in candidate_configs(_bucket(x.shape[0]), weight.shape[0], x.shape[1], x.dtype)
             if c.kernel == "gemv" and c.split_k == 1 and times and str(c) in times]
    if folds and x.is_cuda:
        return launch_rmsnorm_fold(min(folds, key=lambda c: times[str(c)]), x, weight, residual, norm_weight,
                                   eps, bias, out, normed)
    out = fused_o_proj_add_residual(x, weight, residual, bias, out)
    h = out.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return out, (y.to(out.dtype) if normed is None else normed.copy_(y))


@_jit()
def _mma(acc, x, w, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BM, BN) fp32 += x (BM, BK) @ w (BN, BK)^T."""
    if USE_DOT:
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    else:
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # (BM, BN, BK) on CUDA cores
        acc += tl.sum(prod, axis=2)
    return acc


@_jit()
def _add_residual_store(acc, offs_m, offs_n, M, N, res_ptr, bias_ptr, out_ptr, stride_rm, stride_rn,
                        stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = acc + residual (+ bias), cast once to out's dtype; returns what it stored."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
    acc += res.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out, mask=mask)
    return out


@_jit()
def _gemv_acc(x_ptr, w_ptr, offs_m, offs_n, M, N, k_start, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
              USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[offs_m, k_start:k_end] @ W[offs_n, k_start:k_end]^T in fp32: each W tile is loaded once (evict-first:
    nothing reads it again) and applied to all BLOCK_M rows of x."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_start + offs_k)[None, :] * stride_wk  # (BN, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_mask = (k + offs_k < k_end)[None, :]
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & k_mask, other=0.0, eviction_policy="evict_first")
        acc = _mma(acc, x, w, USE_DOT, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@_jit(do_not_specialize=["M"])  # M varies per step: one compile for all M
def tiled_gemv_kernel(x_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, part_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K): a BLOCK_N slice of out for one slice of K.

    With SPLIT_K > 1 the fp32 partials go to part_ptr (SPLIT_K, M, N) for _split_k_reduce_kernel.
    """
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc = _gemv_acc(x_ptr, w_ptr, offs_m, offs_n, M, N, k_start, tl.minimum(k_start + k_per_split, K),
                    stride_xm, stride_xk, stride_wn, stride_wk, USE_DOT, UPCAST, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K)
    if SPLIT_K == 1:
        _add_residual_store(acc, offs_m, offs_n, M, N, res_ptr, bias_ptr, out_ptr, stride_rm, stride_rn,
                            stride_om, stride_on, HAS_BIAS)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@_jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(part_ptr, res_ptr, bias_ptr, out_ptr, M, N, stride_rm, stride_rn, stride_om,
                           stride_on, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK_N)): sums the split-K partials in a fixed order (deterministic, unlike
    atomics), then adds residual and bias as the one-pass kernels do."""
    offs_m = tl.program_id(0) + tl.arange(0, 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n[None, :] < N
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask, other=0.0)
    _add_residual_store(acc, offs_m, offs_n, M, N, res_ptr, bias_ptr, out_ptr, stride_rm, stride_rn,
                        stride_om, stride_on, HAS_BIAS)


@_jit(do_not_specialize=["M"])
def fused_o_proj_add_residual_kernel(x_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, M, N, K,
                                     stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                                     stride_om, stride_on, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): one (BLOCK_M, BLOCK_N) tile of out on tensor cores.

    Programs are ordered in groups of GROUP_M row tiles that walk N together, so the row tiles that share a
    W tile run side by side and all but the first read it from L2.
    """
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_start = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(num_m - group_start, GROUP_M)
    pid_m = group_start + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BN, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = (k + offs_k < K)[None, :]
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & k_mask, other=0.0)
        acc = _mma(acc, x, w, True, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    _add_residual_store(acc, offs_m, offs_n, M, N, res_ptr, bias_ptr, out_ptr, stride_rm, stride_rn,
                        stride_om, stride_on, HAS_BIAS)


@_jit(do_not_specialize=["M"])
def tiled_gemv_rmsnorm_kernel(x_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, norm_ptr, normed_ptr, ss_ptr, count_ptr,
                              M, N, K, eps, stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                              stride_om, stride_on, stride_nm, stride_nn, HAS_BIAS: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              NORM_BLOCK: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): tiled_gemv_kernel, then the RMSNorm of its output rows.

    The norm needs whole rows, which no program holds: each writes its out tile and the tile's sums of
    squares, and the program that finishes a row block last (an atomic counter per block, which it resets)
    reads them back from L2 in a fixed order, so the result is deterministic, and writes normed.
    """
    pid_m, pid_n, num_n = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemv_acc(x_ptr, w_ptr, offs_m, offs_n, M, N, 0, K, stride_xm, stride_xk, stride_wn, stride_wk,
                    USE_DOT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    h = _add_residual_store(acc, offs_m, offs_n, M, N, res_ptr, bias_ptr, out_ptr, stride_rm, stride_rn,
                            stride_om, stride_on, HAS_BIAS).to(tl.float32)  # rounded, as a separate norm reads it
    tl.store(ss_ptr + pid_n * M + offs_m, tl.sum(h * h, axis=1), mask=offs_m < M)
    tl.debug_barrier()  # all threads' stores come before the release of the counter
    if tl.atomic_add(count_ptr + pid_m, 1, sem="acq_rel") == num_n - 1:
        tl.store(count_ptr + pid_m, 0)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(0, num_n):  # .cg: read at L2, where the other programs' stores are
            total += tl.load(ss_ptr + t * M + offs_m, mask=offs_m < M, other=0.0, cache_modifier=".cg")
        rstd = tl.rsqrt(total / N + eps)[:, None]  # (BM, 1)
        for n in range(0, N, NORM_BLOCK):
            offs = n + tl.arange(0, NORM_BLOCK)
            mask = (offs_m[:, None] < M) & (offs[None, :] < N)
            row = tl.load(out_ptr + offs_m[:, None] * stride_om + offs[None, :] * stride_on, mask=mask,
                          other=0.0, cache_modifier=".cg").to(tl.float32)
            g = tl.load(norm_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)[None, :]
            normed = (row * rstd * g).to(normed_ptr.dtype.element_ty)
            tl.store(normed_ptr + offs_m[:, None] * stride_nm + offs[None, :] * stride_nn, normed, mask=mask)
