"""Every decoder layer of a batch-1 decode step in one persistent kernel (Llama, Qwen2, Qwen3; one GPU).

At one token a layer is seven small kernels (benchmarks/NOTES-gpu.md), each a few microseconds of launch,
ramp and tail around a few MB of weights. Here one program per SM (up to 128) runs all layers, five stages
a layer, the programs meeting at a grid-wide barrier (a counter in global memory) between stages:

  A  qkv_proj of rmsnorm(x), the norm computed by every program (x is 2-8 KB), rows split over programs
  B  attention: program (kv head, chunk) takes its q heads' and its k head's q/k RMSNorm (Qwen3) and RoPE,
     the chunk's end stores the new k and v into the paged cache, and each chunk's softmax partials go out
  C  merge of the chunks' partials (every program, from L2), o_proj + residual into x, rows split
  D  gate_up_proj of rmsnorm(x) and SiLU-and-mul, columns split
  E  down_proj + residual into x, rows split

A program loads its weight tile for the next stage before it waits at the barrier, so the weights of one
stage stream from HBM while the grid synchronizes for it: what a kernel boundary would stall on, and what
PDL only half hides. Rounding follows the kernels of the layer-by-layer path (products rounded, then the
residual added and rounded; q, k and the attention output rounded to the model dtype), so the two paths
differ only in the order of fp32 sums.

The barrier needs every program resident at once: the grid is at most one program per SM, and the kernel
takes the whole GPU while it runs. A wait longer than the timeout ends the kernel with a trap, a CUDA
error instead of a hang. In the interpreter, programs run one after another, so it runs with one program
(that does every unit of every stage), which tests the arithmetic but not the barrier.
"""
from __future__ import annotations

import math

import torch

from nanovllm.kernels import jit

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton never launch it
    triton = tl = None

if triton is not None:
    from nanovllm.kernels.add_rmsnorm import rms_rstd
    from nanovllm.kernels.all_reduce import _fail_after, _now
    from nanovllm.kernels.fused_attention_output import _INTERPRET, _round

MAX_PROGRAMS = 128
BLOCK_N = 32  # keys per attention tile
MERGE_CHUNKS = 4  # chunk partials merged per step of stage C's loop
NUM_WARPS = 8
MIN_CHUNK = 32  # keys per attention chunk at least
TIMEOUT_S = 10.0  # a barrier that takes this long is a bug (or another kernel holds SMs): trap
# Per layer, the addresses the kernel reads: (slot, name)
POINTERS = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "post_norm", "gate_up", "down")


@jit
def _arrive(count_ptr, trace_ptr, INTERPRET: tl.constexpr, TRACE: tl.constexpr):
    """This program's arrival at the grid barrier: its stores (all its threads': the CTA barrier first) are
    published by the release add. A release waits for the issuing warp's loads in flight too, so a
    program issues the next stage's weight loads after arriving, not before."""
    tl.debug_barrier()
    if TRACE:
        tl.store(trace_ptr, _now(INTERPRET))
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")


@jit
def _wait(count_ptr, target, timeout_ns, trace_ptr, INTERPRET: tl.constexpr, TRACE: tl.constexpr):
    """Returns once `target` arrivals have been counted; the acquire read makes every program's stores
    visible to every thread here (the CTA barrier after). Traps after timeout_ns."""
    start = _now(INTERPRET)
    arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        _fail_after(start, timeout_ns, INTERPRET)
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    if TRACE:
        tl.store(trace_ptr + 1, _now(INTERPRET))


@jit
def _layer_ptr(table_ptr, layer, slot: tl.constexpr, like):
    """The address in table (L, len(POINTERS)) at (layer, slot) as a pointer of `like`'s type."""
    return tl.load(table_ptr + layer * 9 + slot).to(like.dtype, bitcast=True)


@jit
def _normed_x(x_ptr, nw_ptr, eps, H: tl.constexpr, H_P2: tl.constexpr, INTERPRET: tl.constexpr):
    """rmsnorm of the whole residual row x (H,), rounded to the model dtype as the norm kernel stores it,
    returned in fp32 (zero past H)."""
    offs = tl.arange(0, H_P2)
    x = tl.load(x_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)
    return _round(x * rms_rstd(x, H, eps) * nw, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)


@jit
def _my_rows(pid, n_rows, STEP: tl.constexpr, ROWS: tl.constexpr):
    """(ROWS,) program pid's row indices, -1 past its STEP rows and past n_rows."""
    r = pid * STEP + tl.arange(0, ROWS)
    return tl.where((tl.arange(0, ROWS) < STEP) & (r < n_rows), r, -1)


@jit
def _rows(w_ptr, pid, n_rows, STEP: tl.constexpr, ROWS: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr):
    """Program pid's rows [pid * STEP, (pid + 1) * STEP) of a row-major (n_rows, K) weight, as a (ROWS >=
    STEP, K_P2) tile, zero past them and past K."""
    r = _my_rows(pid, n_rows, STEP, ROWS)[:, None]
    k = tl.arange(0, K_P2)[None, :]
    return tl.load(w_ptr + r.to(tl.int64) * K + k, mask=(r >= 0) & (k < K), other=0.0)


@jit
def _prefetch_l2(ptr, nbytes, INTERPRET: tl.constexpr):
    """Asks L2 for nbytes (a multiple of 16) of contiguous memory at ptr (16-byte aligned): one TMA bulk
    prefetch per thread of the program, none waited for."""
    if not INTERPRET:
        piece = tl.cdiv(tl.cdiv(nbytes, 256), 16) * 16
        offs = tl.arange(0, 256) * piece
        size = tl.minimum(tl.maximum(nbytes - offs, 0), piece).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; } mov.u32 $0, 0;",
            "=r,l,r", [ptr.to(tl.pointer_type(tl.int8), bitcast=True) + offs, size], dtype=tl.int32,
            is_pure=False, pack=1)


@jit
def _prefetch_layer(table_ptr, layer, pid, like, n_qkv, H: tl.constexpr, NH: tl.constexpr, D: tl.constexpr,
                    I: tl.constexpr, STEP_QKV: tl.constexpr, STEP_H: tl.constexpr,  # noqa: E741
                    STEP_I: tl.constexpr, INTERPRET: tl.constexpr):
    """This program's slices of one layer's weights into L2: what its stages will load."""
    esize: tl.constexpr = like.dtype.element_ty.primitive_bitwidth // 8
    r = tl.minimum(pid * STEP_QKV, n_qkv)
    _prefetch_l2(_layer_ptr(table_ptr, layer, 1, like) + r * H, (tl.minimum(r + STEP_QKV, n_qkv) - r) * H * esize,
                 INTERPRET)
    r = tl.minimum(pid * STEP_H, H)
    n = tl.minimum(r + STEP_H, H) - r
    _prefetch_l2(_layer_ptr(table_ptr, layer, 5, like) + r * (NH * D), n * NH * D * esize, INTERPRET)
    _prefetch_l2(_layer_ptr(table_ptr, layer, 8, like) + r * I, n * I * esize, INTERPRET)
    r = tl.minimum(pid * STEP_I, I)
    n = tl.minimum(r + STEP_I, I) - r
    _prefetch_l2(_layer_ptr(table_ptr, layer, 7, like) + r * H, n * H * esize, INTERPRET)
    _prefetch_l2(_layer_ptr(table_ptr, layer, 7, like) + (I + r) * H, n * H * esize, INTERPRET)


@jit
def _matvec(w, v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """round(w (R, K) @ v (K,) fp32) in fp32: a projection's product as its kernel stores it."""
    return _round(tl.sum(w.to(tl.float32) * v[None, :], 1), dtype, INTERPRET).to(tl.float32)


@jit
def _norm_rope(x1, x2, nw_ptr, cos, sin, eps, D: tl.constexpr, QK_NORM: tl.constexpr, INTERPRET: tl.constexpr):
    """Qwen3's per-head RMSNorm (optional) and neox RoPE of heads given as halves (G, D/2), fp32; the result
    rounded to the model dtype (as the RoPE kernel stores q and k), in fp32."""
    if QK_NORM:
        offs = tl.arange(0, D // 2)[None, :]
        w1 = tl.load(nw_ptr + offs).to(tl.float32)
        w2 = tl.load(nw_ptr + D // 2 + offs).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
        x1, x2 = x1 * rstd * w1, x2 * rstd * w2
    r1 = _round(x1 * cos - x2 * sin, nw_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    r2 = _round(x2 * cos + x1 * sin, nw_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    return r1, r2


@jit
def _kv_tile(k_cache, v_cache, table_ptr, t0, end, kv_head, stride_cb, stride_cs, stride_ch,
             D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys (two (BLOCK_N, D/2) halves) and values (BLOCK_N, D) of tokens [t0, t0 + BLOCK_N), zero from end."""
    toks = t0 + tl.arange(0, BLOCK_N)[:, None]
    live = toks < end
    blocks = tl.load(table_ptr + toks // PAGE, mask=live, other=0).to(tl.int64)
    at = blocks * stride_cb + (toks % PAGE) * stride_cs + kv_head * stride_ch
    half = tl.arange(0, D // 2)[None, :]
    k1 = tl.load(k_cache + at + half, mask=live, other=0.0)
    k2 = tl.load(k_cache + at + D // 2 + half, mask=live, other=0.0)
    return k1, k2, tl.load(v_cache + at + tl.arange(0, D)[None, :], mask=live, other=0.0)


@jit
def _softmax_step(q1, q2, k1, k2, v, live, m, den, acc, scale_log2):
    """Online softmax over one tile of keys: q halves (G, D/2), k halves (N, D/2), v (N, D), live (1, N);
    running max m and denominator den (G,), acc (G, D), in the log2 domain."""
    s = (tl.sum(q1[:, None, :] * k1.to(tl.float32)[None, :, :], 2)
         + tl.sum(q2[:, None, :] * k2.to(tl.float32)[None, :, :], 2))
    s = tl.where(live, s * scale_log2, -float("inf"))  # (G, N)
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    return m_new, den * alpha + tl.sum(p, 1), acc


@jit
def _attend_chunk(qkv_ptr, nw_q, nw_k, k_cache, v_cache, table_ptr, cos, sin, o_part_ptr, lse_part_ptr,
                  k1, k2, v, kv_head, chunk, start, end, ctx_len, slot, eps, scale_log2,
                  stride_cb, stride_cs, stride_ch, NH: tl.constexpr, NKV: tl.constexpr, G: tl.constexpr,
                  G_P2: tl.constexpr, D: tl.constexpr, NC: tl.constexpr, PAGE: tl.constexpr,
                  QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Stage B for one (KV head, chunk of keys [start, end)): softmax partials of its G query heads into
    o_part (NH, NC, D) (normalized) and lse_part (NH, NC) (log2 domain). (k1, k2, v): the chunk's first
    tile of cached keys, loaded before the barrier. The chunk holding the new token (end == ctx_len) takes
    it from qkv, attends to it from registers and stores it into the cache."""
    half = tl.arange(0, D // 2)[None, :]
    g = tl.arange(0, G_P2)[:, None]
    q_ptrs = qkv_ptr + (kv_head * G + g) * D + half
    q1, q2 = _norm_rope(tl.load(q_ptrs, mask=g < G, other=0.0).to(tl.float32),
                        tl.load(q_ptrs + D // 2, mask=g < G, other=0.0).to(tl.float32), nw_q, cos, sin, eps, D,
                        QK_NORM, INTERPRET)
    old_end = tl.minimum(end, ctx_len - 1)  # the cache holds every key before the new token's
    m = tl.full([G_P2], -float("inf"), tl.float32)
    den = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, D], tl.float32)
    for t0 in range(start, old_end, BLOCK_N):
        if t0 > start:  # the first tile came before the barrier
            k1, k2, v = _kv_tile(k_cache, v_cache, table_ptr, t0, old_end, kv_head, stride_cb, stride_cs,
                                 stride_ch, D, PAGE, BLOCK_N)
        live = (t0 + tl.arange(0, BLOCK_N) < old_end)[None, :]
        m, den, acc = _softmax_step(q1, q2, k1, k2, v, live, m, den, acc, scale_log2)
    if end == ctx_len:
        k_ptrs = qkv_ptr + (NH + kv_head) * D + half
        nk1, nk2 = _norm_rope(tl.load(k_ptrs).to(tl.float32), tl.load(k_ptrs + D // 2).to(tl.float32), nw_k,
                              cos, sin, eps, D, QK_NORM, INTERPRET)
        nv = tl.load(qkv_ptr + (NH + NKV + kv_head) * D + tl.arange(0, D)[None, :])  # (1, D)
        m, den, acc = _softmax_step(q1, q2, nk1, nk2, nv, tl.full([1, 1], 1, tl.int1), m, den, acc, scale_log2)
        at = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + kv_head * stride_ch
        tl.store(k_cache + at + half, nk1.to(k_cache.dtype.element_ty))
        tl.store(k_cache + at + D // 2 + half, nk2.to(k_cache.dtype.element_ty))
        tl.store(v_cache + at + tl.arange(0, D)[None, :], nv)
    row = (kv_head * G + g) * NC + chunk  # (G_P2, 1)
    tl.store(o_part_ptr + row * D + tl.arange(0, D)[None, :], acc / den[:, None], mask=g < G)
    tl.store(lse_part_ptr + tl.reshape(row, (G_P2,)), m + tl.log2(den), mask=tl.reshape(g < G, (G_P2,)))


@jit
def _merged_attention(o_part_ptr, lse_part_ptr, n_chunks, dtype: tl.constexpr, NH: tl.constexpr,
                      NH_P2: tl.constexpr, D: tl.constexpr, NC: tl.constexpr, MERGE: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Stage C's input: every head's chunks merged, (NH_P2 * D,) fp32 of values rounded to the model dtype
    (zero past NH), as the attention kernel stores its output."""
    h = tl.arange(0, NH_P2)[:, None]
    d = tl.arange(0, D)[None, None, :]
    m = tl.full([NH_P2], -float("inf"), tl.float32)
    den = tl.zeros([NH_P2], tl.float32)
    acc = tl.zeros([NH_P2, D], tl.float32)
    for c0 in range(0, n_chunks, MERGE):
        c = c0 + tl.arange(0, MERGE)[None, :]
        live = (h < NH) & (c < n_chunks)  # (NH_P2, MERGE)
        lse = tl.load(lse_part_ptr + h * NC + c, mask=live, other=-float("inf"))
        o = tl.load(o_part_ptr + (h * NC + c)[:, :, None] * D + d, mask=live[:, :, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # padded heads: no chunk at all
        w = tl.exp2(lse - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m = m_new
    out = _round(acc / tl.maximum(den, 1e-30)[:, None], dtype, INTERPRET).to(tl.float32)
    return tl.reshape(out, (NH_P2 * D,))


@jit(do_not_specialize=["timeout_ns"])
def _decode_layers_kernel(
        x_ptr, embed_ptr, ids_ptr, table_ptr, k_cache_ptr, v_cache_ptr, cos_sin_ptr, positions_ptr,
        slots_ptr, ctx_lens_ptr, block_table_ptr, qkv_ptr, o_part_ptr, lse_part_ptr, act_ptr, count_ptr,
        trace_ptr, eps, scale_log2, timeout_ns, stride_cl, stride_cb, stride_cs, stride_ch, stride_cos,
        L: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr, NH: tl.constexpr, NH_P2: tl.constexpr,
        NKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, I: tl.constexpr,  # noqa: E741
        I_P2: tl.constexpr, P: tl.constexpr, STEP_QKV: tl.constexpr, ROWS_QKV: tl.constexpr,
        STEP_H: tl.constexpr, ROWS_H: tl.constexpr, STEP_I: tl.constexpr, ROWS_I: tl.constexpr,
        NC: tl.constexpr, MIN_CHUNK: tl.constexpr, PAGE: tl.constexpr, HAS_BIAS: tl.constexpr,
        QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr, L2_STAGING: tl.constexpr,
        TRACE: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (P,): see the module docstring. Program pid owns STEP_QKV rows of qkv_proj, STEP_H rows of the
    residual stream x (o_proj's and down_proj's) and STEP_I columns of the MLP, each as a power-of-two
    tile of ROWS_*; and attention unit pid, (KV head pid % NKV, chunk pid // NKV), for pid < NKV * NC.
    x (1, H) ends as the residual stream after the last layer."""
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    n_qkv = (NH + 2 * NKV) * D
    ctx_len = tl.load(ctx_lens_ptr)
    slot = tl.load(slots_ptr)
    pos = tl.load(positions_ptr)
    half = tl.arange(0, D // 2)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cos + half).to(tl.float32)  # (1, D/2)
    sin = tl.load(cos_sin_ptr + pos * stride_cos + D // 2 + half).to(tl.float32)
    # Attention chunks: MIN_CHUNK keys at least (a multiple of BLOCK_N), at most NC per KV head; a padded
    # row (context 0, slot -1) has none and stores nothing.
    chunk_len = tl.maximum(tl.cdiv(tl.cdiv(ctx_len, NC), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    n_chunks = tl.cdiv(ctx_len, chunk_len)
    embed_row = embed_ptr + tl.load(ids_ptr) * H
    rows_qkv = _my_rows(pid, n_qkv, STEP_QKV, ROWS_QKV)
    rows_h = _my_rows(pid, H, STEP_H, ROWS_H)
    cols = _my_rows(pid, I, STEP_I, ROWS_I)
    tl.store(x_ptr + rows_h, tl.load(embed_row + rows_h, mask=rows_h >= 0), mask=rows_h >= 0)
    if L2_STAGING:
        _prefetch_layer(table_ptr, 0, pid, x_ptr, n_qkv, H, NH, D, I, STEP_QKV, STEP_H, STEP_I, INTERPRET)
    else:
        w_qkv = _rows(_layer_ptr(table_ptr, 0, 1, x_ptr), pid, n_qkv, STEP_QKV, ROWS_QKV, H, H_P2)
    trace_ptr += pid * 10 * L  # (5 L, 2) per program: (arrival, departure) at barrier s; s = 0: (start, end)
    if TRACE:
        tl.store(trace_ptr, _now(INTERPRET))
    kv_head, chunk = pid % NKV, pid // NKV  # this program's attention unit (P > 1)
    stage = 0
    for layer in range(L):
        # A: qkv_proj(rmsnorm(x)); in layer 0 x is the embedding row (the stores above are this program's
        # rows only, not yet everyone's)
        if L2_STAGING:  # the next layer's weights stream into L2 while this one runs from there
            if layer + 1 < L:
                _prefetch_layer(table_ptr, layer + 1, pid, x_ptr, n_qkv, H, NH, D, I, STEP_QKV, STEP_H, STEP_I,
                                INTERPRET)
            w_qkv = _rows(_layer_ptr(table_ptr, layer, 1, x_ptr), pid, n_qkv, STEP_QKV, ROWS_QKV, H, H_P2)
        xn = _normed_x(tl.where(layer == 0, embed_row, x_ptr), _layer_ptr(table_ptr, layer, 0, x_ptr), eps,
                       H, H_P2, INTERPRET)
        acc = tl.sum(w_qkv.to(tl.float32) * xn[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(_layer_ptr(table_ptr, layer, 2, x_ptr) + rows_qkv, mask=rows_qkv >= 0).to(tl.float32)
        tl.store(qkv_ptr + rows_qkv, _round(acc, dtype, INTERPRET), mask=rows_qkv >= 0)
        stage += 1
        _arrive(count_ptr, trace_ptr + 2 * stage, INTERPRET, TRACE)
        # Before the wait: this program's first tile of cached keys.
        k_cache = k_cache_ptr + tl.cast(layer, tl.int64) * stride_cl
        v_cache = v_cache_ptr + tl.cast(layer, tl.int64) * stride_cl
        start = chunk * chunk_len
        end = tl.minimum(start + chunk_len, ctx_len)
        k1, k2, v = _kv_tile(k_cache, v_cache, block_table_ptr, start, tl.minimum(end, ctx_len - 1), kv_head,
                             stride_cb, stride_cs, stride_ch, D, PAGE, BLOCK_N)
        _wait(count_ptr, stage * P, timeout_ns, trace_ptr + 2 * stage, INTERPRET, TRACE)
        # B: attention, one (KV head, chunk) per program (all of them, one after another, if P == 1)
        for unit in range(pid, NKV * NC, P):
            if P == 1:
                kv_head, chunk = unit % NKV, unit // NKV
                start = chunk * chunk_len
                end = tl.minimum(start + chunk_len, ctx_len)
                k1, k2, v = _kv_tile(k_cache, v_cache, block_table_ptr, start, tl.minimum(end, ctx_len - 1),
                                     kv_head, stride_cb, stride_cs, stride_ch, D, PAGE, BLOCK_N)
            if chunk < n_chunks:
                _attend_chunk(qkv_ptr, _layer_ptr(table_ptr, layer, 3, x_ptr),
                              _layer_ptr(table_ptr, layer, 4, x_ptr), k_cache, v_cache, block_table_ptr, cos, sin,
                              o_part_ptr, lse_part_ptr, k1, k2, v, kv_head, chunk, start, end, ctx_len, slot, eps,
                              scale_log2, stride_cb, stride_cs, stride_ch, NH, NKV, G, G_P2, D, NC, PAGE,
                              QK_NORM, BLOCK_N, INTERPRET)
        stage += 1
        _arrive(count_ptr, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if not L2_STAGING:
            w_o = _rows(_layer_ptr(table_ptr, layer, 5, x_ptr), pid, H, STEP_H, ROWS_H, NH * D, NH_P2 * D)
        res = tl.load(x_ptr + rows_h, mask=rows_h >= 0, other=0.0).to(tl.float32)  # own rows, stored earlier
        _wait(count_ptr, stage * P, timeout_ns, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if L2_STAGING:
            w_o = _rows(_layer_ptr(table_ptr, layer, 5, x_ptr), pid, H, STEP_H, ROWS_H, NH * D, NH_P2 * D)
        # C: o_proj(attention) + residual
        attn = _merged_attention(o_part_ptr, lse_part_ptr, n_chunks, dtype, NH, NH_P2, D, NC, MERGE, INTERPRET)
        o = _matvec(w_o, attn, dtype, INTERPRET)
        tl.store(x_ptr + rows_h, _round(o + res, dtype, INTERPRET), mask=rows_h >= 0)
        stage += 1
        _arrive(count_ptr, trace_ptr + 2 * stage, INTERPRET, TRACE)
        w_gate_up = _layer_ptr(table_ptr, layer, 7, x_ptr)
        if not L2_STAGING:
            w_gate = _rows(w_gate_up, pid, I, STEP_I, ROWS_I, H, H_P2)
            w_up = _rows(w_gate_up + I * H, pid, I, STEP_I, ROWS_I, H, H_P2)
        _wait(count_ptr, stage * P, timeout_ns, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if L2_STAGING:
            w_gate = _rows(w_gate_up, pid, I, STEP_I, ROWS_I, H, H_P2)
            w_up = _rows(w_gate_up + I * H, pid, I, STEP_I, ROWS_I, H, H_P2)
        # D: silu(gate) * up of gate_up_proj(rmsnorm(x)), each product rounded first
        xn = _normed_x(x_ptr, _layer_ptr(table_ptr, layer, 6, x_ptr), eps, H, H_P2, INTERPRET)
        gate = _matvec(w_gate, xn, dtype, INTERPRET)
        up = _matvec(w_up, xn, dtype, INTERPRET)
        tl.store(act_ptr + cols, _round(gate * tl.sigmoid(gate) * up, dtype, INTERPRET), mask=cols >= 0)
        res = tl.load(x_ptr + rows_h, mask=rows_h >= 0, other=0.0).to(tl.float32)
        stage += 1
        _arrive(count_ptr, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if not L2_STAGING:
            w_down = _rows(_layer_ptr(table_ptr, layer, 8, x_ptr), pid, H, STEP_H, ROWS_H, I, I_P2)
        _wait(count_ptr, stage * P, timeout_ns, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if L2_STAGING:
            w_down = _rows(_layer_ptr(table_ptr, layer, 8, x_ptr), pid, H, STEP_H, ROWS_H, I, I_P2)
        # E: down_proj(act) + residual
        offs_i = tl.arange(0, I_P2)
        act = tl.load(act_ptr + offs_i, mask=offs_i < I, other=0.0).to(tl.float32)
        tl.store(x_ptr + rows_h, _round(_matvec(w_down, act, dtype, INTERPRET) + res, dtype, INTERPRET),
                 mask=rows_h >= 0)
        if layer + 1 < L:
            stage += 1
            _arrive(count_ptr, trace_ptr + 2 * stage, INTERPRET, TRACE)
        if not L2_STAGING:  # the next layer's (none after the last: a conditional load would keep this one)
            w_qkv = _rows(_layer_ptr(table_ptr, tl.minimum(layer + 1, L - 1), 1, x_ptr), pid,
                          tl.where(layer + 1 < L, n_qkv, 0), STEP_QKV, ROWS_QKV, H, H_P2)
        if layer + 1 < L:
            _wait(count_ptr, stage * P, timeout_ns, trace_ptr + 2 * stage, INTERPRET, TRACE)
    if TRACE:
        tl.store(trace_ptr + 1, _now(INTERPRET))
    # The last program out resets the counter for the next launch.
    if tl.atomic_add(count_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
        tl.atomic_xchg(count_ptr, 0)
        tl.atomic_xchg(count_ptr + 1, 0)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a LlamaModel (Llama, Qwen2, Qwen3) cannot run its one-token decode step here, or None."""
    layers = getattr(model, "layers", None)
    if not layers:
        return "not a decoder stack"
    attn, mlp = layers[0].self_attn, layers[0].mlp
    if attn.qkv_proj.tp_size != 1:
        return "tensor parallelism"
    if attn.o_proj.bias is not None or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
        return "a bias outside qkv_proj"
    if attn.head_dim & (attn.head_dim - 1) or attn.head_dim < 16:
        return f"head_dim {attn.head_dim} is not a power of two >= 16"
    if attn.rotary_emb.cos_sin_cache.shape[-1] != attn.head_dim:
        return "partial rotary embedding"
    if model.embed_tokens.weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {model.embed_tokens.weight.dtype}"
    return None


class DecodeLayers:
    """The kernel for one model: its per-layer weight addresses, scratch buffers and launch constants.

    Built once the KV cache exists (k_cache, v_cache: (L, num_blocks, block_size, Hkv, D)); it keeps the
    weights' addresses, so the model's parameters must not be replaced afterwards. `programs` defaults to
    one per SM (at most MAX_PROGRAMS); the interpreter takes one. `chunks` (attention chunks per KV head at
    most, default programs // Hkv) and `block_n` (keys per tile) exist for the tests, `num_warps` for the
    benchmark.
    """

    def __init__(self, model: torch.nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 programs: int | None = None, timeout_s: float = TIMEOUT_S, chunks: int | None = None,
                 block_n: int = BLOCK_N, num_warps: int = NUM_WARPS, min_chunk: int = MIN_CHUNK,
                 l2_staging: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the one-kernel decode step does not support this model: {reason}")
        layers, device = model.layers, k_cache.device
        attn, mlp = layers[0].self_attn, layers[0].mlp
        # Not the model itself: it holds this object, and a cycle would keep a closed engine's model alive.
        self.embed, self.num_layers = model.embed_tokens.weight, len(layers)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.hidden, self.inter = model.embed_tokens.weight.shape[1], mlp.down_proj.weight.shape[1]
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.eps, self.qk_norm = layers[0].input_layernorm.eps, attn.q_norm is not None
        self.has_bias = attn.qkv_proj.bias is not None
        self.rotary = attn.rotary_emb
        if programs is None:
            programs = 1 if _INTERPRET else min(MAX_PROGRAMS, torch.cuda.get_device_properties(device)
                                                .multi_processor_count)
        self.programs, self.timeout_s = programs, timeout_s
        rows = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            tensors = (layer.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias,
                       a.q_norm.weight if self.qk_norm else None, a.k_norm.weight if self.qk_norm else None,
                       a.o_proj.weight, layer.post_attention_layernorm.weight, m.gate_up_proj.weight,
                       m.down_proj.weight)
            assert all(t is None or (t.is_contiguous() and t.dtype == k_cache.dtype) for t in tensors)
            rows.append([0 if t is None else t.data_ptr() for t in tensors])
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)  # (L, len(POINTERS))
        self.chunks = chunks or max(1, programs // self.num_kv_heads)
        self.block_n, self.num_warps = block_n, num_warps if programs > 1 else 4
        self.min_chunk = triton.cdiv(min_chunk, block_n) * block_n
        self.l2_staging = l2_staging
        n_qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        dtype = k_cache.dtype
        self.x = torch.zeros(1, self.hidden, dtype=dtype, device=device)
        self.qkv = torch.empty(n_qkv, dtype=dtype, device=device)
        self.act = torch.empty(self.inter, dtype=dtype, device=device)
        self.o_part = torch.empty(self.num_heads, self.chunks, self.head_dim, dtype=torch.float32, device=device)
        self.lse_part = torch.empty(self.num_heads, self.chunks, dtype=torch.float32, device=device)
        self.count = torch.zeros(2, dtype=torch.int32, device=device)  # barrier arrivals, programs done
        self.trace = None  # (programs, 5 L, 2) int64 to record each barrier's (arrival, departure) ns

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 context_lens: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """One token: input_ids, positions, slot_mapping (1,) int64; context_lens (1,) int32 (the new token
        included); block_table (max_blocks,) int32. Returns the residual stream after the last layer, (1,
        hidden) in the model dtype (a buffer this object reuses)."""
        p2 = triton.next_power_of_2
        p, (h, i, nh, nkv, d) = self.programs, (self.hidden, self.inter, self.num_heads, self.num_kv_heads,
                                                self.head_dim)
        n_qkv = (nh + 2 * nkv) * d
        cache, cos_sin = self.k_cache, self.rotary.cos_sin_cache
        assert self.v_cache.stride() == cache.stride() and cache.stride(-1) == 1 and cos_sin.stride(-1) == 1
        trace = self.trace if self.trace is not None else self.count  # (not read without TRACE)
        _decode_layers_kernel[(p,)](
            self.x, self.embed, input_ids, self.table, cache, self.v_cache, cos_sin, positions, slot_mapping,
            context_lens, block_table, self.qkv, self.o_part, self.lse_part, self.act, self.count, trace,
            self.eps, self.head_dim ** -0.5 * math.log2(math.e), int(self.timeout_s * 1e9),
            *cache.stride()[:4], cos_sin.stride(0),
            L=self.num_layers, H=h, H_P2=p2(h), NH=nh, NH_P2=p2(nh), NKV=nkv, G=nh // nkv,
            G_P2=p2(nh // nkv), D=d, I=i, I_P2=p2(i), P=p, **_split("QKV", n_qkv, p), **_split("H", h, p),
            **_split("I", i, p), NC=self.chunks, MIN_CHUNK=self.min_chunk, PAGE=cache.shape[2],
            HAS_BIAS=self.has_bias, QK_NORM=self.qk_norm, BLOCK_N=self.block_n, MERGE=MERGE_CHUNKS,
            L2_STAGING=self.l2_staging,
            TRACE=self.trace is not None,
            INTERPRET=_INTERPRET, num_warps=self.num_warps,
        )
        return self.x


def _split(name: str, n: int, programs: int) -> dict:
    """A program's share of n rows (STEP_name) and the power-of-two tile holding it (ROWS_name)."""
    step = triton.cdiv(n, programs)
    return {f"STEP_{name}": step, f"ROWS_{name}": triton.next_power_of_2(step)}
