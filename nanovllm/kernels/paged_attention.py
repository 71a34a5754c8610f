"""Causal attention over the paged KV cache: flash-decoding for decode steps, a varlen kernel otherwise.

Both kernels read K/V straight from the cache through the block table, so chunked prefill and prefix-cache
hits need no gather. Layout (docs/design.md): q (T, H, D); k_cache, v_cache (num_blocks, block_size, Hkv, D);
block_tables (B, max_blocks) int32 padded with -1; cu_seqlens_q (B+1,) int32; context_lens (B,) int32;
seq_order (B,) int32, optional: the decode kernel's order of seqs (longest first: see _decode_kernel).
Query i of a seq sits at position context_len - q_len + i and sees keys at positions <= its own.
One program serves all H // Hkv query heads of a KV head (GQA), so each K/V tile is read once per group.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous
from nanovllm.kernels.rope_kv_store import halves, norm_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use paged_attention_ref
    triton = tl = None

LOG2E = 1.4426950408889634


class NewTokenRope(NamedTuple):
    """What rope_kv_store.rope_and_store_kv does to a decode step's new tokens, for the decode kernel to do
    itself: q (given to paged_attention) and k as projected get Qwen3's per-head RMSNorm (with the norm
    weights) and RoPE at position context_len - 1; k and v go into the cache at slot_mapping. k, v (T, Hkv,
    D); the rest as rope_and_store_kv takes them."""
    k: torch.Tensor
    v: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    eps: float


def rope_in_decode(num_seqs: int) -> bool:
    """Whether a decode step of num_seqs seqs hands RoPE + KV store to the decode kernel (NewTokenRope): where
    that was faster on an H100 at 144 and at 1,040 keys (results/decode_rope-h100.json, bench_decode_rope.py),
    at 1 seq (-0.8 to -1.9 %) and at 8-32 (-2.2 to -3.1 %). At 2-4 seqs it gained nothing, and from 64 on it
    lost at long contexts, where the split's tiles loop in halves. NANOVLLM_DECODE_ROPE (read per call): 0 never,
    all in every decode step."""
    setting = os.environ.get("NANOVLLM_DECODE_ROPE", "1")
    return setting == "all" or (setting != "0" and (num_seqs == 1 or 8 <= num_seqs <= 32))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        max_q_len: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch reference (fp32 math): gathers each seq's K/V from its blocks and runs masked softmax."""
    out = torch.empty_like(q) if out is None else out
    num_heads, (_, block_size, num_kv_heads, _) = q.shape[1], k_cache.shape
    cu, ctx_lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, ctx_len in enumerate(ctx_lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        blocks = block_tables[b, :(ctx_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx_len].float()  # (ctx_len, Hkv, D)
        v = v_cache[blocks].flatten(0, 1)[:ctx_len].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (ctx_len, H, D)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[cu[b]:cu[b + 1]].float(), k) * scale  # (H, q_len, ctx_len)
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        future = torch.arange(ctx_len, device=q.device)[None, :] > q_pos[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    max_q_len: int, scale: float, out: torch.Tensor | None = None,
                    num_kv_splits: int | None = None, seq_order: torch.Tensor | None = None,
                    rope: NewTokenRope | None = None) -> torch.Tensor:
    """Returns out (T, H, D) in q's dtype. No host sync: safe inside a CUDA graph when the shapes are fixed.

    max_q_len == 1 takes the decode kernel, whose KV-split count (num_kv_splits, default from the shapes
    alone) is a compile-time constant; any other batch takes the varlen kernel. seq_order, a permutation
    of the seqs, changes only when each seq's programs start, never the result. rope (decode only): q is as
    projected and the new tokens' k and v are not in the cache yet; the decode kernel applies the q/k norm
    and RoPE and stores k and v (q itself is left as it was).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    if max_q_len == 1:
        if num_kv_splits is None:
            num_kv_splits = default_num_kv_splits(context_lens.shape[0], num_kv_heads,
                                                   block_tables.shape[1] * k_cache.shape[1], q.device)
        _decode(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out, num_kv_splits,
                seq_order, rope=rope)
    else:
        assert rope is None, "only the decode kernel applies RoPE itself"
        _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out)
    return out


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 callers asked for fp32: keep tl.dot off tf32 (10-bit mantissa); 16-bit inputs use the MMA as is.
    return "ieee" if q.dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_num_kv_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    # Small batches are latency-bound: ~3 programs per SM with >= 64 keys each was best on an H100
    # (benchmarks/NOTES-kernels.md); large batches fill the GPU alone and skip the reduce. max_kv_len is
    # the block table's width, so a graph captured at a fixed width keeps its split count.
    wanted = triton.cdiv(3 * _num_sms(device), batch * num_kv_heads)
    return max(1, min(wanted, max_kv_len // 64, 32))


def _decode_warps_stages(batch: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the decode kernel, timed inside the decode graphs on an H100
    (benchmarks/bench_decode_launch.py). At a few seqs a program has one or two key tiles, and what costs is
    its chain of dependent steps after the PDL wait, not its loop: 8 warps and no pipelining took the
    batch-1 step from 754 to 691 µs at 144 keys and from 793 to 723 at 1,000 (no worse at 8,000), though
    alone the kernel prefers 4 warps and 3 stages (NOTES-kernels.md). From batch 8 up 8 warps lose (+16 %
    at 256) and 2 stages edge out 3 (~1 %). Two variants in all, both compiled when the graphs are captured."""
    return (8, 1) if batch <= 4 else (4, 2)


def _decode(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out, num_splits,
            seq_order=None, block_n=None, num_warps=None, num_stages=None, rope=None):
    batch, (_, num_heads, head_dim) = context_lens.shape[0], q.shape
    if num_warps is None:
        num_warps, num_stages = _decode_warps_stages(batch)
    num_kv_heads, group = k_cache.shape[2], num_heads // k_cache.shape[2]
    if num_splits > 1:  # fp32 partial outputs and log-sum-exps, merged by the reduce kernel
        partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        dst, dst_strides = partial, (partial.stride(0), partial.stride(1), partial.stride(2))
    else:
        lse, dst, dst_strides = out, out, (out.stride(0), out.stride(1), 0)  # lse unused with one split
    pdl = pdl_enabled(q.device, q.shape[0])
    has_norm = rope is not None and rope.q_norm_weight is not None
    if rope is not None:
        assert head_dim % 2 == 0 and rope.k.stride(-1) == rope.v.stride(-1) == 1
        assert has_norm == (rope.k_norm_weight is not None), "q and k norms come together (Qwen3)"
        new_kv = (rope.k, rope.v, rope.cos_sin_cache, rope.slot_mapping, rope.q_norm_weight if has_norm else q,
                  rope.k_norm_weight if has_norm else q, rope.eps, rope.k.stride(0), rope.k.stride(1),
                  rope.v.stride(0), rope.v.stride(1), rope.cos_sin_cache.stride(0))
    else:  # unused: the kernel's ROPE branches are compiled out
        new_kv = (q, q, q, context_lens, q, q, 0.0, 0, 0, 0, 0, 0)
    _decode_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
        context_lens if seq_order is None else seq_order, dst, lse, scale * LOG2E, *new_kv,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        *dst_strides, lse.stride(0), lse.stride(1), ROPE=rope is not None, HAS_NORM=has_norm,
        BLOCK_HALF=max(16, triton.next_power_of_2(head_dim // 2)),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1], NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n or (64 if q.is_cuda else 16), UPCAST=not q.is_cuda, PRECISION=_dot_precision(q),
        ORDERED=seq_order is not None, PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            partial, lse, out, cu_seqlens_q, partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl,
            launch_pdl=pdl,
        )


def _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out,
             block_m=None, block_n=None, num_warps=4):
    num_tokens, num_heads, head_dim = q.shape
    batch, num_kv_heads, group = context_lens.shape[0], k_cache.shape[2], num_heads // k_cache.shape[2]
    block_m = max(block_m or (64 if q.is_cuda else 32), triton.next_power_of_2(group))
    block_q = block_m // group  # query tokens per program; rows are (token, head-in-group) pairs
    # A seq's q-blocks start at cu_seqlens_q[s] // block_q + s, so this grid bounds them all without a sync.
    grid = (num_tokens // block_q + batch, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale * LOG2E, batch,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n or (64 if q.is_cuda else 16),
        UPCAST=not q.is_cuda, PRECISION=_dot_precision(q), num_warps=num_warps,
    )


@jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE: tl.constexpr):
    """K and V (BLOCK_N, BLOCK_D) of the keys at positions pos, looked up through the block table."""
    page = tl.load(table_row_ptr + pos // PAGE_SIZE, mask=pos_mask, other=0).to(tl.int64)
    return _load_kv_pages(k_cache_ptr, v_cache_ptr, page, pos, pos_mask, kv_head, offs_d, d_mask,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE)


@jit
def _load_kv_pages(k_cache_ptr, v_cache_ptr, page, pos, pos_mask, kv_head, offs_d, d_mask,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE: tl.constexpr):
    """K and V (BLOCK_N, BLOCK_D) of the keys at positions pos in their pages (int64, from the block
    table); zero where pos_mask is off."""
    slot = pos % PAGE_SIZE
    mask = pos_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@jit
def _load_halves_pages(k_cache_ptr, v_cache_ptr, page, pos, pos_mask, kv_head, offs_h, offs_d, d_mask,
                       stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr):
    """_load_kv_pages with K as its halves along D (BLOCK_N, BLOCK_HALF) each, as RoPE pairs them."""
    k_rows = k_cache_ptr + page[:, None] * stride_kb + (pos % PAGE_SIZE)[:, None] * stride_ks + kv_head * stride_kh
    mask = pos_mask[:, None] & (offs_h < HEAD_DIM // 2)[None, :]
    k1 = tl.load(k_rows + offs_h[None, :], mask=mask, other=0.0)
    k2 = tl.load(k_rows + HEAD_DIM // 2 + offs_h[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + page[:, None] * stride_vb + (pos % PAGE_SIZE)[:, None] * stride_vs
                + kv_head * stride_vh + offs_d[None, :], mask=pos_mask[:, None] & d_mask[None, :], other=0.0)
    return k1, k2, v


@jit
def _softmax_step(q, k, v, s_mask, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update (base 2) of rows q (M, D) with a K/V tile (N, D); s_mask (M, N)."""
    if UPCAST:  # the interpreter does bf16 math on raw bits, so everything goes through fp32 there
        k = k.to(tl.float32)
    return _softmax_update(tl.dot(q, tl.trans(k), input_precision=PRECISION), v, s_mask, m_i, l_i, acc, qk_scale,
                           UPCAST, PRECISION)


@jit
def _softmax_step_halves(q1, q2, k1, k2, v, s_mask, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr):
    """_softmax_step with q and K as their halves along D: the scores are the two halves' dots summed."""
    if UPCAST:
        k1, k2 = k1.to(tl.float32), k2.to(tl.float32)
    s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
    s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
    return _softmax_update(s, v, s_mask, m_i, l_i, acc, qk_scale, UPCAST, PRECISION)


@jit
def _softmax_update(s, v, s_mask, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The online-softmax update of rows with raw scores s (M, N) against V (N, D)."""
    if UPCAST:
        v = v.to(tl.float32)
    s = tl.where(s_mask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@jit(do_not_specialize=["stride_bt"])  # the block table's width changes with eager batches
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr,
                   seq_order_ptr, dst_ptr, lse_ptr, qk_scale,
                   k_new_ptr, v_new_ptr, cos_sin_ptr, slot_mapping_ptr, q_norm_ptr, k_norm_ptr, eps,
                   stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs, stride_qt, stride_qh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                   stride_dt, stride_dh, stride_ds, stride_lt, stride_lh, ROPE: tl.constexpr, HAS_NORM: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   ORDERED: tl.constexpr, PDL: tl.constexpr):
    """Grid (Hkv, B, NUM_SPLITS): one query token per seq, its GROUP heads against one slice of the keys.
    With PDL the seq's row and length (step inputs) are read before the wait (nanovllm/kernels/pdl.py), and
    so are the first tile's pages and its keys older than the step's new token.

    ROPE (NewTokenRope): q and the new token's k arrive as projected, and each program normalizes and
    rotates them itself (rope_kv_store.norm_rope), keeping q and every K tile as their two halves along D so
    that no element meets its RoPE partner across threads: the scores are the halves' dots summed. The split
    that holds the new token stores its k and v into the cache; under PDL its first tile takes them from
    registers, and a tile read from the cache after them waits for the stores at a CTA barrier. One kernel
    link a layer fewer than the RoPE + store kernel ahead of this one.

    Programs start in grid order as SMs free up, and a seq's programs take time in proportion to its
    length, so a long seq that starts last runs on alone at the end. Hence the KV heads are the grid's
    fastest axis and, with ORDERED, the i-th seq taken is seq_order[i] (the runners put the longest
    first: longest-processing-time-first scheduling). On an H100 with nano-vllm's workload at 145 seqs this
    took the kernel from 77 % to 89 % of the read ceiling at 4 KV heads (benchmarks/NOTES-kernels.md)."""
    launch_dependents(PDL)
    kv_head, seq, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if ORDERED:
        seq = tl.load(seq_order_ptr + seq)
    token = tl.load(cu_seqlens_q_ptr + seq)
    ctx_len = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask, d_mask = offs_g < GROUP, offs_d < HEAD_DIM
    table_row_ptr = block_tables_ptr + seq * stride_bt
    offs_h = tl.arange(0, BLOCK_HALF)
    if PDL:  # the first tile's pages, and its keys older than the step's own, before the wait: see below
        pos = start + tl.arange(0, BLOCK_N)
        pages = tl.load(table_row_ptr + pos // PAGE_SIZE, mask=pos < end, other=0).to(tl.int64)
        old = pos < tl.minimum(end, ctx_len - 1)
        if ROPE:
            k1, k2, v = _load_halves_pages(k_cache_ptr, v_cache_ptr, pages, pos, old, kv_head, offs_h, offs_d,
                                           d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                           PAGE_SIZE, HEAD_DIM)
        else:
            k, v = _load_kv_pages(k_cache_ptr, v_cache_ptr, pages, pos, old, kv_head, offs_d, d_mask, stride_kb,
                                  stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE)
    if ROPE:  # cos/sin at the new token's position, the norm weights and its slot: before the wait
        cs_row = cos_sin_ptr + tl.maximum(ctx_len - 1, 0).to(tl.int64) * stride_cs + offs_h[None, :]
        cos = tl.load(cs_row, mask=offs_h[None, :] < HEAD_DIM // 2, other=0.0).to(tl.float32)  # (1, BLOCK_HALF)
        sin = tl.load(cs_row + HEAD_DIM // 2, mask=offs_h[None, :] < HEAD_DIM // 2, other=0.0).to(tl.float32)
        qw1, qw2, kw1, kw2 = cos, sin, cos, sin  # unused without a norm
        if HAS_NORM:
            qw1, qw2 = halves(q_norm_ptr, HEAD_DIM, BLOCK_HALF)
            kw1, kw2 = halves(k_norm_ptr, HEAD_DIM, BLOCK_HALF)
        slot = tl.load(slot_mapping_ptr + token)
    wait_previous(PDL)  # q and the new token's K/V: from the RoPE + store kernel, or (ROPE) the projection
    q_rows = q_ptr + token * stride_qt + heads[:, None] * stride_qh
    if ROPE:
        # The new token's q and k halves and its v, in one round trip; then what the RoPE + store kernel
        # would have stored.
        h_mask = (offs_h < HEAD_DIM // 2)[None, :]
        q1 = tl.load(q_rows + offs_h[None, :], mask=g_mask[:, None] & h_mask, other=0.0)  # (BLOCK_G, BLOCK_HALF)
        q2 = tl.load(q_rows + HEAD_DIM // 2 + offs_h[None, :], mask=g_mask[:, None] & h_mask, other=0.0)
        k_row = k_new_ptr + token * stride_knt + kv_head * stride_knh + offs_h[None, :]
        k1_new = tl.load(k_row, mask=h_mask, other=0.0)  # (1, BLOCK_HALF)
        k2_new = tl.load(k_row + HEAD_DIM // 2, mask=h_mask, other=0.0)
        v_new = tl.load(v_new_ptr + token * stride_vnt + kv_head * stride_vnh + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
        q1, q2 = norm_rope(q1, q2, qw1, qw2, cos, sin, eps, HEAD_DIM, HAS_NORM)
        q1, q2 = q1.to(q_ptr.dtype.element_ty), q2.to(q_ptr.dtype.element_ty)
        k1_new, k2_new = norm_rope(k1_new, k2_new, kw1, kw2, cos, sin, eps, HEAD_DIM, HAS_NORM)
        k1_new, k2_new = k1_new.to(k_cache_ptr.dtype.element_ty), k2_new.to(k_cache_ptr.dtype.element_ty)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        if (start <= ctx_len - 1) & (ctx_len - 1 < end) & (slot >= 0):  # the split that holds the new token
            k_dst = (k_cache_ptr + (slot // PAGE_SIZE).to(tl.int64) * stride_kb + (slot % PAGE_SIZE) * stride_ks
                     + kv_head * stride_kh + offs_h[None, :])
            tl.store(k_dst, k1_new, mask=h_mask)
            tl.store(k_dst + HEAD_DIM // 2, k2_new, mask=h_mask)
            tl.store(v_cache_ptr + (slot // PAGE_SIZE).to(tl.int64) * stride_vb + (slot % PAGE_SIZE) * stride_vs
                     + kv_head * stride_vh + offs_d[None, :], v_new, mask=d_mask[None, :])
            if not PDL or start + BLOCK_N < end:  # a tile read from the cache holds it: the stores first
                tl.debug_barrier()
        if UPCAST:
            q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n_loop = start
    if PDL:
        # The first step, peeled. A decode step writes one slot per seq (its new token, at ctx_len - 1) and
        # nothing else of the cache, and graph replays run one after another, so the older keys above were
        # final before this kernel started; only the new token's row is loaded after the wait (zero
        # elsewhere, so the sum is exact). Same tile, same products, same order as without PDL.
        new = pos == ctx_len - 1
        if ROPE:  # the new row from registers (only the split that holds it has one)
            k1, k2, v = (tl.where(new[:, None], k1_new, k1), tl.where(new[:, None], k2_new, k2),
                         tl.where(new[:, None], v_new, v))
            if start < end:  # an empty split (or a padded seq) keeps m = -inf, l = 0, as the loop leaves them
                m_i, l_i, acc = _softmax_step_halves(q1, q2, k1, k2, v, (pos < end)[None, :], m_i, l_i, acc,
                                                     qk_scale, UPCAST, PRECISION)
        else:
            k_new, v_new = _load_kv_pages(k_cache_ptr, v_cache_ptr, pages, pos, new & (pos < end), kv_head,
                                          offs_d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                          stride_vh, PAGE_SIZE)
            if start < end:
                m_i, l_i, acc = _softmax_step(q, k + k_new, v + v_new, (pos < end)[None, :], m_i, l_i, acc,
                                              qk_scale, UPCAST, PRECISION)
        n_loop += BLOCK_N
    for n0 in range(n_loop, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        if ROPE:
            page = tl.load(table_row_ptr + pos // PAGE_SIZE, mask=pos_mask, other=0).to(tl.int64)
            k1, k2, v = _load_halves_pages(k_cache_ptr, v_cache_ptr, page, pos, pos_mask, kv_head, offs_h, offs_d,
                                           d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                           PAGE_SIZE, HEAD_DIM)
            m_i, l_i, acc = _softmax_step_halves(q1, q2, k1, k2, v, pos_mask[None, :], m_i, l_i, acc, qk_scale,
                                                 UPCAST, PRECISION)
        else:
            k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE_SIZE)
            m_i, l_i, acc = _softmax_step(q, k, v, pos_mask[None, :], m_i, l_i, acc, qk_scale, UPCAST, PRECISION)

    # An empty split (or a padded seq with context 0) leaves l_i = 0: write zeros and lse = -inf.
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:  # straight into out (T, H, D)
        row = token
    else:  # into the partials (B, H, NUM_SPLITS, D)
        row = seq
    dst = dst_ptr + row * stride_dt + heads[:, None] * stride_dh + split * stride_ds + offs_d[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1:
        lse = m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))  # log2 units; -inf for an empty split
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=g_mask)


@jit
def _decode_reduce_kernel(partial_ptr, lse_ptr, out_ptr, cu_seqlens_q_ptr, stride_pb, stride_ph, stride_ps,
                          stride_lb, stride_lh, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, H): merges the splits' partial outputs, weighting each by its share of the softmax mass.

    Every thread loads each split's lse as a scalar of its own, so the max over splits is arithmetic in
    registers: no shuffle stands between the lse loads and the partials' loads, and all of them leave
    together right after the wait (one round trip on the chain, not two)."""
    launch_dependents(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    token = tl.load(cu_seqlens_q_ptr + seq)  # a step input
    lse_row = lse_ptr + seq * stride_lb + head * stride_lh
    partial_row = partial_ptr + seq * stride_pb + head * stride_ph + offs_d
    wait_previous(PDL)
    lse_max = tl.full([], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(lse_row + s))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total, acc = tl.zeros([], tl.float32), tl.zeros([BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        weight = tl.exp2(tl.load(lse_row + s) - lse_max)  # 0 for an empty split (lse -inf)
        total += weight
        acc += tl.load(partial_row + s * stride_ps, mask=d_mask, other=0.0) * weight
    result = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty),
             mask=d_mask)


@jit
def _find_seq(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The seq whose q-blocks (numbered from cu_seqlens_q[s] // BLOCK_Q + s) hold q_block: binary search."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@jit(do_not_specialize=["num_seqs", "stride_bt"])  # both change every step: one compile
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr,
                    out_ptr, qk_scale, num_seqs, stride_qt, stride_qh,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                    stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (T // BLOCK_Q + B, Hkv): BLOCK_Q query tokens x GROUP heads (BLOCK_M rows) of one seq, causal."""
    q_block, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first = (q_block - q_start // BLOCK_Q - seq) * BLOCK_Q  # index within the seq of this block's first query
    if first >= q_len:  # the grid's spare programs
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    q_idx = first + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    m_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    d_mask = offs_d < HEAD_DIM
    # Masked-out rows take the last position, so every row sees key 0 and the softmax never meets all -inf.
    q_pos = tl.minimum(ctx_len - q_len + q_idx, ctx_len - 1)
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row_ptr = block_tables_ptr + seq * stride_bt
    kv_end = tl.minimum(ctx_len, ctx_len - q_len + first + BLOCK_Q)  # one past the block's last visible key
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, pos, pos < kv_end, kv_head,
                             offs_d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             PAGE_SIZE)
        causal = pos[None, :] <= q_pos[:, None]  # (BLOCK_M, BLOCK_N)
        m_i, l_i, acc = _softmax_step(q, k, v, causal, m_i, l_i, acc, qk_scale, UPCAST, PRECISION)

    acc = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + q_idx)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
