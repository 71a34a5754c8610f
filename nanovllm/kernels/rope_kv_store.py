"""RoPE on q and k (after Qwen3's optional per-head RMSNorm), fused with the store of k and v into the cache.

One program per head (q heads, then KV heads) of a block of tokens reads that head once and writes it back
rotated (in place); a KV head's program also writes k and v into the cache at slot_mapping (layout of
docs/design.md: (num_blocks, block_size, Hkv, D); slot = block * block_size + offset; slot -1 skips the store,
as padded CUDA-graph rows do). RoPE is neox style (HF rotate_half):
with x = [x1 | x2] and cos_sin_cache[pos] = [cos | sin] (D/2 each), out = [x1*cos - x2*sin | x2*cos + x1*sin].

Decode steps of some sizes (paged_attention.rope_in_decode) skip this kernel: the decode attention kernel
normalizes and rotates their new tokens itself with `norm_rope` and stores k and v (NewTokenRope).
"""
from __future__ import annotations

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use rope_and_store_kv_ref
    triton = tl = None


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_and_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                          k_norm_weight: torch.Tensor | None = None,
                          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference (fp32 math): same in-place effects on q, k, k_cache, v_cache; returns (q, k)."""
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)  # (T, 1, D/2) each
    q.copy_(_rope_ref(_rms_norm_ref(q.float(), q_norm_weight, eps), cos, sin))
    k.copy_(_rope_ref(_rms_norm_ref(k.float(), k_norm_weight, eps), cos, sin))
    if k_cache.numel():
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        block_size = k_cache.shape[1]
        k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
        v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)
    return q, k


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                      k_norm_weight: torch.Tensor | None = None,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, H, D), k and v (T, Hkv, D) with unit stride on D; positions (T,) int; cos_sin_cache (max_pos, D).

    Rotates q and k in place (after RMSNorm of each head when the norm weights (D,) are given) and writes
    k, v into k_cache, v_cache (skipped when the caches are empty, as before the runner assigns them).
    Math is fp32; results are cast to each destination's dtype. Returns (q, k).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if num_tokens == 0:
        return q, k
    store = k_cache.numel() > 0
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None), "q and k norms come together (Qwen3)"
    pdl = pdl_enabled(q.device, num_tokens)
    # A program per head, not per token: at one token (a batch-1 decode step) a single program would walk
    # q, then k, then v, one dependent memory round trip after another; the heads' programs run side by side.
    # With many tokens a program takes a block of them (one head), so a batch of 256 is hundreds of programs,
    # not thousands of one-warp ones whose launches cost more than their loads.
    block_t, warps = (1, 1) if num_tokens <= 16 else (16, 4) if num_tokens <= 1024 else (64, 8)
    _rope_kv_store_kernel[(triton.cdiv(num_tokens, block_t), num_heads + num_kv_heads)](
        # Empty caches may have a null data pointer, which Triton refuses: pass k in their place.
        q, k, v, positions, cos_sin_cache, k_cache if store else k, v_cache if store else v, slot_mapping,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps, num_tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        *(k_cache.stride()[:3] if store else (0, 0, 0)), *(v_cache.stride()[:3] if store else (0, 0, 0)),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1] if store else 1,
        BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm, STORE=store,
        PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )
    return q, k


@jit
def halves(ptr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two halves (1, BLOCK_HALF) of a (HEAD_DIM,) norm weight, in fp32."""
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = offs_d < HEAD_DIM // 2
    first = tl.load(ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    return first, tl.load(ptr + HEAD_DIM // 2 + offs_d, mask=mask, other=0.0).to(tl.float32)


@jit
def norm_rope(x1, x2, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rows of heads as halves x1, x2 (R, BLOCK_HALF), zero past HEAD_DIM // 2: RMSNorm of each row (norm
    weight halves w1, w2) if HAS_NORM, then RoPE (cos, sin broadcast against the rows). Returns the
    rotated halves in fp32."""
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        x1, x2 = x1 * rstd * w1, x2 * rstd * w2
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@jit
def _norm_rope_head(x_ptrs, mask, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
    """Normalizes (norm weight halves w1, w2) and rotates one head of a block of tokens in place: x_ptrs
    (BLOCK_T, BLOCK_HALF) point at the first halves. Returns the rotated halves (fp32)."""
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)  # (BLOCK_T, BLOCK_HALF)
    x2 = tl.load(x_ptrs + HEAD_DIM // 2, mask=mask, other=0.0)
    r1, r2 = norm_rope(x1, x2, w1, w2, cos, sin, eps, HEAD_DIM, HAS_NORM)
    tl.store(x_ptrs, r1.to(x_ptrs.dtype.element_ty), mask=mask)
    tl.store(x_ptrs + HEAD_DIM // 2, r2.to(x_ptrs.dtype.element_ty), mask=mask)
    return r1, r2


@jit(do_not_specialize=["num_tokens"])  # changes every step: one compile serves all
def _rope_kv_store_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
                          slot_mapping_ptr, q_norm_ptr, k_norm_ptr, eps, num_tokens,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                          STORE: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), H + Hkv): program (b, h) takes head h of tokens [b * BLOCK_T, (b + 1) *
    BLOCK_T): q head h for h < H, else KV head h - H (k rotated, then k and v into the cache). With PDL, the
    tokens' cos/sin, the norm weights and their slots are loaded before the wait: the step's inputs and
    weights (nanovllm/kernels/pdl.py)."""
    launch_dependents(PDL)
    head = tl.program_id(1)
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]  # (BLOCK_T, 1)
    in_range = tokens < num_tokens
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = in_range & (offs_d < HEAD_DIM // 2)  # (BLOCK_T, BLOCK_HALF)
    cs_ptrs = cos_sin_ptr + tl.load(positions_ptr + tokens, mask=in_range, other=0) * stride_cs + offs_d
    cos = tl.load(cs_ptrs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptrs + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    w1, w2 = cos, sin  # unused without a norm: the norm pointers are then q and k, unreadable before the wait
    if HAS_NORM:
        w1, w2 = halves(tl.where(head < NUM_HEADS, q_norm_ptr, k_norm_ptr), HEAD_DIM, BLOCK_HALF)
    if STORE:
        slots = tl.load(slot_mapping_ptr + tokens, mask=in_range, other=-1)  # (BLOCK_T, 1)
    wait_previous(PDL)
    if head < NUM_HEADS:
        _norm_rope_head(q_ptr + tokens * stride_qt + head * stride_qh + offs_d, mask, w1, w2, cos, sin, eps,
                        HEAD_DIM, HAS_NORM)
    else:
        kv_head = head - NUM_HEADS
        if STORE:  # v first: its load then overlaps k's
            v_ptrs = v_ptr + tokens * stride_vt + kv_head * stride_vh + offs_d
            v1 = tl.load(v_ptrs, mask=mask)
            v2 = tl.load(v_ptrs + HEAD_DIM // 2, mask=mask)
        k1, k2 = _norm_rope_head(k_ptr + tokens * stride_kt + kv_head * stride_kh + offs_d, mask, w1, w2, cos,
                                 sin, eps, HEAD_DIM, HAS_NORM)
        if STORE:
            mask &= slots >= 0  # padded rows have no slot
            kc_ptrs = (k_cache_ptr + (slots // PAGE_SIZE) * stride_kcb + (slots % PAGE_SIZE) * stride_kcs
                       + kv_head * stride_kch + offs_d)
            tl.store(kc_ptrs, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(kc_ptrs + HEAD_DIM // 2, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            vc_ptrs = (v_cache_ptr + (slots // PAGE_SIZE) * stride_vcb + (slots % PAGE_SIZE) * stride_vcs
                       + kv_head * stride_vch + offs_d)
            tl.store(vc_ptrs, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptrs + HEAD_DIM // 2, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)
