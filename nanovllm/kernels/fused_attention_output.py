"""The attention output projection fused with the residual add: out = x @ W^T (+ bias) + residual.

x (M, K) is the attention output of M tokens, W (N, K) is o_proj.weight as nn.Linear stores it, residual and
out are (M, N). For M up to a few hundred the op is memory-bound (about M flops per byte of W), so the goal
is to read W from HBM once, read x and residual once, write out once, and never round-trip an (M, N)
product. Two Triton kernels:

- `tiled_gemv_kernel` (small M): a (BLOCK_N, BLOCK_K) tile of W meets all BLOCK_M rows of x at once, so W is
  streamed once whatever M is (at 33-64 rows the tuner may also split them in two row tiles that run side
  by side, the second reading W from L2); small tiles make enough programs to keep HBM busy. The
  epilogue's residual and bias are loaded before the K loop, so their latency hides under it. An optional split over K
  is summed by whichever program of a tile finishes last (a counter tells it), in a fixed order: one
  launch, and deterministic, unlike atomic adds of the partials.
- `fused_o_proj_add_residual_kernel` (larger M): tensor-core GEMM tiles, residual and bias added in the
  epilogue, programs grouped so that row tiles sharing a W tile run together and W comes from L2.

`fused_o_proj_add_residual` runs the fastest of these configurations or cuBLAS (matmul, then add) for its
(N, K, dtype, bias, M bucket), timed once in a CUDA graph outside capture and cached, in memory and in a
file that later processes on the same card and software read instead of timing again. Without a residual it
runs the same configuration and stores the rounded product alone: then `proj + residual` (the add rounded
once more, e.g. in the next RMSNorm kernel) gives the fused call's output bit for bit, which is what makes
greedy decoding identical with the fusion on or off. A launch does no host sync and, given `out`, no
allocation, so it captures in a CUDA graph. out may alias residual (each element is read by the program
that writes it). Without CUDA or Triton it runs `fused_o_proj_add_residual_ref`. On Hopper the tuner also
tries each gemv tiling with programmatic dependent launch (see KernelConfig and nanovllm/kernels/pdl.py;
NANOVLLM_PDL=0 turns it off), as the decode step's other Triton kernels launch with it.

Rounding follows the unfused path, F.linear(x, W, bias) then `+ residual`: the product (with its bias) is
rounded to the output dtype, then the sum is rounded again. One rounding would be more accurate, but greedy
decoding must not change when the fusion is switched on; the extra conversion is free in a memory-bound
kernel.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace

import torch

from nanovllm.kernels import jit, staged_gemv
from nanovllm.kernels.add_rmsnorm import add_rmsnorm, rms_rstd, rmsnorm, rmsnorm_ref
from nanovllm.kernels.pdl import pdl_enabled, pdl_supported  # noqa: F401 (pdl_supported: re-exported)
from nanovllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU installs without Triton use fused_o_proj_add_residual_ref
    triton = tl = TensorDescriptor = None
try:  # griddepcontrol, for programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# The interpreter treats bf16 operands of tl.dot as raw bits: upcast there (on a GPU that would lose the
# bf16 tensor cores).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_WORKSPACE_NUMEL = 1 << 20  # fp32 split-K partials: split_k * M * N must fit (4 MiB per device)
_COUNTERS_NUMEL = 1 << 16  # split-K arrival counters, one per output tile
FOLD_MAX_M = 4  # rmsnorm_project folds the norm for up to this many rows (each program sums every row)


def fused_o_proj_add_residual_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                                  bias: torch.Tensor | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch, fp32 math rounded as the unfused path rounds: round(round(x @ W^T + bias) + residual),
    or round(x @ W^T + bias) without a residual. The CPU path and the test oracle."""
    y = x.float() @ weight.float().t()  # (M, N)
    if bias is not None:
        y += bias.float()
    y = y.to(x.dtype)  # the product as F.linear stores it
    if residual is not None:
        y = (y.float() + residual.float()).to(x.dtype)  # then the add, rounded again
    return y if out is None else out.copy_(y)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One way to compute the op. kernel: "gemv" (tiled_gemv_kernel), "gemm" (the tensor-core kernel), "staged"
    (one row, Hopper: staged_gemv.staged_gemv_kernel, block_n rows of W a program, all of its K in shared
    memory in boxes of block_k; num_stages 1 reads x through shared memory, 2 straight from global memory, its
    DIRECT) or "cublas" (the unfused path itself: cuBLAS matmul into out, then an in-place add). use_dot: the
    gemv multiplies on tensor cores, else on CUDA cores. tma: the gemv loads W tiles with the tensor memory
    accelerator (one bulk copy per tile) instead of per-thread loads. pdl: the gemv is launched with
    programmatic dependent launch (Hopper): it may start while the kernel before it finishes, loads its first
    W tile (W depends on no earlier kernel), and only then waits for that kernel (griddepcontrol.wait) before
    it reads x or the residual or writes anything. swap: the tensor-core gemv computes out^T = W x^T, so the W
    tile is the MMA's wide first operand (Hopper's wgmma wants 64 rows there) and the few rows of x its narrow
    second one."""
    kernel: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 4
    tma: bool = False
    pdl: bool = False
    swap: bool = False

    def __str__(self) -> str:
        if self.kernel == "cublas":
            return "cublas"
        dot = ("" if self.use_dot else "-fma") + ("-tma" if self.tma else "") + ("-swap" if self.swap else "")
        split = f"-sk{self.split_k}" if self.split_k > 1 else ""
        return (f"{self.kernel}{dot}-{self.block_m}x{self.block_n}x{self.block_k}{split}"
                f"-w{self.num_warps}s{self.num_stages}{'-pdl' if self.pdl else ''}")


_CUBLAS = KernelConfig("cublas")
# The gemv tilings below were each within 3 % of the fastest for some shape and M bucket on the H100
# (benchmarks/NOTES-fused.md, run 3 and session 5); those that never were are gone, to keep tuning short.
_FMA_CONFIGS = [  # CUDA cores, M <= 16: (block_n, block_k, num_warps, num_stages, tma); many small programs
    (1, 1024, 4, 1, False), (2, 1024, 4, 1, False), (2, 512, 4, 2, False), (4, 512, 4, 1, False),
    (4, 512, 4, 3, False), (2, 2048, 4, 1, False), (1, 2048, 4, 1, False), (2, 1024, 4, 2, False),
    (1, 4096, 8, 1, False), (2, 4096, 8, 1, False), (4, 2048, 8, 1, False), (4, 1024, 8, 2, False),
    (8, 1024, 8, 1, False),
]
# Tensor cores, M <= 64 in one row tile: (block_n, block_k, split_k, num_warps, num_stages, tma).
_DOT_GEMV_CONFIGS = [
    (16, 256, 1, 4, 4, False), (16, 128, 1, 4, 6, False), (32, 256, 1, 4, 4, False),
    (16, 256, 2, 4, 4, False), (16, 128, 4, 4, 4, False), (32, 128, 2, 4, 4, False),
    (64, 64, 4, 4, 4, False), (16, 256, 1, 2, 4, False), (16, 128, 1, 2, 6, False),
    (64, 128, 4, 8, 3, False), (32, 256, 1, 8, 3, False),
    (16, 256, 1, 4, 4, True), (32, 256, 1, 4, 4, True), (64, 128, 2, 4, 4, True), (16, 256, 1, 2, 4, True),
    (32, 256, 1, 2, 4, True),
    # Split-K in one launch (since the last program sums the partials): more programs for small N.
    (16, 256, 2, 2, 4, True), (32, 128, 4, 4, 4, False), (32, 256, 2, 4, 3, True),
]
# Tensor cores, M = 33..64 in two row tiles of 32: twice the programs of one 64-row tile. The two programs
# of a W tile are neighbours in the grid and run side by side, so the second mostly finds the tile in L2
# (won 896² and 2048² at M = 64 on the H100): (block_n, block_k, split_k, num_warps, num_stages, tma).
_ROW_SPLIT_CONFIGS = [(32, 256, 1, 4, 3, True), (32, 256, 1, 4, 4, True), (64, 256, 1, 4, 3, True)]
# Tensor cores with W as the MMA's first operand (KernelConfig.swap), M <= 64; as _DOT_GEMV_CONFIGS.
_SWAP_GEMV_CONFIGS = [
    (64, 128, 2, 4, 4, True), (64, 128, 4, 4, 4, True), (64, 256, 2, 4, 3, True), (64, 128, 4, 4, 4, False),
    (64, 256, 4, 4, 3, False), (64, 128, 2, 4, 8, True),
]
# staged_gemv at one row, with PDL: (block_n, num_warps), each with x through shared memory and direct
# (num_stages 1 and 2); K boxes of 256 (or K's next power of two). (4, 4) and (8, 8) give each warp one row,
# so it sums over K alone, with no reduction across warps: in the batch-1 step o_proj and down_proj take
# (8, 8) (results/staged_row_per_warp-h100.json).
_STAGED_CONFIGS = [(4, 4), (8, 4), (16, 4), (32, 4), (64, 4), (8, 8), (16, 8), (32, 8), (64, 8)]
_GEMM_CONFIGS = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
]


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype, pdl: bool = False) -> list[KernelConfig]:
    """The configurations the tuner times for M tokens (m is a bucket: a power of two). pdl: the device
    has programmatic dependent launch (Hopper or newer); every gemv tiling is then also tried with it."""
    def fits(bm: int, bn: int, bk: int, split: int) -> bool:  # a K tile for every split, and the workspace
        return k >= split * bk and (split == 1 or (split * bm * n <= _WORKSPACE_NUMEL
                                                   and -(-n // bn) <= _COUNTERS_NUMEL))

    configs = [_CUBLAS]
    for bn, bk, warps, stages, tma in _FMA_CONFIGS if m <= 16 else []:
        if m * bn * bk <= 64 * 32 * warps:  # the (M, BN, BK) fp32 products: at most 64 registers a thread
            configs.append(KernelConfig("gemv", m, bn, bk, 1, False, warps, stages, tma))
    for bn, bk, split, warps, stages, tma in _DOT_GEMV_CONFIGS if m <= 64 else []:
        bm = max(16, m)  # tl.dot needs 16 rows
        if (bn >= bm // 2 or m <= 16) and fits(bm, bn, bk, split):
            configs.append(KernelConfig("gemv", bm, bn, bk, split, True, warps, stages, tma))
    for bn, bk, split, warps, stages, tma in _ROW_SPLIT_CONFIGS if m == 64 else []:
        if fits(32, bn, bk, split):
            configs.append(KernelConfig("gemv", 32, bn, bk, split, True, warps, stages, tma))
    for bn, bk, split, warps, stages, tma in _SWAP_GEMV_CONFIGS if m <= 64 else []:
        bm = max(16, m)
        if fits(bm, bn, bk, split):
            configs.append(KernelConfig("gemv", bm, bn, bk, split, True, warps, stages, tma, swap=True))
    if pdl:
        configs += [replace(c, pdl=True) for c in configs if c.kernel == "gemv"]
    if pdl and m == 1 and dtype != torch.float32 and staged_gemv.enabled() and not _INTERPRET:
        configs += [KernelConfig("staged", 1, bn, staged_gemv.box_k(k), 1, False, warps, variant, pdl=True)
                    for bn, warps in _STAGED_CONFIGS if staged_gemv.fits(bn, warps, k) for variant in (1, 2)]
    for bm, bn, bk, warps, stages in _GEMM_CONFIGS if m >= 32 else []:
        if bm <= m and (m // bm <= 8 if m <= 256 else bm >= 64):
            configs.append(KernelConfig("gemm", bm, bn, bk, 1, True, warps, stages))
    if dtype == torch.float32:  # fp32 tiles take twice the bytes: halve K to keep the same footprint
        configs = [replace(c, block_k=max(32, c.block_k // 2)) for c in configs]
    return configs


@dataclass(frozen=True, slots=True)
class FoldedNorm:
    """An RMSNorm folded into a gemv's load of x (one row): the gemv multiplies rmsnorm(x + add) instead of
    x, as `_rmsnorm_kernel` would have stored it. add: the residual of an add + norm (None: the norm
    alone); its rounded sum with x, the new residual stream, goes to `sum_out`."""
    weight: torch.Tensor
    eps: float
    add: torch.Tensor | None = None
    sum_out: torch.Tensor | None = None


def launch(config: KernelConfig, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
           norm: FoldedNorm | None = None, gated: bool = False) -> torch.Tensor:
    """Runs one configuration (no checks, no tuning): what the dispatcher and the kernel tests call.
    Without a residual it stores the rounded product that the same configuration adds the residual to.
    With `norm` (a gemv of up to FOLD_MAX_M rows of unit stride, norm.add and norm.sum_out at x's strides;
    the staged gemv: one row) it projects rmsnorm(x [+ norm.add]).
    With `gated` (a gemv without split-K, bias or residual, block_n even) weight is a gate_up_proj's
    [gate; up] (2I, K) and out (M, I) = silu(gate) * up of the rounded product, as SiLU-and-mul stores it."""
    (m, k), n = x.shape, weight.shape[0] // (2 if gated else 1)  # n: out's columns
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if config.kernel == "cublas":  # what F.linear then `+ residual` run (not addmm: that rounds once)
        if residual is not None and out.data_ptr() == residual.data_ptr():  # the product must not overwrite it
            return out.add_(torch.nn.functional.linear(x, weight, bias))
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)  # F.linear's own call for 2-D x
        return out if residual is None else out.add_(residual)
    has_residual = residual is not None
    residual = residual if has_residual else out  # never read: a valid pointer for the argument
    args = (x, weight, residual, bias if bias is not None else out, out)
    strides = (*x.stride(), *weight.stride(), *residual.stride(), *out.stride())
    meta = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=has_residual, INTERPRET=_INTERPRET,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)
    num_m, num_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n // (2 if gated else 1))
    if config.kernel == "gemm":
        fused_o_proj_add_residual_kernel[(num_m * num_n,)](*args, m, n, k, *strides, GROUP_M=8, **meta)
        return out
    assert not gated or (_gates(config, bias) and not has_residual)
    if config.kernel == "staged":
        residual = residual if has_residual else None
        if not (staged_gemv.supports(x, out, residual) and _tma_ok(weight)):
            assert norm is None and not gated, "a folded norm or gate needs unit strides"
            return launch(_CUBLAS, x, weight, residual, bias, out)
        return staged_gemv.launch(x, weight, out, residual, bias, config.block_n // (2 if gated else 1),
                                  config.block_k, config.num_warps, config.pdl, pdl_enabled(x.device, 1), norm,
                                  gated, config.num_stages == 2)
    if config.tma and _tma_ok(weight) and not gated:  # W as a descriptor: the kernel then loads it with TMA
        args = (x, TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [config.block_n, config.block_k]),
                *args[2:])
    partials, counters = _workspace(x.device) if config.split_k > 1 else (out, out)
    assert config.split_k == 1 or num_m * num_n <= counters.numel(), "more output tiles than split-K counters"
    pdl = config.pdl and pdl_enabled(x.device, x.shape[0])  # not in the interpreter: it has no griddepcontrol
    norm_args = _norm_args(norm, x, out)
    tiled_gemv_kernel[(num_m, num_n, config.split_k)](
        *args, partials, counters, *norm_args, m, n, k, *strides, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, SWAP_AB=config.swap, W_TMA=config.tma and _tma_ok(weight) and not gated,
        PDL=config.pdl, GATED=gated,
        NORM=norm is not None, NORM_ADD=norm is not None and norm.add is not None,
        BLOCK_R=triton.next_power_of_2(k) if norm else 1, launch_pdl=pdl, **meta)
    return out


def _gates(config: KernelConfig, bias: torch.Tensor | None) -> bool:
    """Whether this gemv tiling can do SiLU-and-mul in its epilogue (launch's `gated`): whole gate/up row
    pairs in one pass (no split over K, an even block_n), and no bias."""
    return config.split_k == 1 and config.block_n % 2 == 0 and bias is None


def _norm_args(norm: FoldedNorm | None, x: torch.Tensor, out: torch.Tensor) -> tuple:
    """(norm weight, add, sum_out, eps) for tiled_gemv_kernel; unused pointers get `out`, never read."""
    if norm is None:
        return out, out, out, 0.0
    assert x.stride(1) == 1, "a folded norm needs rows of unit stride"
    if norm.add is None:
        return norm.weight, out, out, norm.eps
    # The kernel reads add and writes sum_out at x's offsets.
    assert norm.add.stride() == x.stride() and norm.sum_out is not None and norm.sum_out.stride() == x.stride()
    return norm.weight, norm.add, norm.sum_out, norm.eps


def _tma_ok(weight: torch.Tensor) -> bool:
    # TMA reads rows of contiguous elements that start on 16-byte boundaries.
    return (weight.stride(1) == 1 and weight.stride(0) * weight.element_size() % 16 == 0
            and weight.data_ptr() % 16 == 0)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's fp32 partials and its per-tile arrival counters (zero between launches: the last program
    of a tile resets its own). Allocated at tuning time and never freed: CUDA graphs captured with them
    keep their addresses. Launches share them safely because a launch touches them only after the kernel
    before it has finished (program order, or griddepcontrol.wait under PDL)."""
    if device not in _WORKSPACES:
        _WORKSPACES[device] = (torch.empty(_WORKSPACE_NUMEL, dtype=torch.float32, device=device),
                               torch.zeros(_COUNTERS_NUMEL, dtype=torch.int32, device=device))
    return _WORKSPACES[device]


# (device, dtype, n, k, has_bias, m bucket, pdl, fused) -> fastest config. pdl: PDL candidates were allowed
# (pdl_enabled), so NANOVLLM_PDL=0 picks among the others even after a tuning with them. fused: timed with a
# residual, for fused_o_proj_add_residual, whose projection alone (residual=None) must run the configuration
# of its fused call (so the key has no residual); else timed without, for `project`.
_BEST: dict[tuple, KernelConfig] = {}


def tuning_key(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, m: int,
               fused: bool) -> tuple:
    """_BEST's key for the M bucket m: PDL candidates count where steps of m tokens launch with PDL."""
    return (device, dtype, n, k, has_bias, m, pdl_enabled(device, m), fused)


def _best(key: tuple) -> KernelConfig | None:
    """The tuned configuration for key, timing it first if needed, except during a CUDA-graph capture
    (where nothing may be timed: None)."""
    config = _BEST.get(key)
    if config is None and not torch.cuda.is_current_stream_capturing():
        config = _tune(*key)
    return config


_TUNING_VERSION = 4  # bump when the candidate tilings or the kernels change: older choices are then ignored
TUNING_LOG: dict[tuple, dict[str, float]] = {}  # same key -> {config: µs per call}, for benchmarks and notes
TUNING_ERRORS: dict[str, str] = {}  # config -> why it could not run


def _bucket(m: int) -> int:
    return 1 << (m - 1).bit_length()  # 1, 2, 4, ..., the next power of two


def time_in_graph(fn, slots: int, calls: int = 32, replays: int = 5) -> float:
    """Median µs per call of fn(slot), replayed in a CUDA graph that cycles through the slots: what a
    captured decode step sees (one launch after another, weights not in L2)."""
    calls = slots * math.ceil(calls / slots)
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)  # compiles, and creates the cuBLAS handle, outside the capture
        graph.capture_begin()  # not torch.cuda.graph(): its gc.collect() per call would dominate tuning
        try:
            for c in range(calls):
                fn(c % slots)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays + 1):  # the first replay warms up
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times[1:])


def _tuning_file() -> str | None:
    """Where tuning choices persist across processes, so an engine starts without re-timing and every
    process of a machine runs the same configurations: $NANOVLLM_CACHE_DIR (default ~/.cache/nanovllm);
    an empty value keeps them in memory only (the benchmark does: it reports the timings)."""
    root = os.environ.get("NANOVLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))
    return os.path.join(root, "fused_o_proj_tuning.json") if root else None


def _disk_key(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, m: int,
              pdl: bool, fused: bool) -> str:
    """The choice depends on the card and the software that compiled and timed it, not on a device index."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    versions = (_TUNING_VERSION, torch.__version__, triton.__version__ if triton else None, pdl,
                *(["staged"] if pdl and m == 1 and staged_gemv.enabled() else []))
    return json.dumps([card, *versions, str(dtype), n, k, has_bias, m, *([] if fused else ["projection"])])


def _read_tuning(path: str) -> dict[str, dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: tune again
        return {}


def _remember(entry: str, value: dict) -> None:
    """Adds one entry (a choice, or tune_in_step's joint choices) to the tuning file: read, update, then an
    atomic rename, so processes tuning at the same time (tensor-parallel ranks) lose at most each other's
    newest entries, never the file."""
    path = _tuning_file()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        table = _read_tuning(path)
        table[entry] = value
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=0)
        os.replace(tmp, path)
    except OSError:  # a read-only home: tuning still works, per process
        pass


def _recalled(disk_key: str) -> KernelConfig | None:
    path = _tuning_file()
    entry = _read_tuning(path).get(disk_key) if path else None
    try:
        return KernelConfig(**entry) if entry else None
    except TypeError:  # written by another version of KernelConfig
        return None


def _tune(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, m: int, pdl: bool,
          fused: bool = True) -> KernelConfig:
    """The configuration for this key: the one an earlier process chose on this card (the tuning file), or
    else the fastest of the candidates, timed now (`_time_candidates`) and remembered."""
    key = (device, dtype, n, k, has_bias, m, pdl, fused)
    disk_key = _disk_key(*key)
    best = _recalled(disk_key)
    if best is None:
        best = _time_candidates(*key)
        _remember(disk_key, asdict(best))
    _BEST[key] = best
    return best


def _time_candidates(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, m: int,
                     pdl: bool, fused: bool = True) -> KernelConfig:
    """Times every candidate in a CUDA graph on random inputs of M = m rows, rotated over enough copies to
    miss L2, and keeps the fastest of those whose output matches the reference. Not fused: without a
    residual (then the cuBLAS candidate is the matmul alone)."""
    _workspace(device)  # allocated here, never during a capture
    gen = torch.Generator(device).manual_seed(0)
    # Enough copies of the inputs to overflow L2 2.5 times, which also caps the memory a large M takes.
    slot_bytes = (n * k + m * k + 2 * m * n) * dtype.itemsize
    slots = min(64, math.ceil(2.5 * torch.cuda.get_device_properties(device).L2_cache_size / slot_bytes))

    def rand(*shape, scale=1.0):
        return [(torch.randn(*shape, generator=gen, device=device) * scale).to(dtype) for _ in range(slots)]
    xs, ws, res, outs = rand(m, k), rand(n, k, scale=k**-0.5), rand(m, n) if fused else [None] * slots, rand(m, n)
    bias = torch.randn(n, generator=gen, device=device).to(dtype) if has_bias else None
    ref = fused_o_proj_add_residual_ref(xs[0], ws[0], res[0], bias).float()
    times = {}
    for config in candidate_configs(m, n, k, dtype, pdl=pdl):
        try:
            times[config] = time_in_graph(lambda i, c=config: launch(c, xs[i], ws[i], res[i], bias, outs[i]),
                                           slots, calls=64, replays=7)
            if not (outs[0].float() - ref).norm() <= 1e-2 * ref.norm():  # also catches NaN
                raise ArithmeticError("output differs from the reference")
        except Exception as e:  # e.g. a tile over this card's shared memory: skip it, keep the reason
            times[config] = float("inf")
            TUNING_ERRORS[str(config)] = f"{type(e).__name__}: {e}"[:300]
    best = min(times, key=times.get)
    TUNING_LOG[(device, dtype, n, k, has_bias, m, pdl, fused)] = {str(c): t for c, t in times.items()}
    return best


def in_step_candidates(key: tuple) -> list[KernelConfig]:
    """What in-step tuning tries for a key: its current choice, every staged tiling (one row) and the two
    fastest tiled gemvs alone (where this process timed them), all with PDL."""
    device, dtype, n, k, has_bias, m, pdl, fused = key
    configs = {str(c): c for c in candidate_configs(m, n, k, dtype, pdl=True) if c.pdl}
    alone = sorted((t, name) for name, t in TUNING_LOG.get(key, {}).items()
                   if name in configs and configs[name].kernel == "gemv" and math.isfinite(t))
    chosen = [_BEST[key], *(c for c in configs.values() if c.kernel == "staged"),
              *(configs[name] for _, name in alone[:2])]
    return list(dict.fromkeys(chosen))  # in order, once each


# tune_in_step's joint choices by their tuning-file entry: every engine of a process runs the same ones for
# the same keys, file or not (with fused output on and off the keys are the same, and so must the bits be).
_IN_STEP: dict[str, dict] = {}
_STEP_VERSION = 3  # bump when the step's other kernels change (e.g. their launch): the joint choices are retuned


def tune_in_step(device: torch.device, step_us, top: int = 4, m: int = 1) -> dict[tuple, KernelConfig]:
    """Tunes the projections that a decode step of m seqs launches with PDL (every tuned key of M = m with
    PDL on `device`) by the step's own time, `step_us()` (the caller captures and replays the step with
    the current choices). Alone, a tiling is timed after itself; in the step it runs after other
    kernels, and what it leaves free of each SM (registers, shared memory) decides whether the next
    kernels can start early and load their weights: the fastest alone is often not the fastest there
    (benchmarks/results/tune_in_step-h100-combos*.json). Each key in turn tries its `in_step_candidates`
    with the others fixed, then a second round its `top` best of the first; the choices are remembered
    together, for this set of keys, in memory and in the tuning file, so a later engine or process
    recalls them without timing."""
    if device.type == "cuda" and device.index is None:  # as warmup keys them
        device = torch.device("cuda", torch.cuda.current_device())
    keys = sorted((k for k in _BEST if k[0] == device and k[5] == m and k[6]), key=str)
    if not keys:
        return {}
    entry = json.dumps(["in_step", _STEP_VERSION, *[_disk_key(*k) for k in keys]])
    path = _tuning_file()
    recalled = _IN_STEP.get(entry) or (_read_tuning(path).get(entry) if path else None)
    if recalled:
        try:
            choices = {k: KernelConfig(**recalled["choices"][i]) for i, k in enumerate(keys)}
            _BEST.update(choices)
            return choices
        except (TypeError, IndexError, KeyError):  # written by another version: tune again
            pass
    rounds = {k: in_step_candidates(k) for k in keys}
    first_us = best_us = step_us()
    for _ in range(2):
        for key in keys:
            timed = []
            for config in rounds[key]:
                _BEST[key] = config
                try:
                    timed.append((step_us(), config))
                except Exception as e:  # e.g. over this card's shared memory beside its neighbours
                    TUNING_ERRORS[f"in step: {config}"] = f"{type(e).__name__}: {e}"[:300]
            timed.sort(key=lambda pair: pair[0])
            best_us, _BEST[key] = timed[0]
            rounds[key] = [c for _, c in timed[:top]]
    choices = {k: _BEST[k] for k in keys}
    _IN_STEP[entry] = {"choices": [asdict(choices[k]) for k in keys],
                       "step_us": {"alone_choices": first_us, "in_step_choices": best_us}}
    _remember(entry, _IN_STEP[entry])
    return choices


def warmup(n: int, k: int, dtype: torch.dtype, device: torch.device | str = "cuda", max_m: int = 256,
           has_bias: bool = False, fused: bool = True) -> dict[int, KernelConfig]:
    """Tunes every M bucket up to max_m for an (N, K) weight, for fused_o_proj_add_residual (fused) or
    for `project`; call it before CUDA-graph capture."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buckets = [1 << i for i in range(_bucket(max_m).bit_length())]
    return {m: _best(tuning_key(device, dtype, n, k, has_bias, m, fused)) for m in buckets}


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None,
           out: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (M, K) and weight (N, K); got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}.")
    shape = (x.shape[0], weight.shape[0])
    for name, t, want in (("residual", residual, shape), ("out", out, shape), ("bias", bias, shape[1:])):
        if t is not None and (tuple(t.shape) != want or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be {want} {x.dtype} on {x.device}; got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}.")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight and x must share a dtype; got {weight.dtype} and {x.dtype}.")


def fused_o_proj_add_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ weight (N, K)^T + bias (N,) + residual (M, N); returns out.

    Any M >= 1, K, N; bf16, fp16 or fp32; row-strided x, residual and out. Math in fp32, rounded as the
    unfused path rounds (the product, then the sum). The first call of an (N, K, dtype, M bucket) outside
    CUDA-graph capture tunes it (see `warmup`); an untuned bucket met during capture runs cuBLAS matmul +
    add, which captures too.

    With residual None it returns the rounded product alone, from the configuration the call with a
    residual uses (the tuning key ignores the residual; tuning always runs with one), so
    `round(proj + residual)` equals the fused output bit for bit.
    """
    return _dispatch(x, weight, residual, bias, out, fused=True)


def runs_own_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether fused_o_proj_add_residual(x, weight, residual, bias) runs one of this module's kernels, the
    add inside, rather than cuBLAS then a separate add (tuned faster at this many tokens, or untuned during
    a CUDA-graph capture, or no CUDA)."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    key = tuning_key(x.device, x.dtype, weight.shape[0], x.shape[1], bias is not None, _bucket(x.shape[0]), True)
    config = _best(key)
    return config is not None and config.kernel != "cublas"


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ weight (N, K)^T + bias (N,), rounded once, as F.linear: the fastest of cuBLAS
    (F.linear's own call) and the gemv tilings, tuned for a projection alone (no residual), so it never
    loses to cuBLAS by more than the tuner's noise. For the column-parallel projections of a decode step
    (qkv_proj, gate_up_proj): a gemv launched with PDL streams its first W tile while the kernel before it
    finishes, and lets the kernel after it launch early, which a cuBLAS kernel does not."""
    return _dispatch(x, weight, None, bias, out, fused=False)


def rmsnorm_project_ref(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                        gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (rmsnorm(s) @ W^T + b, s) with s = x + residual rounded (x without a residual), each step
    rounded as the Triton RMSNorm and `project` round it; gated: SiLU-and-mul of that. The CPU path and the
    test oracle."""
    stream = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    y = fused_o_proj_add_residual_ref(rmsnorm_ref(stream, norm_weight, eps), weight, None, bias)
    return (silu_and_mul_ref(y) if gated else y), stream


def rmsnorm_project(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(project(rmsnorm(s)), s), s the residual stream: x + residual (rounded), or x without a residual;
    gated (weight a gate_up_proj's [gate; up]): (silu_and_mul(project(rmsnorm(s))), s).

    The RMSNorm before qkv_proj and gate_up_proj, folded into the projection for up to FOLD_MAX_M tokens:
    every program of `project`'s gemv computes its rows' rms itself (a few KB each from L2) and normalizes x
    as it loads it, rounded to x's dtype as the RMSNorm kernel stores it, so the product is the
    unfolded kernels' bit for bit, and the decode step has one kernel (and one launch) fewer per norm.
    Gated, the gemv's epilogue also does SiLU-and-mul (one kernel fewer again, for the MLP), as that kernel
    would have stored it.
    With a residual the fold writes s to a new tensor (other programs still read residual); where it does
    not apply (more rows, no CUDA, cuBLAS tuned fastest), add_rmsnorm updates residual in place, as
    RMSNorm does. Either way, use the returned s.
    """
    _check(x, weight, None, bias, None)
    for name, t, want in (("residual", residual, tuple(x.shape)), ("norm_weight", norm_weight, tuple(x.shape[1:]))):
        if t is not None and (tuple(t.shape) != want or t.device != x.device):
            raise ValueError(f"{name} must be {want} on {x.device}; got {tuple(t.shape)} on {t.device}.")
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return rmsnorm_project_ref(x, norm_weight, eps, weight, bias, residual, gated)
    config = _fold_config(x, weight, bias) if x.shape[0] <= FOLD_MAX_M and x.is_contiguous() else None
    if gated and config is not None and not _gates(config, bias):
        config = None
    if config is None or (residual is not None and not residual.is_contiguous()):
        if residual is None:
            stream, y = x, project(rmsnorm(x, norm_weight, eps), weight, bias)
        else:
            normed, stream = add_rmsnorm(x, residual, norm_weight, eps)
            y = project(normed, weight, bias)
        return (silu_and_mul(y) if gated else y), stream
    stream = x if residual is None else torch.empty_like(x)
    norm = FoldedNorm(norm_weight, eps, residual, stream)
    return launch(config, x, weight, None, bias, norm=norm, gated=gated), stream


def _fold_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> KernelConfig | None:
    """`project`'s configuration for x's rows, if it is a gemv or the staged gemv (the norm folds into its x
    load): the same choice whether the decoder layer adds the residual first (fused output off) or not (on)."""
    config = _best(tuning_key(x.device, x.dtype, weight.shape[0], x.shape[1], bias is not None,
                              _bucket(x.shape[0]), False))
    return config if config is not None and config.kernel in ("gemv", "staged") else None


def _dispatch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None,
              out: torch.Tensor | None, fused: bool) -> torch.Tensor:
    _check(x, weight, residual, bias, out)
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return fused_o_proj_add_residual_ref(x, weight, residual, bias, out)
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0])) if out is None else out
    key = tuning_key(x.device, x.dtype, weight.shape[0], x.shape[1], bias is not None, _bucket(x.shape[0]), fused)
    return launch(_best(key) or _CUBLAS, x, weight, residual, bias, out)  # untuned during a capture: cuBLAS


@jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to the nearest dtype value, ties to even, as torch and the GPU round. The
    interpreter truncates fp32 to bf16 instead; there the rounding is done on the bits (a bf16 is the top
    half of an fp32), so the CPU tests see the GPU's numbers."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)  # exact in bf16 now: the cast below truncates nothing
    return x.to(dtype)


@jit
def _epilogue_inputs(offs_m, offs_n, M, N, res_ptr, bias_ptr, stride_rm, stride_rn, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    """The residual tile and bias slice that _add_residual_store adds, fp32 (0.0 where absent). Loaded
    before the K loop, so their HBM round trip hides under it instead of lengthening every program's tail:
    in a small-M kernel of a few microseconds that round trip is a tenth of the time."""
    bias, res = 0.0, 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                      other=0.0).to(tl.float32)
    return res, bias


@jit
def _add_residual_store(acc, res, bias, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr):
    """out[offs_m, offs_n] = round(round(acc + bias) + residual) (res, bias from _epilogue_inputs),
    rounding to out's dtype as the unfused F.linear(x, W, bias) + residual does, so that fusing changes no
    bit (the product aside). Without a residual: round(acc + bias), the very intermediate the residual
    would be added to."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:  # inside the GEMM epilogue, as cuBLAS adds it, before the product is rounded
        acc += bias
    acc = _round(acc, out_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # no-op for fp32
    if HAS_RESIDUAL:
        acc += res
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@jit
def _silu_and_mul_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, INTERPRET: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) holds the gate products of columns offs_n (BLOCK_N // 2 of them), then their up
    products: out[offs_m, offs_n] = silu(gate) * up, each product rounded to out's dtype first (as
    gate_up_proj stores it), then the SiLU-and-mul kernel's fp32 math and rounding, bit for bit."""
    acc = _round(acc, out_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    y = gate * tl.sigmoid(gate) * up
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             _round(y, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@jit
def _x_tile(x_ptr, add_ptr, offs_m, offs_k, k, k_end, M, stride_xm, stride_xk, NORM_ADD: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) tile of x at column k, zero past M and k_end; with NORM_ADD, of x + add
    rounded, as the add + norm kernel stores the residual stream."""
    mask = (offs_m[:, None] < M) & (k + offs_k < k_end)[None, :]
    offs = offs_m[:, None] * stride_xm + (k + offs_k)[None, :] * stride_xk
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if NORM_ADD:
        x = (x.to(tl.float32) + tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@jit
def _norm_weight_tile(nw_ptr, offs_k, k, k_end):
    """The (BLOCK_K,) slice of the folded norm's weight at column k, fp32 (a weight: loadable before the
    PDL wait)."""
    return tl.load(nw_ptr + k + offs_k, mask=k + offs_k < k_end, other=0.0).to(tl.float32)


@jit
def _normalize(x, nw, rstd):
    """rmsnorm of an x tile as _rmsnorm_kernel computes it (x * rstd * weight in fp32, rounded to x's
    dtype; rstd one per row), so the gemv multiplies the very values that kernel would have stored."""
    return (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x.dtype)


@jit
def _rows_rstd(x_ptr, add_ptr, sum_ptr, offs_m, M, stride_xm, K, eps, NORM_ADD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """1 / rms of each of the tile's rows of x (+ add), as _rmsnorm_kernel computes it (rms_rstd: the same
    bits whatever this kernel's warps); a row past M reads zeros (its products are never stored). Every
    program computes them (a few rows of a few thousand: a few KB from L2), a row at a time so a row is all
    a thread holds; with NORM_ADD the first program of the row tile also stores the rounded sums, the new
    residual stream, to sum_ptr (x's strides)."""
    offs = tl.arange(0, BLOCK_R)
    first = tl.program_id(1) + tl.program_id(2) == 0
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in tl.static_range(BLOCK_M):
        row = tl.program_id(0) * BLOCK_M + i
        mask = offs < tl.where(row < M, K, 0)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM_ADD:
            x += tl.load(add_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_xm + offs, x, mask=offs < tl.where(first & (row < M), K, 0))
            x = x.to(tl.float32)
        rstd = tl.where(offs_m == row, rms_rstd(x, K, eps), rstd)
    return rstd


@jit
def _w_tile(w_ptr, offs_n, offs_k, k, k_end, N, stride_wn, stride_wk, W_TMA: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) tile of W at column k, zero past N and k_end; evict-first, as nothing reads
    it again. With W_TMA, w_ptr is a descriptor and k_end a multiple of the tile (or K, zero-filled)."""
    if W_TMA:
        w = w_ptr.load([tl.program_id(1) * BLOCK_N, k])
    else:
        mask = (offs_n[:, None] < N) & (k + offs_k < k_end)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k + offs_k)[None, :] * stride_wk, mask=mask,
                    other=0.0, eviction_policy="evict_first")
    return w


@jit
def _multiply_add(acc, x, w, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr,
                  PRECISION: tl.constexpr):
    """acc (BM, BN) += x (BM, BK) @ w (BN, BK)^T on tensor cores (SWAP_AB: acc^T (BN, BM) += w @ x^T), or
    acc (BM, BN, BK) += the products elementwise on CUDA cores (reduced over K once, after the loop)."""
    if USE_DOT:
        if INTERPRET:
            x, w = x.to(tl.float32), w.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@jit(do_not_specialize=["M"])  # M changes every step: one compile serves all
def tiled_gemv_kernel(x_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, nw_ptr, add_ptr, sum_ptr,
                      eps, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_om, stride_on,
                      HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr,
                      PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                      SWAP_AB: tl.constexpr, W_TMA: tl.constexpr, GATED: tl.constexpr,
                      PDL: tl.constexpr, NORM: tl.constexpr, NORM_ADD: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K): a (BLOCK_M, BLOCK_N) tile of out over one slice
    of K. Each W tile is loaded once (evict-first: nothing reads it again) and applied to all BLOCK_M rows.

    USE_DOT multiplies on tensor cores (rows padded to 16; SWAP_AB: as out^T = W x^T, see KernelConfig);
    otherwise CUDA cores accumulate the products elementwise and reduce over K once at the end. With
    SPLIT_K > 1 the fp32 partials go to part_ptr (SPLIT_K, M, N), and the tile's last program to arrive
    (count_ptr: one int32 per tile) sums them in split order, so the bits do not depend on which program
    that is. With W_TMA, w_ptr is a TensorDescriptor of W with (BLOCK_N, BLOCK_K) boxes; K slices are whole
    tiles, so its zero fill past K is the only mask needed.
    With PDL (see KernelConfig) it loads its first W tile, then waits for the kernel before it. With NORM
    (a few rows, see FoldedNorm) x is replaced by rmsnorm(x [+ add]) with weight nw_ptr, as it is loaded. With
    GATED, W is [gate; up] (2N, K) and out (M, N) silu(gate) * up: a program's BLOCK_N rows of W are the
    gate rows of its BLOCK_N // 2 columns, then their up rows (the grid's second axis: cdiv(N, BLOCK_N // 2)).
    """
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_rows = N  # of W
    if GATED:  # W's rows for this program's BLOCK_N // 2 columns of out: theirs in gate, then in up
        j = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (BLOCK_N // 2) + j % (BLOCK_N // 2) + (j // (BLOCK_N // 2)) * N
        n_rows = 2 * N
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_loop = k_start
    rstd, nw = tl.zeros((BLOCK_M,), dtype=tl.float32), 0.0  # the folded norm's (NORM only)
    if PDL:  # the first step, peeled: its W tile is loaded before the wait, overlapping the kernel before
        w = _w_tile(w_ptr, offs_n, offs_k, k_start, k_end, n_rows, stride_wn, stride_wk, W_TMA, BLOCK_N)
        if NORM:
            nw = _norm_weight_tile(nw_ptr, offs_k, k_start, k_end)
        if not INTERPRET:  # which has no griddepcontrol, and runs kernels one by one anyway
            gdc_launch_dependents()  # the next kernel may launch now: its W does not depend on this one
            gdc_wait()  # the kernel before has finished: its writes (x, the residual) are visible
        # Issued before the norm's row loads, so both are in flight at once (one L2 round trip, not two).
        x = _x_tile(x_ptr, add_ptr, offs_m, offs_k, k_start, k_end, M, stride_xm, stride_xk, NORM_ADD)
    # The epilogue's inputs, loaded now so their latency hides under the K loop (after the wait: the
    # residual is an earlier kernel's output).
    res, bias = _epilogue_inputs(offs_m, offs_n, M, N, res_ptr, bias_ptr, stride_rm, stride_rn, HAS_BIAS,
                                 HAS_RESIDUAL)
    if NORM:
        rstd = _rows_rstd(x_ptr, add_ptr, sum_ptr, offs_m, M, stride_xm, K, eps, NORM_ADD, BLOCK_M, BLOCK_R)
    if PDL:
        if NORM:
            x = _normalize(x, nw, rstd)
        acc = _multiply_add(acc, x, w, USE_DOT, SWAP_AB, INTERPRET, PRECISION)
        k_loop += BLOCK_K
    for k in range(k_loop, k_end, BLOCK_K):
        x = _x_tile(x_ptr, add_ptr, offs_m, offs_k, k, k_end, M, stride_xm, stride_xk, NORM_ADD)
        if NORM:
            x = _normalize(x, _norm_weight_tile(nw_ptr, offs_k, k, k_end), rstd)
        w = _w_tile(w_ptr, offs_n, offs_k, k, k_end, n_rows, stride_wn, stride_wk, W_TMA, BLOCK_N)
        acc = _multiply_add(acc, x, w, USE_DOT, SWAP_AB, INTERPRET, PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    elif not USE_DOT:
        acc = tl.sum(acc, axis=2)
    if GATED:
        _silu_and_mul_store(acc, offs_m, pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2), M, N, out_ptr,
                            stride_om, stride_on, INTERPRET, BLOCK_M, BLOCK_N)
    elif SPLIT_K == 1:
        _add_residual_store(acc, res, bias, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, HAS_BIAS,
                            HAS_RESIDUAL, INTERPRET)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        partials = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # split s at partials + s * M * N
        tl.store(partials + pid_k * M * N, acc, mask=mask)
        # The CUDA threadfence-reduction pattern: every thread's partial is stored (barrier) before one
        # thread's release-acquire increment counts it; the program that sees SPLIT_K - 1 has all of them.
        tl.debug_barrier()
        count = count_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # in split order, whichever program came last
                acc += tl.load(partials + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")  # not L1
            _add_residual_store(acc, res, bias, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, HAS_BIAS,
                                HAS_RESIDUAL, INTERPRET)
            tl.store(count, 0)  # ready for the next launch


@jit(do_not_specialize=["M"])
def fused_o_proj_add_residual_kernel(x_ptr, w_ptr, res_ptr, bias_ptr, out_ptr, M, N, K,
                                     stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                                     stride_om, stride_on, HAS_BIAS: tl.constexpr,
                                     HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr,
                                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): one (BLOCK_M, BLOCK_N) tile of out on tensor cores.

    Programs come in groups of GROUP_M row tiles that walk N together, so the row tiles that share a W
    tile run side by side and all but the first read it from L2.
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
    res, bias = _epilogue_inputs(offs_m, offs_n, M, N, res_ptr, bias_ptr, stride_rm, stride_rn, HAS_BIAS,
                                 HAS_RESIDUAL)  # before the loop, so their latency hides under it
    for k in range(0, K, BLOCK_K):
        k_mask = (k + offs_k < K)[None, :]
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & k_mask, other=0.0)
        if INTERPRET:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    _add_residual_store(acc, res, bias, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, HAS_BIAS,
                        HAS_RESIDUAL, INTERPRET)
