"""RoPE on q and k (after Qwen3's optional per-head RMSNorm), fused with the store of k and v into the cache.

One program per head of a token (q heads, then KV heads) reads its head once and writes it back rotated (in
place); a KV head's program also writes k and v into the cache at slot_mapping (layout of docs/design.md:
(num_blocks, block_size, Hkv, D); slot = block * block_size + offset; slot -1 skips the store, as padded
CUDA-graph rows do). RoPE is neox style (HF rotate_half):
with x = [x1 | x2] and cos_sin_cache[pos] = [cos | sin] (D/2 each), out = [x1*cos - x2*sin | x2*cos + x1*sin].
"""
from __future__ import annotations

import torch

from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use rope_and_store_kv_ref
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


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
    # A program per head at a few tokens: at one token (a batch-1 decode step) a single program would walk
    # q, then k, then v, one dependent memory round trip after another; the heads' programs run side by side.
    # At many tokens, a program per head is tens of thousands of one-warp programs, and launching them costs
    # more than their loads: there a program takes 8 heads.
    heads_per_program = 1 if num_tokens <= 16 else 8
    grid = (num_tokens, triton.cdiv(num_heads + num_kv_heads, heads_per_program))
    _rope_kv_store_kernel[grid](
        # Empty caches may have a null data pointer, which Triton refuses: pass k in their place.
        q, k, v, positions, cos_sin_cache, k_cache if store else k, v_cache if store else v, slot_mapping,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        *(k_cache.stride()[:3] if store else (0, 0, 0)), *(v_cache.stride()[:3] if store else (0, 0, 0)),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1] if store else 1, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        HAS_NORM=has_norm, STORE=store, PDL=pdl,
        HEADS_PER_PROGRAM=heads_per_program, num_warps=1, launch_pdl=pdl,
    )
    return q, k


@_jit
def _halves(ptr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two halves (BLOCK_HALF,) of a (HEAD_DIM,) row, in fp32: cos | sin, or a norm weight."""
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = offs_d < HEAD_DIM // 2
    first = tl.load(ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    return first, tl.load(ptr + HEAD_DIM // 2 + offs_d, mask=mask, other=0.0).to(tl.float32)


@_jit
def _norm_rope_head(x_ptr, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    HAS_NORM: tl.constexpr):
    """Normalizes (norm weight halves w1, w2) and rotates one head in place; returns the rotated halves
    (fp32) and their mask."""
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = offs_d < HEAD_DIM // 2
    x1 = tl.load(x_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_HALF,)
    x2 = tl.load(x_ptr + HEAD_DIM // 2 + offs_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM + eps)
        x1, x2 = x1 * rstd * w1, x2 * rstd * w2
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    tl.store(x_ptr + offs_d, r1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + HEAD_DIM // 2 + offs_d, r2.to(x_ptr.dtype.element_ty), mask=mask)
    return r1, r2, mask


@_jit
def _rope_kv_store_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
                          slot_mapping_ptr, q_norm_ptr, k_norm_ptr, eps,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                          stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                          STORE: tl.constexpr, PDL: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr):
    """Grid (T, cdiv(H + Hkv, HEADS_PER_PROGRAM)): program (t, p) takes heads h = p * HEADS_PER_PROGRAM + i
    of token t: q head h for h < H, else KV head h - H (k rotated, then k and v into the cache). With PDL,
    cos/sin of the token's position, the norm weights and its slot are loaded before the wait: the step's
    inputs and weights (nanovllm/kernels/pdl.py)."""
    launch_dependents(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _halves(cos_sin_ptr + tl.load(positions_ptr + token) * stride_cs, HEAD_DIM, BLOCK_HALF)
    qw1, qw2, kw1, kw2 = cos, sin, cos, sin  # unused without a norm (the norm pointers are then q and k)
    if HAS_NORM:
        qw1, qw2 = _halves(q_norm_ptr, HEAD_DIM, BLOCK_HALF)
        kw1, kw2 = _halves(k_norm_ptr, HEAD_DIM, BLOCK_HALF)
    slot = -1
    if STORE:
        slot = tl.load(slot_mapping_ptr + token)
    wait_previous(PDL)
    for i in tl.static_range(HEADS_PER_PROGRAM):
        head = tl.program_id(1) * HEADS_PER_PROGRAM + i
        if head < NUM_HEADS:
            _norm_rope_head(q_ptr + token * stride_qt + head * stride_qh, qw1, qw2, cos, sin, eps, HEAD_DIM,
                            BLOCK_HALF, HAS_NORM)
        elif head < NUM_HEADS + NUM_KV_HEADS:
            _rope_store_kv_head(k_ptr + token * stride_kt + (head - NUM_HEADS) * stride_kh,
                                v_ptr + token * stride_vt + (head - NUM_HEADS) * stride_vh, head - NUM_HEADS,
                                slot, k_cache_ptr, v_cache_ptr, kw1, kw2, cos, sin, eps, stride_kcb, stride_kcs,
                                stride_kch, stride_vcb, stride_vcs, stride_vch, HEAD_DIM, PAGE_SIZE, BLOCK_HALF,
                                HAS_NORM, STORE)


@_jit
def _rope_store_kv_head(k_ptr, v_ptr, kv_head, slot, k_cache_ptr, v_cache_ptr, w1, w2, cos, sin, eps,
                        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                        HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_HALF: tl.constexpr,
                        HAS_NORM: tl.constexpr, STORE: tl.constexpr):
    """One KV head of one token: k normalized and rotated in place, then k and v into the cache at slot
    (none for slot < 0: a padded token)."""
    offs_d = tl.arange(0, BLOCK_HALF)
    if STORE:  # v first: its load then overlaps k's
        v1 = tl.load(v_ptr + offs_d, mask=offs_d < HEAD_DIM // 2)
        v2 = tl.load(v_ptr + HEAD_DIM // 2 + offs_d, mask=offs_d < HEAD_DIM // 2)
    k1, k2, mask = _norm_rope_head(k_ptr, w1, w2, cos, sin, eps, HEAD_DIM, BLOCK_HALF, HAS_NORM)
    if STORE:
        if slot >= 0:
            kc_ptrs = (k_cache_ptr + (slot // PAGE_SIZE) * stride_kcb + (slot % PAGE_SIZE) * stride_kcs
                       + kv_head * stride_kch + offs_d)
            tl.store(kc_ptrs, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(kc_ptrs + HEAD_DIM // 2, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            vc_ptrs = (v_cache_ptr + (slot // PAGE_SIZE) * stride_vcb + (slot % PAGE_SIZE) * stride_vcs
                       + kv_head * stride_vch + offs_d)
            tl.store(vc_ptrs, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptrs + HEAD_DIM // 2, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)
