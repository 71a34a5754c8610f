"""Triton kernels against their torch references: interpreter-sized shapes on CPU, real shapes on CUDA.

Every output is poisoned with NaN before the kernel runs, so a row the kernel forgets to write fails.
"""
import math

import numpy as np
import pytest
import torch

from nanovllm.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from nanovllm.kernels.paged_attention import paged_attention, paged_attention_ref
from nanovllm.kernels.pdl import pdl_supported
from nanovllm.kernels.rope_kv_store import rope_and_store_kv, rope_and_store_kv_ref
from nanovllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from nanovllm.utils.context import longest_first

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DTYPES = [torch.float32, torch.bfloat16]


def tols(dtype: torch.dtype) -> dict:
    # bf16: outputs are rounded once (and on GPU the dots take bf16 operands), so ~1 ulp of 2^-8.
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)


def paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random q and caches; each seq's blocks are scattered at random over a cache with spare blocks."""
    gen = torch.Generator(DEVICE).manual_seed(seed)  # on the device: GPU caches hold up to 1e9 values
    num_blocks = sum(math.ceil(c / block_size) for c in ctx_lens) + 5
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)  # noqa: E731
    q = randn(sum(q_lens), num_heads, head_dim)
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).tolist()
    width = max(math.ceil(c / block_size) for c in ctx_lens)
    tables = []
    for c in ctx_lens:
        n = math.ceil(c / block_size)
        tables.append(perm[:n] + [-1] * (width - n))
        perm = perm[n:]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    as_int32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, k_cache, v_cache, as_int32(tables), as_int32(cu), as_int32(ctx_lens)


def check_attention(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, **kwargs):
    q, k_cache, v_cache, tables, cu, ctx = paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim,
                                                       block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, tables, cu, ctx, max(q_lens), scale, out=out, **kwargs)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, cu, ctx, max(q_lens), scale)
    torch.testing.assert_close(out, ref, **tols(dtype))
    assert (out - ref).float().norm() / ref.float().norm() < (1e-2 if dtype == torch.bfloat16 else 1e-5)


# (H, Hkv, D, block_size): GQA 2, MHA, SmolLM2's 9/3 heads, Qwen3's head_dim with block size 32.
HEADS = [(4, 2, 64, 16), (4, 4, 64, 16), (9, 3, 64, 32), (2, 1, 128, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
def test_prefill_varlen_and_chunked(num_heads, num_kv_heads, head_dim, block_size, dtype):
    # seq 0: a 1-token prompt; seq 1: 3 new tokens after 30 cached (prefix hit / chunk); seq 2: a fresh 17.
    check_attention([1, 3, 17], [1, 33, 17], num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_padded_as_the_prefill_graphs_pad_it(dtype):
    """A step padded as engine/prefill_graphs.py pads it (tokens to the bucket with slot -1; seqs to
    max_seqs with empty ones: cu_seqlens repeating the total, context 0; wider block tables) gives the
    varlen kernel's rows of the unpadded step bit for bit, and the slots make_context gives."""
    from nanovllm.engine.prefill_graphs import PrefillGraphs
    from nanovllm.utils.context import make_context
    q_lens, ctx_lens, block_size = [1, 3, 17], [1, 33, 17], 16
    q, k_cache, v_cache, tables, cu, ctx = paged_batch(q_lens, ctx_lens, 4, 2, 64, block_size, dtype)
    scale, bucket = 64 ** -0.5, 32
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, tables, cu, ctx, max(q_lens), scale, out=out)
    graphs = PrefillGraphs(None, bucket, 6, tables.shape[1] + 3, block_size, torch.device(DEVICE), capture=False)
    host_tables = [[b for b in row if b >= 0] for row in tables.tolist()]
    positions = [p for q_len, c in zip(q_lens, ctx_lens) for p in range(c - q_len, c)]
    assert graphs.write_inputs([7] * sum(q_lens), positions, q_lens, ctx_lens, host_tables) == bucket
    real = sum(q_lens)
    expected = make_context(q_lens, ctx_lens, host_tables, block_size, DEVICE)
    assert graphs.slot_mapping[:real].tolist() == expected.slot_mapping.tolist()
    assert set(graphs.slot_mapping[real:].tolist()) == {-1}
    assert graphs.cu_seqlens_q.tolist() == cu.tolist() + [real] * 3
    assert graphs.context_lens.tolist() == ctx_lens + [0] * 3
    q_pad = torch.cat([q, torch.randn(bucket - real, *q.shape[1:], device=DEVICE).to(dtype)])
    out_pad = torch.full_like(q_pad, float("nan"))
    paged_attention(q_pad, k_cache, v_cache, graphs.block_tables, graphs.cu_seqlens_q, graphs.context_lens,
                    bucket, scale, out=out_pad)
    assert torch.equal(out_pad[:real], out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_long_chunk(dtype):
    # A 37-token chunk after 40 cached keys: several query blocks, each with several key tiles.
    check_attention([37, 2], [77, 5], 4, 2, 64, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
def test_decode_split(num_heads, num_kv_heads, head_dim, block_size, dtype):
    # Context 1 with 3 splits leaves two splits empty; 50 spans two tiles in each split.
    check_attention([1, 1, 1, 1], [1, 3, 17, 50], num_heads, num_kv_heads, head_dim, block_size, dtype,
                    num_kv_splits=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_unsplit(dtype):
    # One split writes straight into out, with no reduce pass.
    check_attention([1, 1, 1], [1, 17, 50], 4, 2, 64, 16, dtype, num_kv_splits=1)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_pdl_path_gives_the_same_bits(monkeypatch, num_kv_splits):
    """With PDL the decode kernel loads its first tile's older keys before the wait and the new token's
    row after it, then takes the peeled step: the same products in the same order as without PDL. Where
    the interpreter runs it (griddepcontrol a no-op there), the first tile holds the new token (37 keys
    in 3 splits), sits before it (100 keys), is empty (padding, context 0) or is the whole context (1)."""
    from nanovllm.kernels import paged_attention as pa
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1] * 4, [100, 0, 37, 1], 4, 2, 64, 16, torch.float32)
    run = lambda: paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125,  # noqa: E731
                                  num_kv_splits=num_kv_splits)
    if torch.cuda.is_available() and not pdl_supported(torch.device(DEVICE)):
        pytest.skip("programmatic dependent launch needs sm_90")
    monkeypatch.setattr(pa, "pdl_enabled", lambda device, num_tokens=1: False)
    want = run()
    monkeypatch.setattr(pa, "pdl_enabled", lambda device, num_tokens=1: True)
    assert torch.equal(run(), want)
    torch.testing.assert_close(want, paged_attention_ref(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125))


@pytest.mark.parametrize("num_kv_splits", [1, 3, 8])
def test_decode_varied_lengths(num_kv_splits):
    # Unequal seqs in one batch with context-0 rows (graph padding) between them; 8 splits leave most of the
    # 1-key seq's splits empty. fp32, so a key read from the wrong page or slice shows.
    check_attention([1] * 6, [100, 0, 1, 64, 0, 37], 4, 2, 64, 16, torch.float32, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_seq_order_changes_no_bit(num_kv_splits):
    # seq_order only changes when each seq's programs start: longest first (the runners' order) and a
    # shuffle give exactly the unordered output, padding rows (context 0) included.
    q_lens, ctx_lens = [1] * 6, [37, 0, 100, 1, 64, 50]
    q, k_cache, v_cache, tables, cu, ctx = paged_batch(q_lens, ctx_lens, 4, 2, 64, 16, torch.float32)
    run = lambda **order: paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125,  # noqa: E731
                                          num_kv_splits=num_kv_splits, **order)
    want = run()
    torch.testing.assert_close(want, paged_attention_ref(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125))
    longest = torch.from_numpy(longest_first(np.array(ctx_lens))).to(DEVICE)
    assert longest.tolist() == [2, 4, 5, 0, 3, 1]
    for order in (longest, torch.tensor([3, 0, 5, 1, 4, 2], dtype=torch.int32, device=DEVICE)):
        assert torch.equal(run(seq_order=order), want)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype",
                         [(9, 3, 64, 32, torch.bfloat16), (4, 2, 80, 16, torch.float32)])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_rope_does_what_the_rope_kernel_did(monkeypatch, num_kv_splits, num_heads, num_kv_heads, head_dim,
                                                   block_size, dtype):
    """The decode kernel with NewTokenRope (q and the new k as projected, the new k and v not yet stored)
    against RoPE + store (rope_and_store_kv) and then the decode kernel: the same cache (v bit for bit) and
    output, with the Qwen3 q/k norm or without; and the same bits with PDL as without. q, k and v are views
    into one qkv row as the model makes them; head_dim 80 leaves columns past its halves in the kernel's
    power-of-two blocks. The new token sits in a split's first tile (the peeled one under PDL) or in a later
    one (100 keys in one split: 7 tiles of 16), beside a padded seq (context 0, slot -1) and one of a
    single key."""
    from nanovllm.kernels import paged_attention as pa
    ctx_lens = [100, 0, 37, 1, 64, 50]
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1] * 6, ctx_lens, num_heads, num_kv_heads, head_dim,
                                                       block_size, dtype)
    (_, k, v), _, _, _, _, norms = rope_inputs(6, num_heads, num_kv_heads, head_dim, dtype, seed=1)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)  # (T, (H + 2 Hkv) D)
    q, k, v = (t.view(6, -1, head_dim) for t in qkv.split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], 1))
    freqs = torch.arange(max(ctx_lens)).float()[:, None] / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # (positions, D)
    positions = (ctx - 1).clamp(min=0).long()  # a decode step's new token sits at context_len - 1
    slots = tables.long().gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    slots = torch.where(ctx > 0, slots, -1)
    new = [(s // block_size, s % block_size) for s in slots.tolist() if s >= 0]
    for q_norm, k_norm in ([None, None], norms):
        want_q, want_k = q.clone(), k.clone()
        want_caches = k_cache.clone(), v_cache.clone()
        rope_and_store_kv(want_q, want_k, v, positions, cos_sin, *want_caches, slots, q_norm, k_norm)
        want = paged_attention(want_q, *want_caches, tables, cu, ctx, 1, 0.125, num_kv_splits=num_kv_splits)
        rope = pa.NewTokenRope(k, v, cos_sin, slots, q_norm, k_norm, 1e-6)
        runs = []
        for pdl in (False, True):
            if pdl and torch.cuda.is_available() and not pdl_supported(torch.device(DEVICE)):
                continue
            monkeypatch.setattr(pa, "pdl_enabled", lambda device, num_tokens=1, pdl=pdl: pdl)
            caches = k_cache.clone(), v_cache.clone()
            out = torch.full_like(q, float("nan"))
            paged_attention(q, *caches, tables, cu, ctx, 1, 0.125, out=out, num_kv_splits=num_kv_splits, rope=rope)
            runs.append((out, *caches))
        for out, got_k, got_v in runs:
            assert all(torch.equal(a, b) for a, b in zip((out, got_k, got_v), runs[0]))  # PDL changes no bit
            torch.testing.assert_close(out, want, **tols(dtype))
            torch.testing.assert_close(got_k, want_caches[0], **tols(dtype))
            assert torch.equal(got_v, want_caches[1])
            assert not any(torch.equal(got_k[b, o], k_cache[b, o]) for b, o in new)  # every new key was stored
        assert torch.equal(qkv[:, :num_heads * head_dim].view_as(q), q)  # q is left as projected


def test_rope_in_decode_switch(monkeypatch):
    """The decode kernel takes RoPE + store at 1 and at 8-32 seqs by default (where it measured faster),
    everywhere with NANOVLLM_DECODE_ROPE=all, nowhere with 0."""
    from nanovllm.kernels.paged_attention import rope_in_decode
    monkeypatch.delenv("NANOVLLM_DECODE_ROPE", raising=False)
    assert [n for n in range(1, 65) if rope_in_decode(n)] == [1, *range(8, 33)]
    monkeypatch.setenv("NANOVLLM_DECODE_ROPE", "all")
    assert all(rope_in_decode(n) for n in (1, 2, 64, 256))
    monkeypatch.setenv("NANOVLLM_DECODE_ROPE", "0")
    assert not any(rope_in_decode(n) for n in (1, 8, 32))


def test_decode_padded_seq_gives_zeros():
    # CUDA-graph padding may run seqs with context 0: their rows must be finite (zeros), not NaN.
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1, 1], [5, 5], 4, 2, 64, 16, torch.float32)
    ctx[1] = 0
    for splits in (1, 2):
        out = paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125, out=torch.full_like(q, float("nan")),
                              num_kv_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = paged_attention_ref(q[:1], k_cache, v_cache, tables[:1], cu[:2], ctx[:1], 1, 0.125)
        torch.testing.assert_close(out[:1], ref)


def rope_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(4 * num_tokens + 8).float()[:, None] * inv_freq  # (max_pos, D/2)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    positions = torch.randint(0, freqs.shape[0], (num_tokens,), generator=gen).to(DEVICE)
    num_blocks = math.ceil(num_tokens / block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1  # a padded row: must not be stored
    caches = [randn(num_blocks, block_size, num_kv_heads, head_dim) for _ in range(2)]
    qkv = [randn(num_tokens, n, head_dim) for n in (num_heads, num_kv_heads, num_kv_heads)]
    norms = [1 + 0.1 * randn(head_dim).float() for _ in range(2)]
    return qkv, positions, cos_sin, caches, slots.to(DEVICE), norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [(5, 4, 2, 64), (3, 9, 3, 64),
                                                                          (2, 16, 8, 128), (40, 9, 3, 64)])
def test_rope_and_store_kv(num_tokens, num_heads, num_kv_heads, head_dim, qk_norm, dtype):
    (q, k, v), positions, cos_sin, (k_cache, v_cache), slots, norms = rope_inputs(
        num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    norms = norms if qk_norm else [None, None]
    got = [t.clone() for t in (q, k, k_cache, v_cache)]
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    rope_and_store_kv(got[0], got[1], v, positions, cos_sin, got[2], got[3], slots, *norms)
    rope_and_store_kv_ref(want[0], want[1], v, positions, cos_sin, want[2], want[3], slots, *norms)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tols(dtype))
    assert torch.equal(got[3][slots[0] // 16, slots[0] % 16], v[0])  # v is copied bit for bit


def test_rope_without_cache_only_rotates():
    (q, k, v), positions, cos_sin, _, slots, _ = rope_inputs(4, 4, 2, 64, torch.float32)
    empty = torch.empty(0, device=DEVICE)
    got_q, got_k = rope_and_store_kv(q.clone(), k.clone(), v, positions, cos_sin, empty, empty, slots)
    want_q, want_k = rope_and_store_kv_ref(q.clone(), k.clone(), v, positions, cos_sin, empty, empty, slots)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_rope_ref_matches_transformers():
    # The reference itself against HF's Qwen3 q_norm + apply_rotary_pos_emb (rotate_half, cos duplicated).
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb
    (q, k, v), positions, cos_sin, _, slots, (q_w, k_w) = rope_inputs(6, 4, 2, 64, torch.float32)
    q, k, q_w, k_w, positions, cos_sin = (t.cpu() for t in (q, k, q_w, k_w, positions, cos_sin))
    q_norm, k_norm = Qwen3RMSNorm(64, eps=1e-6), Qwen3RMSNorm(64, eps=1e-6)
    q_norm.weight.data, k_norm.weight.data = q_w, k_w
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # (1, T, D)
    heads_first = lambda x: x.transpose(0, 1)[None]  # (T, H, D) -> (1, H, T, D)  # noqa: E731
    hf_q, hf_k = apply_rotary_pos_emb(heads_first(q_norm(q)), heads_first(k_norm(k)), cos, sin)
    empty = torch.empty(0)
    ours_q, ours_k = rope_and_store_kv_ref(q.clone(), k.clone(), v.cpu(), positions, cos_sin, empty, empty,
                                           slots.cpu(), q_w, k_w)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 257), (2, 3, 1024)])
def test_rmsnorm(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    torch.testing.assert_close(rmsnorm(x, weight, 1e-5), rmsnorm_ref(x, weight, 1e-5), **tols(dtype))
    hf = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()
    torch.testing.assert_close(rmsnorm(x, weight, 1e-5).float(), hf, **tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 257), (2, 3, 1024)])
def test_add_rmsnorm_updates_residual(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    x, residual = (torch.randn(*shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    res_got, res_want = residual.clone(), residual.clone()
    normed, new_res = add_rmsnorm(x, res_got, weight, 1e-6)
    want_normed, _ = add_rmsnorm_ref(x, res_want, weight, 1e-6)
    assert new_res is res_got  # in place
    torch.testing.assert_close(res_got, (x.float() + residual.float()).to(dtype))
    torch.testing.assert_close(normed, want_normed, **tols(dtype))


def test_rmsnorm_no_rows():
    x = torch.empty(0, 64, device=DEVICE)
    assert rmsnorm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 17), (5, 1536), (3, 3072)])
def test_silu_and_mul(num_tokens, inter, dtype):
    x = torch.randn(num_tokens, 2 * inter, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    gate, up = x.float().chunk(2, dim=-1)
    got = silu_and_mul(x)
    torch.testing.assert_close(got, silu_and_mul_ref(x), **tols(dtype))
    torch.testing.assert_close(got.float(), gate * torch.sigmoid(gate) * up, **tols(dtype))


# ---- CUDA only: real model shapes (Qwen3-0.6B: H=16, Hkv=8, D=128; SmolLM2: H=9, Hkv=3, D=64) ----

@gpu_only
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch", [1, 64, 256])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 8])
def test_decode_gpu(num_heads, num_kv_heads, head_dim, batch, num_kv_splits):
    ctx = torch.randint(1, 4097, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    check_attention([1] * batch, ctx, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16,
                    num_kv_splits=num_kv_splits)


@gpu_only
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_prefill_gpu(block_size):
    # Decodes, fresh prompts and chunks after long cached prefixes in one varlen batch.
    q_lens = [1, 1000, 1, 7, 512, 129, 1]
    ctx_lens = [4096, 1000, 17, 3000, 4096, 129, 1]
    check_attention(q_lens, ctx_lens, 16, 8, 128, block_size, torch.bfloat16)


@gpu_only
def test_decode_cuda_graph_replay():
    # Captured once, replayed after the lengths change in place: no host sync, no stale shapes.
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1] * 8, [4096] * 8, 16, 8, 128, 16, torch.bfloat16)
    out = torch.empty_like(q)
    run = lambda: paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, 128 ** -0.5, out=out)  # noqa: E731
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ctx.copy_(torch.tensor([1, 5, 100, 4096, 17, 2048, 3000, 33], dtype=torch.int32))
    graph.replay()
    ref = paged_attention_ref(q, k_cache, v_cache, tables, cu, ctx, 1, 128 ** -0.5)
    torch.testing.assert_close(out, ref, **tols(torch.bfloat16))


@gpu_only
def test_gpu_kernels_compile_once_whatever_the_batch(monkeypatch):
    # Ints that change every step (seqs, tokens, the block table's width) must not be specialized on:
    # Triton would compile a new variant the first time one is 1 or a multiple of 16, mid-serving (0.84 s
    # in the middle of a timed H100 run: benchmarks/NOTES-gpu.md, session 8).
    monkeypatch.setenv("NANOVLLM_PDL", "0")  # else one token launches with PDL: a variant of its own
    from nanovllm.kernels import paged_attention as pa
    from nanovllm.kernels import rope_kv_store as rk
    kernels = (pa._prefill_kernel, pa._decode_kernel, rk._rope_kv_store_kernel)
    for kernel in kernels:
        kernel.device_caches.clear()  # count the variants from here on (the disk cache makes them cheap)
    for num_seqs, width in ((1, 1), (16, 16), (17, 17), (3, 5)):  # seqs, and blocks in the widest table
        ctx_lens = [16 * width] * num_seqs
        check_attention([3] * num_seqs, ctx_lens, 16, 8, 128, 16, torch.bfloat16)
        check_attention([1] * num_seqs, ctx_lens, 16, 8, 128, 16, torch.bfloat16, num_kv_splits=1)
    for num_tokens in (1, 16, 3):  # one launch configuration up to 16 tokens
        (q, k, v), positions, cos_sin, (k_cache, v_cache), slots, _ = rope_inputs(num_tokens, 16, 8, 128,
                                                                               torch.bfloat16)
        rope_and_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    # The decode kernel's warps and stages depend on the batch, in two ranges: one variant each.
    decode_settings = {pa._decode_warps_stages(num_seqs) for num_seqs in (1, 16, 17, 3)}
    assert len(decode_settings) == 2
    assert [sum(len(cache[0]) for cache in kernel.device_caches.values()) for kernel in kernels] == [1, 2, 1]


@gpu_only
def test_elementwise_kernels_gpu():
    (q, k, v), positions, cos_sin, (k_cache, v_cache), slots, norms = rope_inputs(8192, 16, 8, 128,
                                                                                  torch.bfloat16)
    got = [t.clone() for t in (q, k, k_cache, v_cache)]
    want = [t.clone() for t in (q, k, k_cache, v_cache)]
    rope_and_store_kv(got[0], got[1], v, positions, cos_sin, got[2], got[3], slots, *norms)
    rope_and_store_kv_ref(want[0], want[1], v, positions, cos_sin, want[2], want[3], slots, *norms)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tols(torch.bfloat16))
    x, residual = torch.randn(2, 8192, 1024, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.rand(1024, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(rmsnorm(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6), **tols(torch.bfloat16))
    want_res = residual.clone()
    normed, _ = add_rmsnorm(x, residual, weight, 1e-6)
    torch.testing.assert_close(normed, add_rmsnorm_ref(x, want_res, weight, 1e-6)[0], **tols(torch.bfloat16))
    x = torch.randn(8192, 2 * 3072, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tols(torch.bfloat16))


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_feed_back_resolves_only_the_placeholders(batch):
    # Async scheduling's placeholders -1 - r take prev[r] (rows in any order, some repeated); literal ids stay.
    from nanovllm.kernels.sample import feed_back, feed_back_ref
    gen = torch.Generator(DEVICE).manual_seed(batch)
    prev = torch.randint(0, 151936, (64,), generator=gen, device=DEVICE)
    ids = torch.randint(0, 151936, (batch,), generator=gen, device=DEVICE)
    rows = torch.randint(0, 64, (batch,), generator=gen, device=DEVICE)
    placeholder = torch.rand(batch, generator=gen, device=DEVICE) < 0.7
    ids = torch.where(placeholder, -1 - rows, ids)
    want = torch.where(placeholder, prev[rows], ids)
    assert torch.equal(feed_back(ids.clone(), prev), want) and torch.equal(feed_back_ref(ids.clone(), prev), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_kernel_draws_softmax_over_temperature_and_argmax_at_zero(dtype):
    """Gumbel-max in one pass: rows at temperature T draw from softmax(logits / T) (chi-square against the
    exact distribution), temperature-0 rows take the argmax, and a new seed gives new draws."""
    from nanovllm.kernels.sample import sample
    rows, vocab, temperature = (20000 if CUDA else 250), 5, 2.5  # 5: a partial tile (the interpreter is slow)
    gen = torch.Generator(DEVICE).manual_seed(0)
    row = torch.randn(vocab, generator=gen, device=DEVICE).to(dtype)
    logits = row[None].expand(rows, vocab).contiguous()
    temps = torch.full((rows,), temperature, device=DEVICE)
    temps[:5] = 0
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    out = torch.full((rows,), -1, dtype=torch.int64, device=DEVICE)
    sample(logits, temps, seed, out)
    assert (out[:5] == row.float().argmax()).all()
    counts = torch.bincount(out[5:], minlength=vocab).double()
    expected = torch.softmax(row.double() / temperature, dim=-1) * (rows - 5)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 23.5, chi2  # 4 degrees of freedom: exceeded with probability 1e-4 by a correct sampler
    again = torch.empty_like(out)
    sample(logits, temps, seed + 1, again)
    assert (again[:5] == out[:5]).all() and (again[5:] != out[5:]).float().mean() > 0.5


def test_sample_kernel_argmax_across_tiles():
    """A vocabulary wider than one tile (2048): the best score is found in whichever tile holds it, and the
    first of equal maxima wins, as in torch.argmax."""
    from nanovllm.kernels.sample import sample
    vocab = 4500
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits[0, 10] = logits[1, 3000] = logits[2, 4499] = 50.0
    logits[3, [700, 2500]] = 50.0  # a tie across tiles
    logits[4, 2048] = 50.0
    temps = torch.zeros(6, device=DEVICE)
    temps[5] = 1e-3  # a near-zero temperature samples the argmax too
    logits[5, 3333] = 50.0
    out = torch.empty(6, dtype=torch.int64, device=DEVICE)
    sample(logits, temps, torch.tensor([3], dtype=torch.int64, device=DEVICE), out)
    assert out.tolist() == [10, 3000, 4499, 700, 2048, 3333]


def test_sample_kernel_writes_the_ids_into_the_host_ring_row_its_slot_names():
    """HostOut: the ids also land in ring[slot] (pinned host memory on CUDA), the slot read on the device;
    the other rows stay as they were."""
    from nanovllm.kernels.sample import HostOut, sample
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ring = torch.full((4, 8), -7, dtype=torch.int64, pin_memory=CUDA)
    slot = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    out = torch.empty(5, dtype=torch.int64, device=DEVICE)
    sample(logits, torch.zeros(5, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE), out,
           host_out=HostOut(ring, slot))
    if CUDA:
        torch.cuda.synchronize()
    want = logits.argmax(-1).cpu()
    assert torch.equal(out.cpu(), want) and torch.equal(ring[2, :5], want)
    assert (ring[2, 5:] == -7).all() and (ring[[0, 1, 3]] == -7).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(3, 2500), (1, 37), (34, 5000)]
                         + ([(1, 151936), (40, 151936)] if CUDA else []))
def test_logprobs_kernel_gives_the_samplers_logprobs(rows, vocab, dtype):
    """Each row's logprob and rank of its token and its top lists (every width) are gather_logprobs': the
    values within fp32 rounding, the ids those values belong to (bf16 ties may order them otherwise). A
    vocabulary over several chunks, and one under a chunk; over 32 rows the wide chunks. A chunk of -inf
    logits (row 1 where it spans two chunks) adds nothing rather than NaN. The same results, packed, in the
    host ring row the slot names (pinned memory on CUDA), as pack_ref packs the outputs; other rows as they
    were."""
    from nanovllm.kernels.logprobs import PACKED, TOP_WIDTHS, LogprobsBuffers, logprobs, logprobs_ref, pack_ref
    from nanovllm.kernels.sample import HostOut
    gen = torch.Generator(DEVICE).manual_seed(rows)
    logits = (3 * torch.randn(rows, vocab, generator=gen, device=DEVICE)).to(dtype)
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=DEVICE)
    ids[0] = logits[0].float().argmax()  # rank 1
    if rows > 1 and vocab > 2048:
        logits[1, 1024:2048] = -float("inf")
        ids[1] = 0
    buffers = LogprobsBuffers.make(rows + 2, vocab, DEVICE)
    ring = torch.full((3, rows + 2, PACKED), -7.0, pin_memory=CUDA)
    for width in TOP_WIDTHS:
        for t in buffers[:4]:
            t.fill_(-7)  # rows the kernel forgets fail
        slot = torch.tensor([TOP_WIDTHS.index(width)], device=DEVICE)
        lp, rank, top_ids, top_lps = logprobs(logits, ids, width, buffers, HostOut(ring, slot))
        if CUDA:
            torch.cuda.synchronize()
        expected = pack_ref(lp, rank, top_ids, top_lps, torch.full((rows + 2, PACKED), -7.0, device=DEVICE))
        assert torch.equal(ring[int(slot)], expected.cpu())  # the 2 spare rows untouched
        ring[int(slot)] = -7.0
        ref_lp, ref_rank, ref_ids, ref_lps = logprobs_ref(logits, ids, width)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        assert torch.equal(rank, ref_rank) and rank[0] == 1
        torch.testing.assert_close(top_lps, ref_lps, atol=1e-5, rtol=0)
        assert top_ids.shape == (rows, width)
        torch.testing.assert_close(logits.gather(1, top_ids), logits.gather(1, ref_ids), atol=0, rtol=0)
        assert (top_lps[:, 1:] <= top_lps[:, :-1]).all()
    assert (ring == -7).all()  # each width's slot only, each restored


def test_logprobs_kernel_top_lists_take_the_lowest_id_of_equal_logits():
    """Equal logits enter a top list lowest id first, across chunks too (one logit and its id are one sort
    key); negative logits order below positive ones and -inf below both."""
    from nanovllm.kernels.logprobs import LogprobsBuffers, logprobs
    vocab = 3000  # three chunks
    logits = torch.full((2, vocab), -1.5, device=DEVICE)
    logits[0, [2999, 1500, 7]] = 2.0  # ties across chunks: 7, 1500, 2999
    logits[0, 1024:2048] = -float("inf")  # ... but 1500 is -inf now
    logits[0, 1500] = 2.0
    logits[1, 10:] = -float("inf")
    logits[1, 5] = 0.0
    ids = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _, _, top_ids, top_lps = logprobs(logits, ids, 5, LogprobsBuffers.make(2, vocab, DEVICE))
    if CUDA:
        torch.cuda.synchronize()
    assert top_ids[0].tolist() == [7, 1500, 2999, 0, 1]
    assert top_ids[1].tolist() == [5, 0, 1, 2, 3]
    assert (top_lps[:, 1:] <= top_lps[:, :-1]).all() and torch.isfinite(top_lps).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kinds", ["repetition", "frequency", "both"])
def test_penalties_kernel_gives_the_torch_paths_bits(kinds, dtype):
    """kernels/penalties.py against layers/sampler.apply_penalties' torch path, bit for bit: rows with
    repeated ids, ids listed in both the history and the outputs, a row with no penalties, histories longer
    than a pass's block (1,024); the scratch is all zeros again afterwards, so a second call agrees too."""
    from nanovllm.kernels import penalties
    from nanovllm.layers.sampler import SamplingBatch, _pad, apply_penalties
    gen = torch.Generator(DEVICE).manual_seed(len(kinds))
    rows, vocab = 4, 3001
    raw = (3 * torch.randn(rows, vocab, generator=gen, device=DEVICE)).to(dtype)
    raw[:, :5] = 0.0  # zero logits, which neither divide nor multiply
    lengths = [2500, 17, 0, 1100]
    history = [torch.randint(0, vocab, (n,), generator=gen, device=DEVICE).tolist() for n in lengths]
    history[1] += [3, 3, 3, 0]  # repeats, and a zero logit
    outputs = [h[len(h) // 2:] + h[:3] for h in history]  # the outputs repeat some of the history's ids
    batch = SamplingBatch(temperatures=torch.ones(rows, device=DEVICE), greedy=torch.ones(rows, dtype=torch.bool,
                          device=DEVICE), all_greedy=True, any_unseeded=False)
    if kinds in ("repetition", "both"):
        batch.repetition_penalties = torch.tensor([1.3, 0.7, 1.0, 2.0], device=DEVICE)
        batch.seen_ids = _pad(history, vocab, DEVICE)
    if kinds in ("frequency", "both"):
        batch.frequency_penalties = torch.tensor([0.5, -0.25, 0.0, 1.5], device=DEVICE)
        batch.presence_penalties = torch.tensor([0.75, 0.5, 0.0, -1.0], device=DEVICE)
        batch.output_ids = _pad(outputs, vocab, DEVICE)
    want = apply_penalties(raw.float(), batch)  # the torch path (no raw logits given)
    assert not torch.equal(want, raw.float())
    for _ in range(2):
        got = penalties.apply_penalties(raw.float().clone(), raw, batch.seen_ids, batch.repetition_penalties,
                                        batch.output_ids, batch.frequency_penalties, batch.presence_penalties)
        assert torch.equal(got, want)
        assert not penalties._scratch[got.device].any()


# ---- programmatic dependent launch (nanovllm/kernels/pdl.py) ----

def test_pdl_switch(monkeypatch):
    """PDL where the device supports it, unless NANOVLLM_PDL=0; never on CPU or under the interpreter."""
    from nanovllm.kernels import pdl
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("NANOVLLM_PDL", raising=False)
    monkeypatch.delenv("NANOVLLM_PDL_MAX_TOKENS", raising=False)
    assert not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "pdl_supported", lambda device: device.type == "cuda")
    monkeypatch.setattr(pdl, "_INTERPRET", False)
    assert pdl.pdl_enabled(cuda) and not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("NANOVLLM_PDL", "0")
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setenv("NANOVLLM_PDL", "1")
    assert pdl.pdl_enabled(cuda)
    assert pdl.pdl_enabled(cuda, 4) and not pdl.pdl_enabled(cuda, 5)  # up to four tokens by default
    monkeypatch.setenv("NANOVLLM_PDL_MAX_TOKENS", "8")
    assert pdl.pdl_enabled(cuda, 8) and not pdl.pdl_enabled(cuda, 9)
    monkeypatch.setattr(pdl, "_INTERPRET", True)
    assert not pdl.pdl_enabled(cuda)


class _LaunchRecorder:
    """Stands in for a Triton kernel: records the keyword arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("enabled", [False, True])
def test_decode_kernels_launch_with_pdl_as_the_switch_says(monkeypatch, enabled):
    """Every kernel of a decode step (RMSNorm, RoPE + store, attention and its reduce, SiLU-and-mul, the
    sampler's two passes) is compiled for PDL (its PDL flag) and launched with it exactly when pdl_enabled says so."""
    from nanovllm.kernels import add_rmsnorm as norm_mod
    from nanovllm.kernels import paged_attention as attn_mod
    from nanovllm.kernels import rope_kv_store as rope_mod
    from nanovllm.kernels import sample as sample_mod
    from nanovllm.kernels import silu_and_mul as silu_mod
    kernels = {(norm_mod, "_rmsnorm_kernel"), (rope_mod, "_rope_kv_store_kernel"), (silu_mod, "_silu_and_mul_kernel"),
               (attn_mod, "_decode_kernel"), (attn_mod, "_decode_reduce_kernel"),
               (sample_mod, "_chunk_best_kernel"), (sample_mod, "_row_best_kernel")}
    recorders = {}
    for mod, name in kernels:
        recorders[name] = _LaunchRecorder()
        monkeypatch.setattr(mod, name, recorders[name])
        monkeypatch.setattr(mod, "pdl_enabled", lambda device, num_tokens=1: enabled)
    x = torch.randn(2, 64)
    rmsnorm(x, torch.ones(64), 1e-6)
    add_rmsnorm(x, x.clone(), torch.ones(64), 1e-6)
    silu_and_mul(x)
    (q, k, v), positions, cos_sin, caches, slots, norms = rope_inputs(3, 4, 2, 64, torch.float32)
    rope_and_store_kv(q, k, v, positions, cos_sin, *caches, slots, *norms)
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1, 1], [100, 7], 4, 2, 64, 16, torch.float32)
    paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, 0.125, num_kv_splits=2)
    sample_mod.sample(x, torch.zeros(2), torch.zeros(1, dtype=torch.int64), torch.empty(2, dtype=torch.int64))
    for name, recorder in recorders.items():
        assert recorder.launches, name
        assert all(kw["PDL"] is enabled and kw["launch_pdl"] is enabled for kw in recorder.launches), name


@gpu_only
def test_gpu_pdl_chain_in_a_cuda_graph_matches_without_pdl(monkeypatch):
    """RMSNorm -> RoPE + KV store -> decode attention (split) -> SiLU-and-mul -> add + RMSNorm -> the
    sampler's two argmax passes, each reading what the kernel just before it wrote, captured in a CUDA graph
    with PDL: after new inputs are copied in, a replay gives the bits of the same kernels run eagerly
    without PDL."""
    from nanovllm.kernels.pdl import pdl_enabled
    from nanovllm.kernels.sample import sample
    monkeypatch.setenv("NANOVLLM_PDL_MAX_TOKENS", "8")  # PDL at batch 8 too, which the engine leaves off
    if not pdl_enabled(torch.device(DEVICE), 8):
        pytest.skip("programmatic dependent launch needs sm_90 (and NANOVLLM_PDL unset)")
    heads, kv_heads, dim, batch = 16, 8, 128, 8
    q, k_cache, v_cache, tables, cu, ctx = paged_batch([1] * batch, [1000 + 37 * i for i in range(batch)],
                                                       heads, kv_heads, dim, 16, torch.bfloat16)
    _, positions, cos_sin, _, _, norms = rope_inputs(batch, heads, kv_heads, dim, torch.bfloat16)
    slots = (tables[:, 0].long() * 16 + 3)  # one fresh slot per seq, inside its context
    width = (heads + 2 * kv_heads) * dim
    x, residual = torch.randn(2, batch, width, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(width, device=DEVICE, dtype=torch.bfloat16)

    def step():
        h = rmsnorm(x, w, 1e-6)
        q, k, v = h.view(batch, -1, dim).split([heads, kv_heads, kv_heads], dim=1)
        rope_and_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots, *norms)
        o = paged_attention(q, k_cache, v_cache, tables, cu, ctx, 1, dim ** -0.5, num_kv_splits=4)
        a = silu_and_mul(o.view(batch, -1))  # (batch, heads * dim / 2)
        h = add_rmsnorm(a, residual[:, :a.shape[1]], w[:a.shape[1]], 1e-6)[0]
        return h, k_cache.clone(), sample(h, temps, seed, torch.empty(batch, dtype=torch.int64, device=DEVICE))

    temps, seed = torch.zeros(batch, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    state = [t.clone() for t in (x, residual, k_cache, v_cache)]
    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, kc, tokens = step()
    new_x = torch.randn_like(x)
    for t, s in zip((x, residual, k_cache, v_cache), state):
        t.copy_(s)
    x.copy_(new_x)
    graph.replay()
    got = (out.clone(), kc.clone(), residual.clone(), tokens.clone())
    for t, s in zip((x, residual, k_cache, v_cache), state):
        t.copy_(s)
    x.copy_(new_x)
    monkeypatch.setenv("NANOVLLM_PDL", "0")
    want_out, want_kc, want_tokens = step()
    assert torch.equal(got[0], want_out) and torch.equal(got[1], want_kc) and torch.equal(got[2], residual)
    assert torch.equal(got[3], want_tokens) and torch.equal(want_tokens, want_out.float().argmax(-1))
