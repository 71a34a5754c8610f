"""The fused o_proj + residual add against its fp32 torch reference.

On the CPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set by conftest.py) on odd,
small shapes with large tiles; on a GPU every real shape and M in 1..256 go through the tuned dispatcher.
"""
import json
from dataclasses import replace

import pytest
import torch

from nanovllm.kernels import fused_attention_output as fao
from nanovllm.kernels.add_rmsnorm import add_rmsnorm, rmsnorm
from nanovllm.kernels.fused_attention_output import (
    FoldedNorm,
    KernelConfig,
    fused_o_proj_add_residual,
    fused_o_proj_add_residual_ref,
    launch,
    project,
    rmsnorm_project,
    rmsnorm_project_ref,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}
SHAPES = [(1, 64, 96), (3, 200, 64), (17, 96, 200)]  # (M, K, N): ragged against every block size
CONFIGS = [KernelConfig("gemv", 16, 64, 128), KernelConfig("gemv", 4, 64, 128, use_dot=False),
           KernelConfig("gemm", 16, 64, 64), KernelConfig("gemv", 16, 32, 64, tma=True),
           KernelConfig("gemv", 16, 64, 64, split_k=2, swap=True)]
REAL_SHAPES = [(896, 896), (2048, 1024), (2048, 2048), (4096, 2560), (4096, 4096)]  # (K, N)


def make_inputs(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu", bias: bool = False,
                row_pad: int = 0, seed: int = 0):
    """x (M, K), weight (N, K), residual (M, N), bias (N,) | None; row_pad > 0 makes x and residual
    row-strided views (stride(0) = K + row_pad) as slices of wider buffers are."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k + row_pad, generator=gen, device=device).to(dtype)[:, :k]
    weight = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).to(dtype)
    residual = torch.randn(m, n + row_pad, generator=gen, device=device).to(dtype)[:, :n]
    b = torch.randn(n, generator=gen, device=device).to(dtype) if bias else None
    return x, weight, residual, b


def poisoned(m: int, n: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)  # an unwritten element stays NaN


def assert_matches_ref(out, x, weight, residual, bias=None, ref=None):
    """Within TOL of the reference, plus one unit in the last place of the product: both round the product
    before adding the residual, so fp32 products that differ in their last bits (summation order) may
    round to neighbouring values, and the residual may cancel most of the product."""
    ref = fused_o_proj_add_residual_ref(x, weight, residual, bias) if ref is None else ref
    assert torch.isfinite(out).all(), "some output element was not written"
    product = x.float() @ weight.float().t() + (0 if bias is None else bias.float())  # (M, N)
    tol = TOL[x.dtype]
    bound = tol["atol"] + tol["rtol"] * ref.float().abs() + torch.finfo(x.dtype).eps * product.abs()
    err = (out.float() - ref.float()).abs()
    assert (err <= bound).all(), f"max error {err.max().item()}, worst excess {(err - bound).max().item()}"


@pytest.mark.skipif(torch.cuda.is_available() or fao.triton is None,
                    reason="interpreter tests (need Triton); the GPU tests below cover CUDA")
class TestKernelsInterpreted:
    @pytest.mark.parametrize("config", CONFIGS, ids=str)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("m,k,n", SHAPES)
    def test_kernel_matches_reference(self, config, dtype, m, k, n):
        if not config.use_dot and m > 16:
            pytest.skip("M = 17 makes five row tiles of 4 here: slow in the interpreter")
        bias = (m + k) % 2 == 0  # half of the shapes with bias, half without, for every config and dtype
        x, weight, residual, b = make_inputs(m, k, n, dtype, bias=bias)
        out = launch(config, x, weight, residual, b, out=poisoned(m, n, dtype))
        assert_matches_ref(out, x, weight, residual, b)

    @pytest.mark.parametrize("bias", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_kernels_with_and_without_bias(self, bias, dtype):
        x, weight, residual, b = make_inputs(3, 96, 64, dtype, bias=bias, seed=1)
        for config in (CONFIGS[0], CONFIGS[2], KernelConfig("gemv", 4, 8, 64, use_dot=False)):  # BK ragged
            assert_matches_ref(launch(config, x, weight, residual, b), x, weight, residual, b)

    @pytest.mark.parametrize("tma", [False, True])
    @pytest.mark.parametrize("split_k", [2, 3])
    def test_split_k_partials_are_reduced_once(self, split_k, tma):
        # K = 200 in tiles of 32 is 7 tiles: the splits are uneven and the last one is ragged.
        x, weight, residual, b = make_inputs(3, 200, 64, torch.bfloat16, bias=True, seed=2)
        config = KernelConfig("gemv", 16, 64, 32, split_k=split_k, tma=tma)
        assert_matches_ref(launch(config, x, weight, residual, b), x, weight, residual, b)

    def test_split_k_counters_are_reset_for_the_next_launch(self):
        """The last program of each tile sums the partials and zeroes the tile's counter: a second launch
        (other inputs, more tiles) is summed too, and the counters end at zero again."""
        config = KernelConfig("gemv", 16, 16, 32, split_k=3)
        for seed, n in ((5, 40), (6, 72)):  # 3 tiles, then 5
            x, weight, residual, _ = make_inputs(2, 200, n, torch.float32, seed=seed)
            assert_matches_ref(launch(config, x, weight, residual, out=poisoned(2, n, torch.float32)),
                               x, weight, residual)
            assert not fao._workspace(x.device)[1].any()

    def test_tma_config_falls_back_when_rows_are_not_16_byte_aligned(self):
        x, weight, residual, _ = make_inputs(3, 100, 64, torch.bfloat16, seed=4)  # 200-byte rows
        assert not fao._tma_ok(weight)
        assert_matches_ref(launch(CONFIGS[3], x, weight, residual), x, weight, residual)

    @pytest.mark.parametrize("config", CONFIGS, ids=str)
    def test_row_strided_inputs_and_in_place_residual(self, config):
        x, weight, residual, _ = make_inputs(5, 96, 64, torch.bfloat16, row_pad=8, seed=3)
        assert x.stride(0) == 104 and residual.stride(0) == 72
        before = residual.clone()
        expected = fused_o_proj_add_residual_ref(x, weight, residual)
        out = launch(config, x, weight, residual, out=residual)  # aliased, as a decoder layer may do
        assert out.data_ptr() == residual.data_ptr()
        assert_matches_ref(out, x, weight, before, ref=expected)


def integer_inputs(m: int, k: int, n: int, seed: int = 0):
    """bf16 x, weight and bias holding small integers, so x @ W^T + bias is exact in fp32 whatever the
    summation order, yet often needs rounding in bf16 (|products| in the hundreds, bf16 spacing 2-4 there,
    ties included); a fractional residual then makes rounding once and rounding twice disagree."""
    gen = torch.Generator().manual_seed(seed)
    ints = lambda *shape: torch.randint(-8, 9, shape, generator=gen).to(torch.bfloat16)
    residual = (torch.randn(m, n, generator=gen) * 4).to(torch.bfloat16)
    return ints(m, k), ints(n, k), residual, ints(n)


def dispatcher_paths(k: int, n: int) -> dict[str, tuple[int, KernelConfig]]:
    """For each path the dispatcher can pick (cuBLAS; gemv on CUDA or tensor cores, with or without TMA,
    split-K and PDL; gemm), the candidate over all M buckets that is quickest to interpret, with its M.
    (The interpreter runs PDL configurations without griddepcontrol: their peeled first step.)"""
    paths = {}
    for m in (1 << i for i in range(9)):
        for c in fao.candidate_configs(m, n, k, torch.bfloat16, pdl=True):
            path = (f"{c.kernel}{'' if c.use_dot else '-fma'}{'-tma' if c.tma else ''}{'-swap' if c.swap else ''}"
                    f"{'-sk' if c.split_k > 1 else ''}{'-pdl' if c.pdl else ''}")
            cost = -(-m // c.block_m) * -(-n // c.block_n) * c.split_k  # programs to interpret
            if path not in paths or cost < paths[path][0]:
                paths[path] = cost, m, c
    return {path: (m, c) for path, (_, m, c) in paths.items()}


EXACT_K, EXACT_N = 256, 40
PATHS = dispatcher_paths(EXACT_K, EXACT_N)


@pytest.mark.skipif(torch.cuda.is_available() or fao.triton is None, reason="interpreter test (needs Triton)")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_rounds_the_product_then_the_sum_as_the_unfused_path(path):
    """Issue 8: greedy tokens must not change with the fusion on. The unfused path stores F.linear(x, W, b)
    in bf16, then adds the residual (rounded again); with exact fp32 products every path must give those
    bits exactly, not the single rounding of product + residual (more accurate, but a different number)."""
    m, config = PATHS[path]
    x, weight, residual, bias = integer_inputs(m, EXACT_K, EXACT_N, seed=m)
    unfused = torch.nn.functional.linear(x, weight, bias) + residual  # the model's own unfused path, on CPU
    rounded_once = (x.float() @ weight.float().t() + bias.float() + residual.float()).to(torch.bfloat16)
    assert (rounded_once != unfused).any()  # the inputs tell the two roundings apart
    assert torch.equal(fused_o_proj_add_residual_ref(x, weight, residual, bias), unfused)
    out = launch(config, x, weight, residual, bias, out=poisoned(m, EXACT_N, torch.bfloat16))
    assert torch.equal(out, unfused), f"{(out != unfused).float().mean():.1%} of the elements differ"
    without_bias = launch(config, x, weight, residual)
    assert torch.equal(without_bias, torch.nn.functional.linear(x, weight) + residual)


def summed_in_order(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with the fp32 products summed over K from first to last, rounded to bf16. (A matmul
    sums in whatever blocking its library picks: torch 2.13's CPU matmul in one order and in the reverse
    one agreed in most elements, so it showed too little of the inputs' order sensitivity.)"""
    acc = torch.zeros(x.shape[0], weight.shape[0])
    for k in range(x.shape[1]):
        acc += x[:, k:k + 1].float() * weight[:, k].float()
    return acc.to(torch.bfloat16)


def order_sensitive_inputs(m: int, k: int, n: int, bias: bool, seed: int, device: str = "cpu"):
    """Random bf16 inputs plus, in every row of x, a pair +c, -c (first and last column) that meets equal
    weights: the pair cancels exactly, but fp32 partial sums near c * w lose the low bits of the other
    products, so the bf16 product depends on the summation order (the tiling) in most elements. Only the
    very same kernel and tiling reproduce it."""
    x, weight, residual, b = make_inputs(m, k, n, torch.bfloat16, device, bias=bias, seed=seed)
    x[:, 0], x[:, -1] = 2.0**18, -(2.0**18)
    weight[:, -1] = weight[:, 0]
    return x, weight, residual, b


@pytest.mark.skipif(torch.cuda.is_available() or fao.triton is None, reason="interpreter test (needs Triton)")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_projects_alone_to_the_product_its_fused_call_adds_to(path, bias):
    """The unfused path runs the same configuration without a residual and adds it later (in the next
    RMSNorm kernel): proj + residual, rounded, must give the fused output bit for bit, also where the
    product depends on the summation order."""
    m, config = PATHS[path]
    x, weight, residual, b = order_sensitive_inputs(m, EXACT_K, EXACT_N, bias, seed=m + 10)
    pair_first = (x[:, 1:-1].double() @ weight[:, 1:-1].double().t()).to(torch.bfloat16)  # the pair cancelled
    assert (summed_in_order(x, weight) != pair_first).float().mean() > 0.5
    fused = launch(config, x, weight, residual, b, out=poisoned(m, EXACT_N, torch.bfloat16))
    proj = launch(config, x, weight, None, b, out=poisoned(m, EXACT_N, torch.bfloat16))
    assert torch.equal(proj + residual, fused)  # bf16 + bf16: the fp32 sum rounded once, as the kernel does
    if config.pdl:  # its first step is peeled: the same products in the same order as without PDL
        assert torch.equal(launch(replace(config, pdl=False), x, weight, residual, b), fused)
    x[:, 0] = x[:, -1] = 0  # the same products without the pair: now plain random inputs
    assert_matches_ref(launch(config, x, weight, None, b), x, weight, torch.zeros_like(residual), b)


def test_projection_alone_falls_back_to_the_rounded_product_on_cpu():
    x, weight, residual, b = make_inputs(5, 64, 96, torch.bfloat16, bias=True, seed=8)
    proj = fused_o_proj_add_residual(x, weight, bias=b)
    assert proj.dtype == torch.bfloat16 and torch.equal(proj, torch.nn.functional.linear(x, weight, b))
    assert torch.equal(proj + residual, fused_o_proj_add_residual(x, weight, residual, b))
    out = torch.empty(5, 96, dtype=torch.bfloat16)
    assert fused_o_proj_add_residual(x, weight, None, b, out=out) is out and torch.equal(out, proj)


def test_cublas_path_is_the_unfused_path_even_in_place():
    x, weight, residual, bias = integer_inputs(5, 64, 24, seed=7)
    unfused = torch.nn.functional.linear(x, weight, bias) + residual
    assert torch.equal(launch(fao._CUBLAS, x, weight, residual, bias), unfused)
    assert torch.equal(launch(fao._CUBLAS, x, weight, None, bias), torch.nn.functional.linear(x, weight, bias))
    out = launch(fao._CUBLAS, x, weight, residual, bias, out=residual)  # the product must not clobber it
    assert out.data_ptr() == residual.data_ptr() and torch.equal(out, unfused)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_project_is_the_linear_layer_on_cpu():
    x, weight, _, b = make_inputs(5, 64, 96, torch.bfloat16, bias=True, seed=9)
    assert torch.equal(project(x, weight, b), torch.nn.functional.linear(x, weight, b))
    with pytest.raises(ValueError, match="bias"):
        project(x, weight, b[:5])


def test_public_function_falls_back_to_reference_on_cpu():
    x, weight, residual, b = make_inputs(3, 64, 96, torch.float32, bias=True)
    out = torch.empty(3, 96)
    assert fused_o_proj_add_residual(x, weight, residual, b, out=out) is out
    torch.testing.assert_close(out, x @ weight.t() + b + residual)


def test_shape_and_dtype_errors_are_value_errors():
    x, weight, residual, _ = make_inputs(3, 64, 96, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_o_proj_add_residual(x, weight.t(), residual)
    with pytest.raises(ValueError, match="residual"):
        fused_o_proj_add_residual(x, weight, residual[:, :95])
    with pytest.raises(ValueError, match="out"):
        fused_o_proj_add_residual(x, weight, residual, out=torch.empty(3, 96, dtype=torch.float64))


def test_every_bucket_has_cublas_and_small_m_streams_w_once():
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
        configs = fao.candidate_configs(m, 1024, 2048, torch.bfloat16)
        assert configs[0].kernel == "cublas"  # so the dispatcher never loses to cuBLAS beyond noise
        if m <= 64:  # every gemv tile covers all rows of the batch, so W is read once per call, or (33-64
            # rows) two row tiles do, side by side, the second finding the W tile in L2
            assert any(c.kernel == "gemv" for c in configs)
            assert all(c.block_m >= m or (m > 16 and 2 * c.block_m >= m) for c in configs[1:] if c.kernel == "gemv")
            assert m > 16 or all(c.block_m >= m for c in configs[1:] if c.kernel == "gemv")
        if m <= 256:
            assert all(-(-m // c.block_m) <= 8 for c in configs[1:])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("k,n", REAL_SHAPES)
def test_gpu_every_real_shape_and_m_up_to_256(k, n):
    x_all, weight, res_all, _ = make_inputs(256, k, n, torch.bfloat16, device="cuda", seed=k + n)
    fao.warmup(n, k, torch.bfloat16)
    for m in range(1, 257):
        x, residual = x_all[:m], res_all[:m]
        out = fused_o_proj_add_residual(x, weight, residual, out=poisoned(m, n, torch.bfloat16, "cuda"))
        assert_matches_ref(out, x, weight, residual)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", [KernelConfig("gemv", 16, 32, 128), KernelConfig("gemm", 64, 64, 64)],
                         ids=str)
def test_gpu_other_dtypes_bias_and_strides(dtype, config):
    for m in (1, 7, 16, 33, 200):
        x, weight, residual, b = make_inputs(m, 2048, 1024, dtype, device="cuda", bias=True, row_pad=64,
                                             seed=m)
        out = launch(config, x, weight, residual, b, out=poisoned(m, 1024, dtype, "cuda"))
        assert_matches_ref(out, x, weight, residual, b)


@cuda
@pytest.mark.parametrize("config", [KernelConfig("gemv", 16, 32, 256, split_k=2),
                                    KernelConfig("gemv", 4, 2, 512, use_dot=False, num_stages=1),
                                    KernelConfig("gemv", 2, 8, 256, use_dot=False, num_stages=3, tma=True),
                                    KernelConfig("gemv", 16, 16, 128, split_k=2, tma=True),
                                    KernelConfig("gemm", 64, 128, 64)], ids=str)
def test_gpu_each_kernel_on_ragged_shapes(config):
    for m, k, n in [(1, 200, 96), (3, 96, 200), (17, 1000, 520)]:
        x, weight, residual, b = make_inputs(m, k, n, torch.bfloat16, device="cuda", bias=True, seed=m)
        out = launch(config, x, weight, residual, b, out=poisoned(m, n, torch.bfloat16, "cuda"))
        assert_matches_ref(out, x, weight, residual, b)


@cuda
@pytest.mark.parametrize("k,n", REAL_SHAPES)
def test_gpu_projection_alone_is_the_product_the_fused_call_adds_to(k, n):
    """Every candidate of every M bucket, and the dispatcher: round(proj + residual) == fused, bit for bit,
    on inputs whose product depends on the summation order. A projection alone on an untuned shape tunes
    it with a residual, under the fused call's key."""
    x_all, weight, res_all, b = order_sensitive_inputs(256, k, n, True, seed=k - n, device="cuda")
    for m in (1 << i for i in range(9)):
        x, residual = x_all[:m], res_all[:m]
        for config in fao.candidate_configs(m, n, k, torch.bfloat16):
            try:
                fused = launch(config, x, weight, residual)
            except Exception:  # a tile this card cannot compile: the tuner skips it too
                continue
            assert torch.equal(launch(config, x, weight) + residual, fused), f"{config} at M = {m}"
    key = fao.tuning_key(x_all.device, torch.bfloat16, n, k, True, 8, True)
    fao._BEST.pop(key, None)
    proj = fused_o_proj_add_residual(x_all[:7], weight, bias=b)  # untuned: tunes the M = 8 bucket
    assert key in fao._BEST
    assert torch.equal(proj + res_all[:7], fused_o_proj_add_residual(x_all[:7], weight, res_all[:7], b))


@cuda
@pytest.mark.parametrize("m", [1, 8, 64])
def test_gpu_pdl_kernels_wait_for_the_kernels_before_them(m):
    """Under PDL a gemv may start before the kernel ahead of it ends, and must read x and the residual
    only after that kernel's writes. A chain of calls, each reading the residual the call before it
    wrote and an x written just before by a copy (a memcpy node) or a torch kernel, eagerly and in a
    CUDA graph, must give the bits of the same configurations launched one by one without PDL."""
    from triton.runtime.errors import OutOfResources
    k, n, steps = 2048, 1024, 6
    if not fao.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    gen = torch.Generator("cuda").manual_seed(m)
    srcs = [torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(steps)]
    weight = (torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(torch.bfloat16)
    res0 = torch.randn(m, n, generator=gen, device="cuda").to(torch.bfloat16)
    xs, outs = [torch.empty_like(t) for t in srcs], [torch.empty_like(res0) for _ in range(steps)]

    def chain(config):
        residual = res0
        for j in range(steps):
            if j % 2:
                xs[j].copy_(srcs[j])
            else:
                torch.mul(srcs[j], 1.0, out=xs[j])
            residual = launch(config, xs[j], weight, residual, out=outs[j])

    def poison():
        for t in xs + outs:
            t.fill_(float("nan"))
    configs = [c for c in fao.candidate_configs(m, n, k, torch.bfloat16, pdl=True) if c.pdl]
    assert configs
    for config in configs:
        try:
            expected = [res0]
            for j in range(steps):
                expected.append(launch(replace(config, pdl=False), srcs[j], weight, expected[-1]))
            poison()
            chain(config)  # eagerly (and compiled, outside the capture)
        except OutOfResources:  # a tile over this card's shared memory (either variant): the tuner skips it
            continue
        assert all(torch.equal(o, e) for o, e in zip(outs, expected[1:])), f"{config}, eager"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(config)
        poison()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, e) for o, e in zip(outs, expected[1:])), f"{config}, in a CUDA graph"


@cuda
@pytest.mark.parametrize("k,n", [(1024, 4096), (1024, 6144)])  # Qwen3-0.6B's qkv_proj, gate_up_proj
def test_gpu_project_tunes_without_a_residual_and_captures(k, n):
    """`project` (the column-parallel projections) tunes its own key, timed without a residual, matches
    F.linear to bf16 rounding at every M, and replays in a CUDA graph to the bits it gave eagerly."""
    gen = torch.Generator("cuda").manual_seed(n)
    weight = (torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(torch.bfloat16)
    for m in (1, 3, 8, 64):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        got = project(x, weight)
        assert fao.tuning_key(x.device, torch.bfloat16, n, k, False, fao._bucket(m), False) in fao._BEST
        ref = torch.nn.functional.linear(x, weight).float()
        assert (got.float() - ref).norm() <= 1e-2 * ref.norm()
        out = torch.empty_like(got)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            project(x, weight, out=out)
        graph.replay()
        assert torch.equal(out, got)


@cuda
def test_gpu_captures_in_a_cuda_graph_and_is_deterministic():
    k, n = 2048, 1024
    fao.warmup(n, k, torch.bfloat16, max_m=8)
    x, weight, residual, _ = make_inputs(8, k, n, torch.bfloat16, device="cuda", seed=5)
    out = torch.empty(8, n, dtype=torch.bfloat16, device="cuda")
    first = fused_o_proj_add_residual(x, weight, residual, out=out).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_o_proj_add_residual(x, weight, residual, out=out)
    x2, _, residual2, _ = make_inputs(8, k, n, torch.bfloat16, device="cuda", seed=6)
    x.copy_(x2)
    residual.copy_(residual2)
    graph.replay()
    assert_matches_ref(out, x, weight, residual)
    x1, _, residual1, _ = make_inputs(8, k, n, torch.bfloat16, device="cuda", seed=5)
    x.copy_(x1)
    residual.copy_(residual1)
    graph.replay()
    assert torch.equal(out, first)  # bit-identical: no atomics, fixed reduction order


def test_tuning_choices_persist_for_later_processes(tmp_path, monkeypatch):
    """A choice timed once is written to the tuning file and recalled (not re-timed) once the in-memory
    table is gone, as in a new process; other keys (a bias, PDL candidates allowed, a projection alone) are
    timed; a corrupt file is ignored; an empty NANOVLLM_CACHE_DIR keeps choices in memory only."""
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fao, "_BEST", {})
    chosen = fao.KernelConfig("gemv", 16, 32, 256, 2, True, 4, 4)
    timed = []
    monkeypatch.setattr(fao, "_time_candidates", lambda *key: timed.append(key) or chosen)
    key = (torch.device("cpu"), torch.bfloat16, 96, 200, False, 4, False, True)
    assert fao._tune(*key) == chosen and len(timed) == 1
    fao._BEST.clear()  # a new process
    assert fao._tune(*key) == chosen and fao._BEST[key] == chosen and len(timed) == 1
    fao._tune(torch.device("cpu"), torch.bfloat16, 96, 200, True, 4, False, True)  # with a bias
    fao._tune(torch.device("cpu"), torch.bfloat16, 96, 200, False, 4, True, True)  # PDL allowed
    fao._tune(torch.device("cpu"), torch.bfloat16, 96, 200, False, 4, False, False)  # for `project`
    assert len(timed) == 4 and timed[-1][-1] is False
    assert len(json.loads((tmp_path / "fused_o_proj_tuning.json").read_text())) == 4
    (tmp_path / "fused_o_proj_tuning.json").write_text("{not json")
    fao._BEST.clear()
    assert fao._tune(*key) == chosen and len(timed) == 5
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", "")
    fao._BEST.clear()
    fao._tune(*key)
    fao._BEST.clear()
    fao._tune(*key)
    assert len(timed) == 7


# The RMSNorm folded into the projection's load of x (rmsnorm_project, one token).
EPS = 1e-6


def norm_inputs(k: int, n: int, device: str = "cpu", seed: int = 0, m: int = 1):
    """x, residual (M, K) of a residual stream's scale (so the norm changes them; each row its own), norm
    weight (K,), weight (N, K), bias (N,): bf16."""
    gen = torch.Generator(device).manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)
    scales = torch.tensor([1.0, 0.25, 2.0, 0.5], device=device)[:m, None]  # rows of different rms
    x, residual = (randn(m, k, scale=3) * scales).to(torch.bfloat16), (randn(m, k, scale=3) * scales).to(torch.bfloat16)
    return x, residual, 1 + randn(k, scale=0.1), randn(n, k, scale=k**-0.5), randn(n)


def norm_then_project(config, x, residual, norm_weight, weight, bias):
    """What the decoder layer ran before the fold: the RMSNorm kernel (with the add), then the projection."""
    if residual is None:
        return launch(config, rmsnorm(x, norm_weight, EPS), weight, None, bias), x
    normed, stream = add_rmsnorm(x, residual.clone(), norm_weight, EPS)
    return launch(config, normed, weight, None, bias), stream


def folded(config, x, residual, norm_weight, weight, bias):
    (m, k), n = x.shape, weight.shape[0]
    stream = poisoned(m, k, x.dtype, x.device) if residual is not None else None
    norm = FoldedNorm(norm_weight, EPS, residual, stream)
    out = launch(config, x, weight, None, bias, out=poisoned(m, n, x.dtype, x.device), norm=norm)
    return out, x if residual is None else stream


FOLD_CONFIGS = [KernelConfig("gemv", 1, 4, 64, use_dot=False), KernelConfig("gemv", 16, 32, 64),
                KernelConfig("gemv", 16, 32, 64, split_k=2, pdl=True), KernelConfig("gemv", 16, 32, 64, tma=True)]


@pytest.mark.skipif(torch.cuda.is_available() or fao.triton is None, reason="interpreter test (needs Triton)")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("config", FOLD_CONFIGS, ids=str)
def test_folded_norm_projects_what_the_norm_kernel_stores(config, add, m):
    """The fold must not change a bit: the gemv multiplies each row of x normalized (after the residual
    add) and rounded exactly as the RMSNorm kernel stores it, and the first program of each row block writes
    its sums. K = 200 is ragged against BLOCK_K = 64 and the row block (256); 3 rows against BLOCK_M."""
    x, residual, norm_weight, weight, bias = norm_inputs(200, 40, seed=5, m=m)
    residual = residual if add else None
    want, want_stream = norm_then_project(config, x, residual, norm_weight, weight, bias)
    got, stream = folded(config, x, residual, norm_weight, weight, bias)
    assert torch.equal(got, want) and torch.equal(stream, want_stream)
    ref, ref_stream = rmsnorm_project_ref(x, norm_weight, EPS, weight, bias, residual)
    # Within one bf16 step: the interpreter truncates fp32 -> bf16 where the GPU (and torch) round; a stream
    # element one step off moves a product by up to ~0.02 here.
    torch.testing.assert_close(stream.float(), ref_stream.float(), rtol=2**-7, atol=0)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[torch.bfloat16]["rtol"], atol=0.02)


GATED_CONFIGS = [KernelConfig("gemv", 1, 4, 64, use_dot=False), KernelConfig("gemv", 1, 2, 64, use_dot=False, pdl=True),
                 KernelConfig("gemv", 16, 32, 64)]


@pytest.mark.skipif(torch.cuda.is_available() or fao.triton is None, reason="interpreter test (needs Triton)")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", GATED_CONFIGS, ids=str)
def test_gated_fold_is_silu_and_mul_of_the_projection(config, m):
    """gate_up_proj with SiLU-and-mul in its epilogue (and the add + norm folded into its x): silu(gate) * up
    of the same configuration's rounded product. I = 40 columns, ragged against every tile; K = 200."""
    x, residual, norm_weight, weight, _ = norm_inputs(200, 80, seed=7, m=m)  # weight: 40 gate rows, then 40 up
    proj, want_stream = folded(config, x, residual, norm_weight, weight, None)
    stream = poisoned(m, 200, x.dtype)
    got = launch(config, x, weight, None, None, out=poisoned(m, 40, x.dtype),
                 norm=FoldedNorm(norm_weight, EPS, residual, stream), gated=True)
    assert torch.isfinite(got).all() and torch.equal(stream, want_stream)
    # Within one bf16 step: the interpreter's sigmoid is numpy's, not the GPU's (there: bit for bit).
    torch.testing.assert_close(got.float(), fao.silu_and_mul_ref(proj).float(), rtol=2**-7, atol=1e-6)


def test_rmsnorm_project_falls_back_to_reference_off_cuda():
    x, residual, norm_weight, weight, bias = norm_inputs(64, 48, seed=6)
    before = residual.clone()
    out, stream = rmsnorm_project(x, norm_weight, EPS, weight, bias, residual)
    ref, ref_stream = rmsnorm_project_ref(x, norm_weight, EPS, weight, bias, before)
    assert torch.equal(out, ref) and torch.equal(stream, ref_stream) and torch.equal(residual, before)
    normed = (x.float() + before.float()).to(x.dtype).float()
    normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.float())
    torch.testing.assert_close(out.float(), normed @ weight.float().t() + bias.float(), **TOL[torch.bfloat16])
    gated, _ = rmsnorm_project(x, norm_weight, EPS, weight, None, before.clone(), gated=True)
    want, _ = rmsnorm_project_ref(x, norm_weight, EPS, weight, None, before)
    assert gated.shape == (1, 24) and torch.equal(gated, fao.silu_and_mul_ref(want))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_project(x, norm_weight, EPS, weight, bias, residual[:, :32])
    with pytest.raises(ValueError, match="norm_weight"):
        rmsnorm_project(x, norm_weight[:32], EPS, weight, bias)


@cuda
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,n", [(1024, 4096), (4096, 12288)])  # Qwen3-0.6B's and 8B's qkv_proj
def test_gpu_folded_norm_is_the_norm_kernel_then_the_gemv_bit_for_bit(k, n, m):
    """On the GPU the norm kernel and the gemv reduce the sum of squares with different layouts and
    warps; rms_rstd sums in fp64 so both get the same rstd, and the fold stays bit-exact for each kind of
    gemv tiling the tuner may pick for 1 and 3 rows (CUDA cores, tensor cores, split-K; with PDL where the
    card has it, as the engine runs them; TMA changes only W's loads). One of each: every tiling compiles
    anew."""
    from triton.runtime.errors import OutOfResources
    x, residual, norm_weight, weight, bias = norm_inputs(k, n, "cuda", seed=k + n, m=m)
    kinds, pdl = {}, fao.pdl_supported(x.device)
    for c in fao.candidate_configs(fao._bucket(m), n, k, torch.bfloat16, pdl=pdl):
        if c.kernel in ("gemv", "staged") and c.pdl == pdl and not c.tma:
            kinds.setdefault((c.kernel, c.use_dot, c.split_k > 1), c)
    for config in kinds.values():
        for add in (None, residual):
            try:
                want, want_stream = norm_then_project(config, x, add, norm_weight, weight, bias)
                got, stream = folded(config, x, add, norm_weight, weight, bias)
            except OutOfResources:
                continue
            assert torch.equal(got, want) and torch.equal(stream, want_stream), f"{config}, add {add is not None}"


@cuda
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_gated_fold_is_the_silu_and_mul_kernel_bit_for_bit(m):
    """Qwen3-0.6B's gate_up_proj at 1 and 3 tokens: the gemv with SiLU-and-mul in its epilogue gives the bits of
    the same tiling's projection then the SiLU-and-mul kernel, for each even-width tiling without split-K
    (what the fold takes), and rmsnorm_project(gated=True) those of rmsnorm_project then silu_and_mul."""
    from triton.runtime.errors import OutOfResources

    from nanovllm.kernels.silu_and_mul import silu_and_mul
    k, n = 1024, 6144
    x, residual, norm_weight, weight, _ = norm_inputs(k, n, "cuda", seed=12, m=m)
    pdl, tried = fao.pdl_supported(x.device), 0
    for config in fao.candidate_configs(fao._bucket(m), n, k, torch.bfloat16, pdl=pdl):
        if config.kernel not in ("gemv", "staged") or config.split_k > 1 or config.block_n % 2 or config.pdl != pdl:
            continue
        try:
            proj, _ = folded(config, x, residual, norm_weight, weight, None)
            got = launch(config, x, weight, None, None, norm=FoldedNorm(norm_weight, EPS, residual,
                                                                        torch.empty_like(x)), gated=True)
        except OutOfResources:
            continue
        assert torch.equal(got, silu_and_mul(proj)), str(config)
        tried += 1
    assert tried
    # Copies of the residual: where the tuned tiling cannot fold, the unfolded path adds into it in place.
    got, stream = rmsnorm_project(x, norm_weight, EPS, weight, None, residual.clone(), gated=True)
    proj, want_stream = rmsnorm_project(x, norm_weight, EPS, weight, None, residual.clone())
    assert torch.equal(got, silu_and_mul(proj)) and torch.equal(stream, want_stream)


@cuda
def test_gpu_rmsnorm_project_chain_in_a_cuda_graph():
    """A decode step's pattern: each call normalizes the stream the call before it updated (add + norm
    folded, PDL where supported), right after a torch kernel wrote its x; eagerly and replayed in a CUDA
    graph it must give the bits of the separate RMSNorm and projection kernels. Qwen3-0.6B's qkv_proj
    (no bias), whose M = 1 tuning gpu_pdl.sh's engines have already stored."""
    k, n, steps = 1024, 4096, 4
    x, stream0, norm_weight, weight, _ = norm_inputs(k, n, "cuda", seed=11)
    bias = None
    srcs = [x * (j + 1) for j in range(steps)]
    xs = [torch.empty_like(x) for _ in range(steps)]
    outs = []

    def chain(fold):
        stream, outs[:] = stream0.clone(), []
        for j in range(steps):
            torch.mul(srcs[j], 1.0, out=xs[j])
            if fold:
                out, stream = rmsnorm_project(xs[j], norm_weight, EPS, weight, bias, stream)
            else:
                normed, stream = add_rmsnorm(xs[j], stream, norm_weight, EPS)
                out = project(normed, weight, bias)
            outs.append(out)
        return [*outs, stream]
    want = [t.clone() for t in chain(fold=False)]
    assert fao._fold_config(x, weight, bias) is not None, "the tuner chose cuBLAS: nothing folded"
    assert all(torch.equal(g, w) for g, w in zip(chain(fold=True), want)), "eager"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(fold=True)
    for t in got:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(g, w) for g, w in zip(got, want)), "in a CUDA graph"


@cuda
@pytest.mark.parametrize("rows,warps", [(4, 4), (8, 4), (8, 8), (16, 8), (64, 4)])
def test_gpu_staged_gemv_on_ragged_shapes(rows, warps):
    """The staged gemv (one row; Hopper and Gluon) with N ragged against its rows and K against its boxes of
    256 (TMA zero-fills both): with bias and residual, alone (the product its fused call adds to), with the
    add + norm folded (the norm kernel's bits) and gated (the SiLU-and-mul kernel's bits)."""
    from nanovllm.kernels import staged_gemv
    from nanovllm.kernels.silu_and_mul import silu_and_mul
    if not staged_gemv.available(torch.empty(1, dtype=torch.bfloat16, device="cuda")):
        pytest.skip("the staged gemv needs Gluon and sm_90")
    for k, n in [(200, 96), (96, 200), (1000, 520), (2048, 1024)]:
        if not staged_gemv.fits(rows, warps, k):  # not a candidate (candidate_configs)
            continue
        config = KernelConfig("staged", 1, rows, staged_gemv.box_k(k), num_warps=warps, pdl=True)
        x, weight, residual, b = make_inputs(1, k, n, torch.bfloat16, device="cuda", bias=True, seed=k)
        out = launch(config, x, weight, residual, b, out=poisoned(1, n, torch.bfloat16, "cuda"))
        assert_matches_ref(out, x, weight, residual, b)
        assert torch.equal(launch(config, x, weight, None, b) + residual, out)
        x, residual, norm_weight, weight, _ = norm_inputs(k, 2 * n, "cuda", seed=k + 1)
        for add in (None, residual):
            want, want_stream = norm_then_project(config, x, add, norm_weight, weight, None)
            got, stream = folded(config, x, add, norm_weight, weight, None)
            assert torch.equal(got, want) and torch.equal(stream, want_stream), f"{config}, add {add is not None}"
        gated = launch(config, x, weight, None, None, out=poisoned(1, n, torch.bfloat16, "cuda"),
                       norm=FoldedNorm(norm_weight, EPS, residual, torch.empty_like(x)), gated=True)
        assert torch.equal(gated, silu_and_mul(folded(config, x, residual, norm_weight, weight, None)[0]))


def test_in_step_tuning_keeps_what_makes_the_step_fastest_and_recalls_it(tmp_path, monkeypatch):
    """tune_in_step tries each one-row PDL key's candidates by the step's time, the other keys fixed, keeps
    the fastest, leaves other keys alone, and remembers the joint choice: a later process (its own alone
    choices) recalls it without timing."""
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fao, "_BEST", {})
    monkeypatch.setattr(fao, "_IN_STEP", {})
    cpu = torch.device("cpu")
    keys = [(cpu, torch.bfloat16, 96, 200, False, 1, True, True), (cpu, torch.bfloat16, 64, 128, False, 1, True, False)]
    other = (cpu, torch.bfloat16, 96, 200, False, 8, True, True)  # M = 8: not in a batch-1 step
    a = KernelConfig("gemv", 1, 4, 64, use_dot=False, pdl=True)
    b = KernelConfig("staged", 1, 8, 256, num_warps=4, num_stages=2, pdl=True)
    monkeypatch.setattr(fao, "in_step_candidates", lambda key: [fao._BEST[key], *({a, b} - {fao._BEST[key]})])
    fao._BEST.update({keys[0]: a, keys[1]: b, other: a})
    timed = []

    def step_us():  # fastest with b for the first key and a for the second
        timed.append(dict(fao._BEST))
        return 1.0 + (fao._BEST[keys[0]] != b) + 0.5 * (fao._BEST[keys[1]] != a)
    assert fao.tune_in_step(cpu, step_us) == {keys[0]: b, keys[1]: a}
    assert fao._BEST[keys[0]] == b and fao._BEST[keys[1]] == a and fao._BEST[other] == a
    assert all(t[other] == a for t in timed) and len(timed) == 9  # the start, 2 keys x 2 candidates x 2 rounds
    for memo in ({}, fao._IN_STEP):  # a new process (the file), another engine of this one (memory too)
        monkeypatch.setattr(fao, "_IN_STEP", memo)
        fao._BEST.update({keys[0]: a, keys[1]: b})  # the alone choices
        assert fao.tune_in_step(cpu, lambda: pytest.fail("timed again")) == {keys[0]: b, keys[1]: a}
        assert fao._BEST[keys[0]] == b
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", "")  # no file: memory alone
    assert fao.tune_in_step(cpu, lambda: pytest.fail("timed again")) == {keys[0]: b, keys[1]: a}
    # The step of 8 seqs tunes its own keys (here one), and leaves batch 1's alone.
    assert fao.tune_in_step(cpu, lambda: 2.0 - (fao._BEST[other] == b), m=8) == {other: b}
    assert fao._BEST[keys[0]] == b and fao._BEST[keys[1]] == a
