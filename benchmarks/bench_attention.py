"""Paged attention on the GPU, Qwen3-0.6B shapes (H=16, Hkv=8, D=128, bf16, block_size 16).

Decode: our Triton flash-decoding kernel vs torch SDPA over KV gathered from the same paged cache (what a
torch path must do) and vs SDPA over already-contiguous KV (a dense kernel with no paging cost), with
achieved GB/s (KV bytes read / time) beside the measured copy bandwidth. Varied context lengths (uniform in
[100, 2048], and nano-vllm's workload as its seqs finish: batch 256, 145, 52) time the default beside more
KV splits, in GB/s over the keys actually read. Prefill: TFLOP/s vs dense causal SDPA. Each timed graph
replays calls over several distinct block tables so the KV comes from HBM, not L2.
decode_graph times what a decode graph of the engine launches at small batches (tables MAX_MODEL_LEN keys
wide, so the default split count is the cap): the default beside other split counts, where the split merge
(done by each (seq, KV head)'s last split) is the cost that grows with the count.
decode_order times the varied lengths with the seqs in the given order and longest first (the engine's
seq_order), which shortens the tail of seqs started last.
Usage: python benchmarks/bench_attention.py [out_dir [section ...]]   (writes attention-<card>.json)
Sections: decode decode_graph decode_varied decode_splits decode_tiles decode_order prefill (default: all).
BENCH_ATTENTION_FILE=path times that copy of paged_attention.py instead (an older one from `git show`, for a
before/after in one device call; write to another out_dir). BENCH_ATTENTION_HEADS=16,4 takes H and Hkv
from it instead: one rank's heads of Qwen3-8B at tensor_parallel_size 2.
"""
import importlib
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
import triton
from bench_latency import card_name, load_copy
from bench_throughput import workload

from nanovllm.utils.context import longest_first


def _kernels():
    """nanovllm's paged_attention module, or the copy BENCH_ATTENTION_FILE names."""
    path = os.environ.get("BENCH_ATTENTION_FILE")
    if not path:
        return importlib.import_module("nanovllm.kernels.paged_attention")
    return load_copy(path, "paged_attention_under_test")


_attn = _kernels()
_decode, default_num_kv_splits, _prefill = _attn._decode, _attn.default_num_kv_splits, _attn._prefill
paged_attention_ref = _attn.paged_attention_ref

H, HKV = map(int, os.environ.get("BENCH_ATTENTION_HEADS", "16,8").split(","))  # 16,4: Qwen3-8B at TP 2
D, BS = 128, 16
MAX_MODEL_LEN = 4096  # bench_throughput's: the decode graphs' block-table width
L2_BYTES = 50e6
torch.manual_seed(0)


def bench(fn, rep: int = 100) -> float:
    """Median ms of one fn() call, timed over CUDA-graph replays."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth() -> tuple[float, float]:
    """Bytes/s of a 1 GiB device copy (read + write) and of a 2 GiB read (torch.sum): the two ceilings."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3)
    z = torch.randn(2**30, dtype=torch.bfloat16, device="cuda")
    return copy, z.numel() * 2 / (bench(lambda: z.sum()) * 1e-3)


def decode_setup(ctx_lens: list[int], width: int):
    """q and paged caches for one decode query per seq; tables (copies, B, width) scatter each copy's pages
    at random, padded with -1 past each seq's pages."""
    batch = len(ctx_lens)
    kv_bytes = sum(ctx_lens) * HKV * D * 2 * 2  # K and V, bf16
    copies = max(2, min(64, math.ceil(4 * L2_BYTES / kv_bytes)))
    pages = [math.ceil(c / BS) for c in ctx_lens]
    k_cache = torch.randn(copies * sum(pages), BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(k_cache.shape[0], device="cuda").int().split(pages * copies)
    tables = torch.full((copies * batch, width), -1, dtype=torch.int32, device="cuda")
    for row, ids in enumerate(perm):
        tables[row, :len(ids)] = ids
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, device="cuda", dtype=torch.int32)
    return q, k_cache, v_cache, tables.view(copies, batch, width), cu, ctx, kv_bytes


def run_decode(q, k_cache, v_cache, table, cu, ctx, out, num_kv_splits: int, **tile) -> None:
    _decode(q, k_cache, v_cache, table, cu, ctx, D ** -0.5, out, num_kv_splits, **tile)


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, D), k/v (B, Hkv, ctx, D): the group's heads become Hkv queries of length H/Hkv (no mask)."""
    out = F.scaled_dot_product_attention(q.view(q.shape[0], HKV, H // HKV, D), k, v)
    return out.reshape(q.shape)


def time_decode(batch: int, ctx: int, baselines: bool = True, **variant) -> dict:
    """Every seq at ctx keys, tables exactly ctx keys wide; SDPA over gathered and dense KV beside ours."""
    q, k_cache, v_cache, tables, cu, ctx_lens, kv_bytes = decode_setup([ctx] * batch, ctx // BS)
    out = torch.empty_like(q)
    variant.setdefault("num_kv_splits", default_num_kv_splits(batch, HKV, ctx, q.device))
    gather = lambda cache, t: cache[t].view(batch, ctx, HKV, D).transpose(1, 2)  # noqa: E731

    def ours():
        for table in tables:
            run_decode(q, k_cache, v_cache, table, cu, ctx_lens, out, **variant)

    def sdpa_gathered():
        for table in tables:
            sdpa_decode(q, gather(k_cache, table), gather(v_cache, table))

    dense = [(gather(k_cache, t).contiguous(), gather(v_cache, t).contiguous())
             for t in (tables if baselines else tables[-1:])]

    def sdpa_dense():
        for k, v in dense:
            sdpa_decode(q, k, v)

    # Correctness at this shape first (the last table's output is what ours() leaves in out).
    ours()
    err = rel_err(out, sdpa_decode(q, *dense[-1]), batch, ctx, variant)
    fns = [("ours", ours)]
    if baselines:
        fns += [("sdpa_gathered", sdpa_gathered), ("sdpa_dense", sdpa_dense)]
    ms = {name: bench(fn) / len(tables) for name, fn in fns}
    return dict(batch=batch, ctx=ctx, **variant, kv_bytes=kv_bytes, rel_err=err,
                **{f"{k}_us": v * 1e3 for k, v in ms.items()}, ours_gbps=kv_bytes / (ms["ours"] * 1e-3) / 1e9)


def time_decode_varied(name: str, ctx_lens: list[int], ordered: bool = True, **variant) -> dict:
    """Seqs of unequal lengths in tables MAX_MODEL_LEN keys wide (as the decode graphs have them), taken
    longest first as the engine does (ordered=False: in the given order)."""
    batch = len(ctx_lens)
    q, k_cache, v_cache, tables, cu, ctx, kv_bytes = decode_setup(ctx_lens, MAX_MODEL_LEN // BS)
    out = torch.empty_like(q)
    variant.setdefault("num_kv_splits", default_num_kv_splits(batch, HKV, MAX_MODEL_LEN, q.device))
    # A keyword only when given, so that BENCH_ATTENTION_FILE may name a kernel from before seq_order.
    order = dict(seq_order=torch.from_numpy(longest_first(np.array(ctx_lens))).cuda()) if ordered else {}

    def ours():
        for table in tables:
            run_decode(q, k_cache, v_cache, table, cu, ctx, out, **variant, **order)

    ours()
    want = paged_attention_ref(q, k_cache, v_cache, tables[-1], cu, ctx, 1, D ** -0.5)
    err = rel_err(out, want, batch, name, variant)
    ms = bench(ours, rep=50) / len(tables)
    return dict(dist=name, batch=batch, ctx=round(sum(ctx_lens) / batch), ctx_max=max(ctx_lens),
                ordered=ordered, **variant,
                kv_bytes=kv_bytes, rel_err=err, ours_us=ms * 1e3, ours_gbps=kv_bytes / (ms * 1e-3) / 1e9)


def rel_err(out: torch.Tensor, want: torch.Tensor, *what) -> float:
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    if not err < 1e-2:
        print(f"MISMATCH {what}: rel err {err:.2e}")
    return err


def varied_lengths() -> dict[str, list[int]]:
    """Context lengths per named distribution: uniform in [100, 2048], and bench_throughput's workload
    (prompts and outputs uniform in [100, 1024]) at the decode step where 256, 145 and 52 seqs still run
    (145 and 52: what the H200 profile saw at steps ~400 and ~800)."""
    rng = random.Random(1)
    dists = {f"uniform-{b}": [rng.randint(100, 2048) for _ in range(b)] for b in (52, 145, 256)}
    prompts, params = workload()
    by_output = sorted(zip((p.max_tokens for p in params), map(len, prompts)), reverse=True)
    for b in (256, 145, 52):
        step = by_output[b][0] if b < len(by_output) else 0  # the b longest outputs still run at this step
        dists[f"workload-{b}@{step}"] = [prompt + step + 1 for _, prompt in by_output[:b]]
    return dists


def time_prefill(batch: int, q_len: int, ctx: int, **variant) -> dict:
    q = torch.randn(batch * q_len, H, D, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(batch * ctx // BS, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(k_cache.shape[0], device="cuda").view(batch, ctx // BS).int()
    cu = torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32)
    ctx_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    ours_ms = bench(lambda: _prefill(q, k_cache, v_cache, tables, cu, ctx_lens, D ** -0.5, out, **variant))
    # Causal pairs: each query sees its prefix of cached keys plus the chunk's keys up to itself.
    pairs = batch * (q_len * (ctx - q_len) + q_len * (q_len + 1) / 2)
    flops = 4 * pairs * H * D
    row = dict(batch=batch, q_len=q_len, ctx=ctx, **variant, ours_us=ours_ms * 1e3,
               ours_tflops=flops / ours_ms / 1e9)
    if q_len == ctx and not variant:  # dense causal SDPA as the yardstick for fresh prompts
        qd = q.view(batch, q_len, H, D).transpose(1, 2)
        kd = torch.randn(batch, H, ctx, D, device="cuda", dtype=torch.bfloat16)  # KV heads pre-expanded
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True))
        row.update(sdpa_dense_us=sdpa_ms * 1e3, sdpa_tflops=flops / sdpa_ms / 1e9)
    return row


def decode_row(r: dict, read_bw: float) -> dict:
    mark = ">" if r.get("ordered") else " "  # longest first
    print(f"{r.get('dist', ''):>18}{mark} {r['batch']:>4} {r['ctx']:>5} {r['num_kv_splits']:>6} "
          f"{r.get('block_n') or 64:>4} "
          f"{r.get('num_warps', 4):>2} {r.get('num_stages', 3):>2} {r['ours_us']:>8.1f} "
          f"{r.get('sdpa_gathered_us', 0):>9.1f} {r.get('sdpa_dense_us', 0):>7.1f} {r['ours_gbps']:>6.0f} "
          f"{100 * r['ours_gbps'] * 1e9 / read_bw:>5.0f}%", flush=True)
    return r


def decode_varied(read_bw: float) -> list[dict]:
    # The default (one split from batch ~50 up) and more splits: shorter programs, a shorter tail.
    return [decode_row(time_decode_varied(name, ctx_lens, **splits), read_bw)
            for name, ctx_lens in varied_lengths().items()
            for splits in ({}, dict(num_kv_splits=2), dict(num_kv_splits=3), dict(num_kv_splits=4))]


def decode_order(read_bw: float) -> list[dict]:
    # The seqs in the given (arbitrary) order against longest first, at the default split count and at 2;
    # and equal short contexts (bench_latency's 168 keys), where no order helps and the KV heads being the
    # grid's fastest axis cost the engine's batch-256 step (benchmarks/NOTES-kernels.md): time these beside
    # an older kernel (BENCH_ATTENTION_FILE) to see the grid order alone.
    dists = {**varied_lengths(), "equal-64x168": [168] * 64, "equal-256x168": [168] * 256}
    return [decode_row(time_decode_varied(name, ctx_lens, ordered, **splits), read_bw)
            for name, ctx_lens in dists.items()
            for splits in ({}, dict(num_kv_splits=2)) for ordered in (False, True)]


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    sections = sys.argv[2:] or ["decode", "decode_graph", "decode_varied", "decode_splits", "decode_tiles",
                                "decode_order", "prefill"]
    card, tag = card_name()
    copy_bw, read_bw = copy_bandwidth()
    print(f"{card}: copy {copy_bw / 1e12:.2f} TB/s (read + write), read {read_bw / 1e12:.2f} TB/s")
    print(f"{'dist':>18} {'B':>4} {'ctx':>5} {'split':>6} {'BN':>4} {'W':>2} {'st':>2} {'ours us':>8} "
          f"{'gathered':>9} {'dense':>7} {'GB/s':>6} {'%read':>6}")
    result = dict(card=card, copy_bandwidth_tbps=copy_bw / 1e12, read_bandwidth_tbps=read_bw / 1e12)
    path = os.path.join(out_dir, f"attention-{tag}.json")
    os.makedirs(out_dir, exist_ok=True)
    for section in sections:
        result[section] = SECTIONS[section](read_bw)
        with open(path, "w") as f:  # after every section, so a run cut short keeps what it measured
            json.dump(result, f, indent=1)


def decode_default(read_bw: float) -> list[dict]:
    return [decode_row(time_decode(b, c), read_bw) for b in (1, 8, 64, 256) for c in (1024, 4096)]


def decode_graph(read_bw: float) -> list[dict]:
    # 168 keys: bench_latency's context (128-token prompts) half-way through its timed steps. A split holds
    # whole tiles, so at 168 keys only 3 of the default 32 splits per KV head hold keys with 64-key tiles
    # (11 with 16-key ones): smaller tiles are the other way to spread a short context.
    return [decode_row(time_decode_varied(f"graph-{b}x{c}", [c] * b, **variant), read_bw)
            for b in (1, 2, 8) for c in (168, 1024)
            for variant in ({}, dict(num_kv_splits=4), dict(num_kv_splits=8), dict(num_kv_splits=16),
                            dict(num_kv_splits=32), dict(block_n=32), dict(block_n=16))]


def decode_splits(read_bw: float) -> list[dict]:
    return [decode_row(time_decode(b, c, False, num_kv_splits=s), read_bw)
            for b in (1, 8) for c in (1024, 4096) for s in (1, 2, 4, 8, 16, 32)]


def decode_tiles(read_bw: float) -> list[dict]:
    return [decode_row(time_decode(b, c, False, block_n=n, num_warps=w, num_stages=st), read_bw)
            for b, c in ((1, 1024), (64, 4096))
            for n, w, st in ((32, 4, 3), (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 1), (64, 4, 2),
                             (64, 4, 4), (128, 8, 4))]


def prefill(read_bw: float) -> list[dict]:
    rows = []
    for args, variant in [((4, 2048, 2048), {}), ((8, 512, 4096), {}), ((16, 256, 256), {}),
                          ((4, 2048, 2048), dict(block_m=64, block_n=32, num_warps=4)),
                          ((4, 2048, 2048), dict(block_m=128, block_n=64, num_warps=4)),
                          ((4, 2048, 2048), dict(block_m=128, block_n=64, num_warps=8)),
                          ((4, 2048, 2048), dict(block_m=128, block_n=32, num_warps=8))]:
        rows.append(time_prefill(*args, **variant))
        print("prefill", {k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


SECTIONS = dict(decode=decode_default, decode_graph=decode_graph, decode_varied=decode_varied,
                decode_splits=decode_splits, decode_tiles=decode_tiles, decode_order=decode_order,
                prefill=prefill)


if __name__ == "__main__":
    main()
